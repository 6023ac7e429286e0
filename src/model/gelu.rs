//! GELU with the exact erf, as transformers' "gelu" computes it, vectorized for f32 on the
//! CPU. candle evaluates erf with scalar libm calls, which took 16% of a MiniLM forward
//! pass; this rational approximation, fitted for warm (least squares on [0, 4] with
//! t = x^2: erf(x) = x P(t) / Q(t), 1 beyond 4), is within 4e-7 of erf in f32 and
//! vectorizes.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use candle_nn::Activation;
use rayon::prelude::*;

use super::vexp::horner;

/// erf's numerator and denominator in t = x^2, lowest power first.
const P: [f32; 7] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    0.184_677_66,
    0.054_353_345,
    0.003_841_565,
    0.000_383_769,
    4.809_408_4e-6,
    -1.381_124_5e-8,
];
const Q: [f32; 6] = [
    1.0,
    0.496_999_86,
    0.113_835_03,
    0.015_461_166,
    0.001_311_462_6,
    6.428_547e-5,
];

#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    (x * horner(t, P.iter().rev()) / horner(t, Q.iter().rev())).clamp(-1.0, 1.0)
}

#[inline(always)]
fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gelu_slice_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_slice(src, dst);
}

fn gelu_chunk(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { gelu_slice_avx2(src, dst) };
        }
    }
    gelu_slice(src, dst);
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "warm-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("warm-gelu-erf takes contiguous f32 input");
        };
        let src = &values[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(d, s)| gelu_chunk(s, d));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Applies `act`, with the vectorized exact GELU for f32 tensors on the CPU. GELUs of
/// bf16/f16 tensors are computed in f32 and rounded once, as torch does: candle's CUDA
/// kernels evaluate them in the half type with rounded constants (a tanh GELU's
/// sqrt(2/pi) becomes 0.796875 in bf16).
pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    use candle_core::{DType, Module};
    let is_gelu = matches!(
        act,
        Activation::Gelu | Activation::GeluPytorchTanh | Activation::NewGelu
    );
    if act == Activation::Gelu && x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else if is_gelu && x.dtype() != DType::F32 {
        act.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else {
        act.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf to double precision (Abramowitz & Stegun 7.1.26 is too coarse for a reference;
    /// this is the Maclaurin series, exact enough on [-4, 4] in f64).
    fn erf_reference(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_4e_7() {
        let mut worst = 0f64;
        for i in -8000..=8000 {
            let x = i as f64 / 2000.0;
            worst = worst.max((f64::from(erf(x as f32)) - erf_reference(x)).abs());
        }
        assert!(worst < 4e-7, "{worst}");
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn matches_candle_gelu_erf() {
        let x = Tensor::arange(-600i64, 600, &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap();
        let ours: Vec<f32> = activate(Activation::Gelu, &x).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = x.gelu_erf().unwrap().to_vec1().unwrap();
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
    }
}
