//! GPT-NeoX's fused attention projection (Pythia, and the reward models TRL trains on it):
//! `query_key_value` `[3 * hidden, hidden]` holds, head after head, that head's query, key
//! and value rows (transformers views its output as `[heads, 3 * head_dim]`). Cut at load
//! into three projections laid out as Llama's, the decoder's paths serve it unchanged.

use candle_core::Result;
use candle_nn::VarBuilder;

use super::dense::Dense;

/// The query, key and value projections of `vb`'s `weight` (and `bias`).
pub fn split_qkv(
    vb: VarBuilder,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    bias: bool,
) -> Result<[Dense; 3]> {
    let width = heads * head_dim;
    let weight = vb
        .get((3 * width, hidden), "weight")?
        .reshape((heads, 3, head_dim, hidden))?;
    let bias = if bias {
        Some(vb.get(3 * width, "bias")?.reshape((heads, 3, head_dim))?)
    } else {
        None
    };
    let part = |j: usize| -> Result<Dense> {
        let w = weight.narrow(1, j, 1)?.reshape((width, hidden))?;
        let b = match &bias {
            Some(b) => Some(b.narrow(1, j, 1)?.reshape(width)?),
            None => None,
        };
        Ok(Dense::new(
            w.contiguous()?,
            b.map(|b| b.contiguous()).transpose()?,
        ))
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module, Tensor};
    use std::collections::HashMap;

    /// Each projection's output is the slice of the fused one transformers reads for it.
    #[test]
    fn the_fused_rows_are_cut_head_by_head() -> Result<()> {
        let (hidden, heads, head_dim) = (6, 2, 3);
        let device = Device::Cpu;
        let weight = Tensor::arange(0f32, (3 * hidden * hidden) as f32, &device)?
            .reshape((3 * hidden, hidden))?
            .affine(0.01, -0.3)?;
        let bias = Tensor::arange(0f32, (3 * hidden) as f32, &device)?.affine(0.1, -1.0)?;
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let [q, k, v] = split_qkv(vb, hidden, heads, head_dim, true)?;
        let x = Tensor::arange(0f32, (2 * hidden) as f32, &device)?
            .reshape((2, hidden))?
            .affine(0.2, -0.5)?;
        let fused = x
            .matmul(&weight.t()?)?
            .broadcast_add(&bias)?
            .reshape((2, heads, 3, head_dim))?;
        for (j, part) in [q, k, v].iter().enumerate() {
            let expected = fused.narrow(2, j, 1)?.reshape((2, heads * head_dim))?;
            let diff = (part.forward(&x)? - expected)?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-6, "part {j}");
        }
        Ok(())
    }
}
