//! A dense (fully connected) layer, `y = x W^T + b`, with a CPU f32 path that calls the
//! matmul directly.
//!
//! candle's matmul zero-fills its output before the GEMM overwrites it, and the bias (and
//! a residual, where one follows) is then added in separate passes over the output. On the
//! CPU, for f32 rows `[t, in]`, this layer starts the output from the bias (plus the
//! residual) and lets the GEMM accumulate into it: one pass over the output instead of
//! three. Other devices, dtypes and shapes take candle's path; both compute the same sums.

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Dense {
    /// `[out, in]`, as checkpoints store it.
    weight: Tensor,
    /// `[out]`.
    bias: Option<Tensor>,
}

impl Dense {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A layer of tensors already at hand (`weight` `[out, in]`, `bias` `[out]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `x W^T + b + residual`; `residual` has the output's shape.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.cpu_f32(x, Some(residual))? {
            return Ok(y);
        }
        self.candle_forward(x)? + residual
    }

    fn candle_forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        // As candle_nn::Linear: a batched input multiplies W broadcast over the batch.
        let y = match x.dims() {
            [b, _, _] => x.matmul(&w.broadcast_left(*b)?)?,
            _ => x.matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The direct path, or `None` where it does not apply (not CPU, not f32, not 2-D).
    fn cpu_f32(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
            || x.rank() != 2
        {
            return Ok(None);
        }
        let (rows, in_dim) = x.dims2()?;
        let (out_dim, w_in) = self.weight.dims2()?;
        if in_dim != w_in {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: self.weight.shape().clone(),
                op: "dense",
            }
            .bt());
        }
        if let Some(r) = residual {
            if r.dims() != [rows, out_dim] || r.dtype() != DType::F32 {
                return Ok(None);
            }
        }
        let x = x.contiguous()?;
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let out = {
            let (x_store, x_layout) = x.storage_and_layout();
            let (w_store, w_layout) = self.weight.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(xs)), Storage::Cpu(CpuStorage::F32(ws))) =
                (&*x_store, &*w_store)
            else {
                return Ok(None);
            };
            if !w_layout.is_contiguous() {
                return Ok(None);
            }
            let xs = &xs[x_layout.start_offset()..][..rows * in_dim];
            let ws = &ws[w_layout.start_offset()..][..out_dim * in_dim];
            let start = match &residual {
                Some(r) => {
                    let (r_store, r_layout) = r.storage_and_layout();
                    let Storage::Cpu(CpuStorage::F32(rs)) = &*r_store else {
                        return Ok(None);
                    };
                    let rs = &rs[r_layout.start_offset()..][..rows * out_dim];
                    Some(match &bias {
                        Some(bias) => rs
                            .chunks_exact(out_dim)
                            .flat_map(|row| row.iter().zip(bias).map(|(r, b)| r + b))
                            .collect(),
                        None => rs.to_vec(),
                    })
                }
                None => bias.map(|bias| bias.repeat(rows)),
            };
            gemm_rows(xs, ws, rows, in_dim, out_dim, start)
        };
        Tensor::from_vec(out, (rows, out_dim), &Device::Cpu).map(Some)
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.cpu_f32(x, None)? {
            return Ok(y);
        }
        self.candle_forward(x)
    }
}

/// `start + x W^T` for row-major `x: [rows, in_dim]` and `w: [out_dim, in_dim]`; with no
/// `start` the output is the product alone.
fn gemm_rows(
    x: &[f32],
    w: &[f32],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    start: Option<Vec<f32>>,
) -> Vec<f32> {
    let len = rows * out_dim;
    let read_dst = start.is_some();
    let mut out = start.unwrap_or_else(|| Vec::with_capacity(len));
    debug_assert!(out.capacity() >= len);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `out` holds at least rows * out_dim elements of capacity; gemm writes every
    // element of the row-major [rows, out_dim] destination (reading it first only when
    // `read_dst`, in which case all of it is initialized). `x` and `w` hold rows * in_dim
    // and out_dim * in_dim elements, read with the strides given.
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            read_dst,
            x.as_ptr(),
            1,
            in_dim as isize,
            // W^T: element (k, j) is w[j * in_dim + k].
            w.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, seeded};

    fn candle_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.matmul(&w.t().unwrap()).unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    #[test]
    fn direct_path_matches_candle_matmul_with_and_without_bias_and_residual() {
        let dev = Device::Cpu;
        // Odd sizes so no kernel tail is skipped.
        for (rows, in_dim, out_dim) in [(1, 3, 5), (7, 33, 17), (65, 384, 129)] {
            let x = Tensor::from_vec(seeded(rows * in_dim, 1), (rows, in_dim), &dev).unwrap();
            let w = Tensor::from_vec(seeded(out_dim * in_dim, 2), (out_dim, in_dim), &dev).unwrap();
            let b = Tensor::from_vec(seeded(out_dim, 3), out_dim, &dev).unwrap();
            let r = Tensor::from_vec(seeded(rows * out_dim, 4), (rows, out_dim), &dev).unwrap();
            for bias in [None, Some(&b)] {
                let dense = Dense::new(w.clone(), bias.cloned());
                let want = candle_reference(&x, &w, bias);
                let got = dense.forward(&x).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "{rows}x{in_dim}x{out_dim}");
                let got = dense.forward_add(&x, &r).unwrap();
                let want = (want + &r).unwrap();
                assert!(
                    max_diff(&got, &want) < 1e-5,
                    "{rows}x{in_dim}x{out_dim} + r"
                );
            }
        }
    }

    #[test]
    fn non_contiguous_input_and_3d_input_take_a_correct_path() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(seeded(6 * 4, 5), (4, 6), &dev)
            .unwrap()
            .t()
            .unwrap();
        let w = Tensor::from_vec(seeded(3 * 4, 6), (3, 4), &dev).unwrap();
        let dense = Dense::new(w.clone(), None);
        let want = candle_reference(&x.contiguous().unwrap(), &w, None);
        assert!(max_diff(&dense.forward(&x).unwrap(), &want) < 1e-6);
        let x3 = x.contiguous().unwrap().unsqueeze(0).unwrap();
        let got = dense.forward(&x3).unwrap().squeeze(0).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }
}
