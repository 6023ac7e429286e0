//! The CUDA kernels of `kernels/*.cu`, as PTX compiled by build.rs (feature `cuda`) for
//! the compute capability in `CUDA_COMPUTE_CAP` (default 90), loaded through candle's CUDA
//! device by `crate::cuda`.

/// PTX of kernels/warm_average.cu: `out = sum_i w_i * x_i` over M inputs.
pub const WARM_AVERAGE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/warm_average.ptx"));

/// Entry points of [`WARM_AVERAGE_PTX`], one per element type. Each takes
/// `(const T* const* inputs, const float* weights, u32 m, T* out, u64 n)`.
pub const WARM_AVERAGE_F32: &str = "warm_average_f32";
pub const WARM_AVERAGE_F16: &str = "warm_average_f16";
pub const WARM_AVERAGE_BF16: &str = "warm_average_bf16";

/// PTX of kernels/warm_member_sums.cu: the four shared-init sums of each member.
pub const WARM_MEMBER_SUMS_PTX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/warm_member_sums.ptx"));

/// Entry points of [`WARM_MEMBER_SUMS_PTX`], one per element type. Each takes
/// `(const T* const* inputs, u32 m, u64 n, double* sums)` and adds to `sums[4 * M]`.
pub const WARM_MEMBER_SUMS_F32: &str = "warm_member_sums_f32";
pub const WARM_MEMBER_SUMS_F16: &str = "warm_member_sums_f16";
pub const WARM_MEMBER_SUMS_BF16: &str = "warm_member_sums_bf16";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_exports_one_entry_per_kernel_and_dtype() {
        let kernels = [
            (
                WARM_AVERAGE_PTX,
                [WARM_AVERAGE_F32, WARM_AVERAGE_F16, WARM_AVERAGE_BF16],
            ),
            (
                WARM_MEMBER_SUMS_PTX,
                [
                    WARM_MEMBER_SUMS_F32,
                    WARM_MEMBER_SUMS_F16,
                    WARM_MEMBER_SUMS_BF16,
                ],
            ),
        ];
        for (ptx, names) in kernels {
            assert!(ptx.contains(".version "), "not PTX");
            for name in names {
                assert!(
                    ptx.contains(&format!(".visible .entry {name}(")),
                    "{name} missing from the PTX"
                );
            }
        }
    }
}
