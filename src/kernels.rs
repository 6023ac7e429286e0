//! The CUDA kernels of `kernels/*.cu`, as PTX compiled by build.rs (feature `cuda`) for
//! the compute capability in `CUDA_COMPUTE_CAP` (default 90).
//!
//! Unfinished: nothing loads this PTX yet. Device fusion and serving on CUDA (issue 8) will
//! load it through candle's CUDA device; until then the feature only checks that the
//! kernels compile and export the entry points below.

/// PTX of kernels/warm_average.cu: `out = sum_i w_i * x_i` over M inputs.
pub const WARM_AVERAGE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/warm_average.ptx"));

/// Entry points of [`WARM_AVERAGE_PTX`], one per element type. Each takes
/// `(const T* const* inputs, const float* weights, u32 m, T* out, u64 n)`.
pub const WARM_AVERAGE_F32: &str = "warm_average_f32";
pub const WARM_AVERAGE_F16: &str = "warm_average_f16";
pub const WARM_AVERAGE_BF16: &str = "warm_average_bf16";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_exports_one_averaging_entry_per_dtype() {
        for name in [WARM_AVERAGE_F32, WARM_AVERAGE_F16, WARM_AVERAGE_BF16] {
            assert!(
                WARM_AVERAGE_PTX.contains(&format!(".visible .entry {name}(")),
                "{name} missing from the PTX"
            );
        }
        assert!(WARM_AVERAGE_PTX.contains(".version "), "not PTX");
    }
}
