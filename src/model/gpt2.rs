//! GPT-2's projections are Conv1D layers: `y = x W + b` with `W` stored `[in, out]`, the
//! transpose of a Linear's. `c_attn` holds the query, key and value projections side by
//! side (`[hidden, 3 * hidden]`; transformers splits its output in three). Transposed and
//! cut at load, they serve as the decoder's Llama-shaped projections.

use candle_core::Result;
use candle_nn::VarBuilder;

use super::dense::Dense;

/// A Conv1D layer (`weight` `[in, out]`, `bias` `[out]`) as a dense layer.
pub fn conv1d(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Dense> {
    let weight = vb.get((inputs, outputs), "weight")?.t()?.contiguous()?;
    Ok(Dense::new(weight, Some(vb.get(outputs, "bias")?)))
}

/// The query, key and value projections of `c_attn`.
pub fn split_c_attn(vb: VarBuilder, hidden: usize) -> Result<[Dense; 3]> {
    let weight = vb.get((hidden, 3 * hidden), "weight")?;
    let bias = vb.get(3 * hidden, "bias")?;
    let part = |j: usize| -> Result<Dense> {
        let w = weight.narrow(1, j * hidden, hidden)?.t()?.contiguous()?;
        let b = bias.narrow(0, j * hidden, hidden)?.contiguous()?;
        Ok(Dense::new(w, Some(b)))
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module, Tensor};
    use std::collections::HashMap;

    /// Each projection's output is the third of `x W + b` transformers takes for it.
    #[test]
    fn c_attn_is_cut_in_three_and_transposed() -> Result<()> {
        let hidden = 4;
        let device = Device::Cpu;
        let weight = Tensor::arange(0f32, (3 * hidden * hidden) as f32, &device)?
            .reshape((hidden, 3 * hidden))?
            .affine(0.01, -0.2)?;
        let bias = Tensor::arange(0f32, (3 * hidden) as f32, &device)?.affine(0.1, -0.5)?;
        let tensors = HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let parts = split_c_attn(vb, hidden)?;
        let x = Tensor::arange(0f32, (3 * hidden) as f32, &device)?
            .reshape((3, hidden))?
            .affine(0.3, -1.0)?;
        let fused = x.matmul(&weight)?.broadcast_add(&bias)?;
        for (j, part) in parts.iter().enumerate() {
            let expected = fused.narrow(1, j * hidden, hidden)?;
            let diff = (part.forward(&x)? - expected)?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-6, "part {j}");
        }
        Ok(())
    }
}
