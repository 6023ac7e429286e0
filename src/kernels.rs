//! The CUDA kernels of `kernels/*.cu`, as PTX compiled by build.rs (feature `cuda`) for
//! the compute capability in `CUDA_COMPUTE_CAP` (default 90), loaded through candle's CUDA
//! device by `crate::cuda`.

use crate::dtype::FloatDType;

/// PTX of kernels/warm_average.cu: `out = sum_i w_i * x_i` over M inputs.
pub const WARM_AVERAGE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/warm_average.ptx"));

/// The entry point of [`WARM_AVERAGE_PTX`] that reads `input` and writes `output`. Each
/// takes `(const TIn* const* inputs, const float* weights, u32 m, TOut* out, u64 n)`.
pub fn warm_average_entry(input: FloatDType, output: FloatDType) -> &'static str {
    use FloatDType::{BF16, F16, F32};
    match (input, output) {
        (F32, F32) => "warm_average_f32_f32",
        (F32, F16) => "warm_average_f32_f16",
        (F32, BF16) => "warm_average_f32_bf16",
        (F16, F32) => "warm_average_f16_f32",
        (F16, F16) => "warm_average_f16_f16",
        (F16, BF16) => "warm_average_f16_bf16",
        (BF16, F32) => "warm_average_bf16_f32",
        (BF16, F16) => "warm_average_bf16_f16",
        (BF16, BF16) => "warm_average_bf16_bf16",
    }
}

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
        let types = [FloatDType::F32, FloatDType::F16, FloatDType::BF16];
        let mut entries: Vec<(&str, String)> = Vec::new();
        for input in types {
            for output in types {
                let name = warm_average_entry(input, output);
                assert_eq!(name, format!("warm_average_{input}_{output}"));
                entries.push((WARM_AVERAGE_PTX, name.to_string()));
            }
        }
        for name in [
            WARM_MEMBER_SUMS_F32,
            WARM_MEMBER_SUMS_F16,
            WARM_MEMBER_SUMS_BF16,
        ] {
            entries.push((WARM_MEMBER_SUMS_PTX, name.to_string()));
        }
        for (ptx, name) in entries {
            assert!(ptx.contains(".version "), "not PTX");
            assert!(
                ptx.contains(&format!(".visible .entry {name}(")),
                "{name} missing from the PTX"
            );
        }
    }
}
