//! The gated MLP's `silu(gate) * up` (Llama, Mistral, Qwen2, Qwen3) in one vectorized pass
//! on the CPU in f32. candle runs it as two passes over `[t, intermediate]`, a unary map
//! whose SiLU calls libm's scalar `expf` per element and a binary map for the product: 7%
//! of a SmolLM2-135M forward pass.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::layers::cpu_f32;
use super::vexp::exp;

/// Writes every element of `out` (as long as `gate` and `up`).
#[inline(always)]
fn silu_mul_slice(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(g / (1.0 + exp(-g)) * u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_slice_avx2(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    silu_mul_slice(gate, up, out);
}

fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { silu_mul_slice_avx2(gate, up, out) };
        }
    }
    silu_mul_slice(gate, up, out);
}

/// `silu(gate) * up` for same-shaped f32 tensors on the CPU; `None` elsewhere (the caller
/// then takes candle's ops).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
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
            .for_each(|(o, (g, u))| silu_mul_chunk(g, u, o));
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

    #[test]
    fn matches_candle_silu_times_up() {
        let dev = Device::Cpu;
        // Odd length (no multiple of any vector width), large and small values.
        let gate = Tensor::arange(-2003i64, 2000, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.05, 0.0)
            .unwrap();
        let up = gate.cos().unwrap();
        let ours: Vec<f32> = silu_mul(&gate, &up)
            .unwrap()
            .expect("f32 CPU takes this path")
            .to_vec1()
            .unwrap();
        let candle: Vec<f32> = (gate.silu().unwrap() * &up).unwrap().to_vec1().unwrap();
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
        let half = gate.to_dtype(DType::BF16).unwrap();
        assert!(silu_mul(&half, &half).unwrap().is_none());
    }
}
