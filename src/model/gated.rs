//! The gated MLP's `act(gate) * up` in one vectorized pass on the CPU in f32, for SiLU
//! (Llama, Mistral, Qwen2, Qwen3) and the tanh GELU (Gemma's `gelu_pytorch_tanh`). candle
//! runs it as two passes over `[t, intermediate]`, a unary map calling libm's scalar `expf`
//! or `tanhf` per element and a binary map for the product: 7% of a SmolLM2-135M forward
//! pass.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Activation;
use rayon::prelude::*;

use super::layers::cpu_f32;
use super::vexp::exp;

/// sqrt(2 / pi), the tanh GELU's inner scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The activations this pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Silu,
    /// 0.5 g (1 + tanh(y)), y = sqrt(2/pi) (g + 0.044715 g^3), computed as g * sigmoid(2y),
    /// the same value without tanh's cancellation near 0 or a second exp.
    GeluTanh,
}

impl Gate {
    fn of(act: Activation) -> Option<Self> {
        match act {
            Activation::Silu => Some(Self::Silu),
            Activation::GeluPytorchTanh | Activation::NewGelu => Some(Self::GeluTanh),
            _ => None,
        }
    }
}

#[inline(always)]
fn silu(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

#[inline(always)]
fn gelu_tanh(g: f32) -> f32 {
    let y = SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g);
    g / (1.0 + exp(-2.0 * y))
}

/// Writes every element of `out` (as long as `gate` and `up`).
#[inline(always)]
fn gated_slice(gate: Gate, g: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    // One loop per activation, so each is a straight loop the compiler vectorizes.
    match gate {
        Gate::Silu => mul_slice(silu, g, up, out),
        Gate::GeluTanh => mul_slice(gelu_tanh, g, up, out),
    }
}

#[inline(always)]
fn mul_slice(act: impl Fn(f32) -> f32, gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(act(g) * u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gated_slice_avx2(gate: Gate, g: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    gated_slice(gate, g, up, out);
}

fn gated_chunk(gate: Gate, g: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { gated_slice_avx2(gate, g, up, out) };
        }
    }
    gated_slice(gate, g, up, out);
}

/// `act(gate) * up` for same-shaped f32 tensors on the CPU; `None` for other activations,
/// dtypes or devices (the caller then takes candle's ops).
pub fn act_mul(act: Activation, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let Some(kind) = Gate::of(act) else {
        return Ok(None);
    };
    let usable = gate.dims() == up.dims()
        && [gate, up]
            .iter()
            .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu));
    if !usable {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = {
        let (gs, _) = gate.storage_and_layout();
        let (us, _) = up.storage_and_layout();
        let (Some(gs), Some(us)) = (cpu_f32(&gate, &gs), cpu_f32(&up, &us)) else {
            return Ok(None);
        };
        // Not zero-filled first: the chunks write every element.
        let mut out: Vec<f32> = Vec::with_capacity(gs.len());
        const CHUNK: usize = 16 * 1024;
        out.spare_capacity_mut()[..gs.len()]
            .par_chunks_mut(CHUNK)
            .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| gated_chunk(kind, g, u, o));
        // SAFETY: the chunks above cover the first gs.len() elements, and each chunk's
        // slices are equally long (gate and up have the same shape), so all are written.
        unsafe { out.set_len(gs.len()) };
        out
    };
    Tensor::from_vec(out, gate.shape(), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// Odd length (no multiple of any vector width), large and small values of both signs.
    fn gate_and_up() -> (Tensor, Tensor) {
        let gate = Tensor::arange(-2003i64, 2000, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.05, 0.0)
            .unwrap();
        let up = gate.cos().unwrap();
        (gate, up)
    }

    #[test]
    fn matches_candle_activation_times_up() {
        let (gate, up) = gate_and_up();
        for act in [
            Activation::Silu,
            Activation::GeluPytorchTanh,
            Activation::NewGelu,
        ] {
            let ours: Vec<f32> = act_mul(act, &gate, &up)
                .unwrap()
                .expect("f32 CPU takes this path")
                .to_vec1()
                .unwrap();
            let candle: Vec<f32> = (act.forward(&gate).unwrap() * &up)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in ours.iter().zip(&candle) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{act:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn other_activations_dtypes_and_shapes_are_left_to_candle() {
        let (gate, up) = gate_and_up();
        assert!(act_mul(Activation::Gelu, &gate, &up).unwrap().is_none());
        let half = gate.to_dtype(DType::BF16).unwrap();
        assert!(act_mul(Activation::Silu, &half, &half).unwrap().is_none());
        let short = gate.narrow(0, 0, 10).unwrap();
        assert!(act_mul(Activation::Silu, &short, &up).unwrap().is_none());
    }
}
