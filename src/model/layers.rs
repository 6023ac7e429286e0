//! Pieces shared by the architectures: loading helpers, norms, rotary embeddings, masks
//! and attention.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use rayon::prelude::*;

use super::dense::Dense;

pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Dense> {
    Dense::load(vb, in_dim, out_dim, bias)
}

pub fn embedding(vb: VarBuilder, count: usize, dim: usize) -> Result<Embedding> {
    candle_nn::embedding(count, dim, vb)
}

/// A LayerNorm stored as `weight`/`bias`, or as `gamma`/`beta` in older BERT checkpoints
/// (transformers renames those on load).
pub fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    let (w, b) = if vb.contains_tensor("weight") {
        ("weight", "bias")
    } else {
        ("gamma", "beta")
    };
    let weight = vb.get(size, w)?;
    let bias = vb.get(size, b)?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// RMSNorm. Llama-style multiplies by the weight; Gemma-style by (1 + weight), all in f32
/// and rounded once, as transformers' Gemma2RMSNorm does (a (1 + weight) rounded to bf16
/// would add up to 2^-9 of error per channel, systematically).
pub struct RmsNorm {
    /// f32 for Gemma-style norms, so a half-type input is normalized in f32.
    scale: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64, plus_one: bool) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let scale = if plus_one {
            (weight.to_dtype(DType::F32)? + 1.0)?
        } else {
            weight
        };
        Ok(Self {
            scale,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.scale.dtype() != x.dtype() {
            let wide = x.to_dtype(DType::F32)?;
            return candle_nn::ops::rms_norm(&wide, &self.scale, self.eps)?.to_dtype(x.dtype());
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.scale, self.eps)
    }
}

/// A decoder's norm: RMSNorm (Llama and its kin) or LayerNorm with a bias (GPT-NeoX).
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Rms(norm) => norm.forward(x),
            Self::Layer(norm) => candle_core::Module::forward(norm, x),
        }
    }
}

/// Rotary position embedding tables (the rotate-half layout transformers uses). A table of
/// fewer frequencies than half a head rotates the head's first `2 * frequencies` channels
/// and passes the rest through (GPT-NeoX's `rotary_pct`).
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// `inv_freq` as the model's config defines it (already scaled), `positions` rows.
    pub fn new(inv_freq: &[f32], positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        // Computed in f32 like transformers (position * inv_freq, then cos/sin).
        let half = inv_freq.len();
        let mut freqs = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv_freq {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (positions, half), device)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates packed rows `x: [rows, heads * head_dim]`, row `r` being at `positions[r]`,
    /// on the CPU in f32 (one pass, no padded layout). `None` where that does not apply.
    pub fn apply_packed(
        &self,
        x: &Tensor,
        head_dim: usize,
        positions: &[usize],
    ) -> Result<Option<Tensor>> {
        let (rows, width) = x.dims2()?;
        let (table_rows, half) = self.cos.dims2()?;
        let usable = matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && self.cos.dtype() == DType::F32
            && half > 0
            && head_dim >= 2 * half
            && width % head_dim == 0
            && positions.len() == rows
            && positions.iter().all(|&p| p < table_rows);
        if !usable {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (cos, sin) = (self.cos.contiguous()?, self.sin.contiguous()?);
        let out = {
            let (xs, _) = x.storage_and_layout();
            let (cs, _) = cos.storage_and_layout();
            let (ss, _) = sin.storage_and_layout();
            let (Some(xs), Some(cs), Some(ss)) =
                (cpu_f32(&x, &xs), cpu_f32(&cos, &cs), cpu_f32(&sin, &ss))
            else {
                return Ok(None);
            };
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(width)
                .zip(xs.par_chunks(width))
                .zip(positions.par_iter())
                .for_each(|((out_row, row), &p)| {
                    let (cos, sin) = (&cs[p * half..][..half], &ss[p * half..][..half]);
                    // rotate-half, per head: (a, b) -> (a cos - b sin, b cos + a sin);
                    // channels past the rotated ones pass through.
                    for (o, x) in out_row
                        .chunks_exact_mut(head_dim)
                        .zip(row.chunks_exact(head_dim))
                    {
                        let (rotated, passed) = x.split_at(2 * half);
                        let (o, o_passed) = o.split_at_mut(2 * half);
                        o_passed.copy_from_slice(passed);
                        let (a, b) = rotated.split_at(half);
                        let (oa, ob) = o.split_at_mut(half);
                        for j in 0..half {
                            oa[j] = a[j] * cos[j] - b[j] * sin[j];
                            ob[j] = b[j] * cos[j] + a[j] * sin[j];
                        }
                    }
                });
            out
        };
        Tensor::from_vec(out, (rows, width), &Device::Cpu).map(Some)
    }

    /// Rotates `x` of shape [batch, heads, seq, head_dim].
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        partially(x, 2 * self.cos.dim(1)?, |r| {
            candle_nn::rotary_emb::rope(&r.contiguous()?, &cos, &sin)
        })
    }

    /// The tables' rows at `positions` (`[rows]`, u32): rotates packed rows on any device.
    pub fn at(&self, positions: &Tensor) -> Result<RowRotation> {
        Ok(RowRotation {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
        })
    }
}

/// Rotary tables gathered for packed rows, one position per row.
pub struct RowRotation {
    cos: Tensor,
    sin: Tensor,
}

impl RowRotation {
    /// Rotates packed rows `[rows, heads * head_dim]` (the same arithmetic as
    /// [`Rotary::apply`] on the padded layout).
    pub fn apply(&self, x: &Tensor, head_dim: usize) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let x = x.reshape((1, rows, width / head_dim, head_dim))?;
        partially(&x, 2 * self.cos.dim(1)?, |r| {
            candle_nn::rotary_emb::rope_thd(&r.contiguous()?, &self.cos, &self.sin)
        })?
        .reshape((rows, width))
    }
}

/// `rotate` applied to the first `rotated` channels of `x`'s last axis, the others passed
/// through unchanged.
fn partially(
    x: &Tensor,
    rotated: usize,
    rotate: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)?;
    if rotated >= width {
        return rotate(x);
    }
    let last = x.rank() - 1;
    let turned = rotate(&x.narrow(last, 0, rotated)?)?;
    Tensor::cat(&[&turned, &x.narrow(last, rotated, width - rotated)?], last)
}

/// The f32 elements of a contiguous CPU tensor, from its storage.
pub(super) fn cpu_f32<'a>(t: &Tensor, storage: &'a Storage) -> Option<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(all)) = storage else {
        return None;
    };
    let start = t.layout().start_offset();
    all.get(start..start + t.elem_count())
}

/// Additive [seq, seq] mask for causal attention, optionally limited to a sliding window
/// of `window` keys (the query itself included), as transformers' Mistral and Gemma2 mask
/// keys with `key <= query - window`.
pub fn causal_mask(seq: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    // Built where it is used, from positions (exact in f32 below 2^24): filled on the host,
    // an s x s mask cost a loop and an upload per forward pass on a GPU.
    let positions = Tensor::arange(0f32, seq as f32, device)?;
    let distance = positions
        .reshape((seq, 1))?
        .broadcast_sub(&positions.reshape((1, seq))?)?;
    let seen = distance.ge(0f64)?;
    let seen = match window {
        Some(w) => seen.mul(&distance.lt(w as f64)?)?,
        None => seen,
    };
    additive(&seen)
}

/// 0 where `seen` (u8) is set, -inf elsewhere, in f32.
pub(super) fn additive(seen: &Tensor) -> Result<Tensor> {
    let shape = seen.shape();
    let zero = Tensor::zeros((), DType::F32, seen.device())?.broadcast_as(shape)?;
    let hidden = Tensor::new(f32::NEG_INFINITY, seen.device())?.broadcast_as(shape)?;
    seen.where_cond(&zero, &hidden)
}

/// Additive [batch, 1, 1, seq] mask hiding padded keys from every query.
pub fn padding_mask(lengths: &[usize], seq: usize, device: &Device) -> Result<Tensor> {
    let mut mask = vec![0f32; lengths.len() * seq];
    for (b, &len) in lengths.iter().enumerate() {
        for k in len..seq {
            mask[b * seq + k] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(mask, (lengths.len(), 1, 1, seq), device)
}

/// Scaled dot-product attention. q: [b, heads, s, d]; k, v: [b, kv_heads, s, d] (repeated
/// for grouped-query attention); `mask` is added to the scores (broadcast) in f32 and the
/// softmax runs in f32, as transformers' eager attention does. `softcap` applies Gemma2's
/// tanh capping to the scaled scores. Returns [b, s, heads * d].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    attention_in_chunks(q, k, v, mask, scale, softcap, SCORES_PER_CHUNK)
}

/// The most f32 scores one attention step holds (1 GiB). candle's CUDA softmax indexes
/// with a 32-bit int and its element-wise kernels count in u32, so a `[b, heads, s, t]`
/// score tensor past 2^31 elements (16k batch tokens of 4k-token inputs, 32 heads) would
/// fault; the queries are split to stay under it, which also bounds the memory.
const SCORES_PER_CHUNK: usize = 1 << 28;

/// [`attention`] over query rows in chunks of at most `limit` scores (one row at least):
/// each query's softmax is over its own row, so the chunks' outputs are the same rows.
fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    limit: usize,
) -> Result<Tensor> {
    let (b, heads, s, _) = q.dims4()?;
    let t = k.dim(2)?;
    let rows = (limit / (b * heads * t).max(1)).max(1);
    if s <= rows {
        return attention_rows(q, k, v, mask, scale, softcap);
    }
    let (k, v) = (
        repeat_kv(k, heads / k.dim(1)?)?,
        repeat_kv(v, heads / v.dim(1)?)?,
    );
    // The mask's query axis (second to last) is either s long or broadcast.
    let mask_rows = mask
        .rank()
        .checked_sub(2)
        .filter(|&a| mask.dim(a).ok() == Some(s));
    let mut outputs = Vec::with_capacity(s.div_ceil(rows));
    for start in (0..s).step_by(rows) {
        let len = rows.min(s - start);
        let mask = match mask_rows {
            Some(axis) => mask.narrow(axis, start, len)?,
            None => mask.clone(),
        };
        let q = q.narrow(2, start, len)?;
        outputs.push(attention_rows(&q, &k, &v, &mask, scale, softcap)?);
    }
    Tensor::cat(&outputs, 1)
}

fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let v = repeat_kv(v, heads / v.dim(1)?)?;
    let scores = capped_scores(q, k, scale, softcap)?;
    let dtype = scores.dtype();
    let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, s, heads * d))
}

/// Scaled (and capped) attention scores in the inputs' dtype: q `[b, heads, s, d]`, k
/// `[b, kv_heads, t, d]` -> `[b, heads, s, t]`.
pub fn capped_scores(q: &Tensor, k: &Tensor, scale: f64, softcap: Option<f64>) -> Result<Tensor> {
    let k = repeat_kv(k, q.dim(1)? / k.dim(1)?)?;
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    match softcap {
        Some(cap) => (scores / cap)?.tanh()? * cap,
        None => Ok(scores),
    }
}

/// [b, kv_heads, s, d] -> [b, kv_heads * n, s, d], each kv head used by n query heads.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n, s, d))?
        .reshape((b, kv * n, s, d))
}

/// [b, s, heads * d] -> [b, heads, s, d].
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    x.reshape((b, s, heads, head_dim))?.transpose(1, 2)
}

/// The real tokens of a padded batch as packed rows `[t, h]`: the dense work (projections,
/// MLP, norms: nearly all the FLOPs) runs on these alone, and only attention sees the
/// padded layout `[b, s, h]`, rebuilt from them. Without padding both are reshapes.
pub struct Packing {
    /// Flat `b * s` position of each real token, sequence by sequence (None: no padding).
    real: Option<Tensor>,
    /// Packed row each padded position reads (padding reads its sequence's first token; the
    /// mask hides it).
    padded: Option<Tensor>,
    /// Packed row of each sequence's first token.
    first: Tensor,
    /// Packed row of each sequence's last token.
    last: Tensor,
    batch: usize,
    seq_len: usize,
}

impl Packing {
    pub fn new(lengths: &[usize], seq_len: usize, device: &Device) -> Result<Self> {
        let batch = lengths.len();
        let total: usize = lengths.iter().sum();
        let last_row = total.saturating_sub(1) as u32;
        let mut first = Vec::with_capacity(batch);
        let mut last = Vec::with_capacity(batch);
        let (real, padded) =
            if lengths.iter().all(|&l| l == seq_len) {
                first.extend((0..batch).map(|b| (b * seq_len) as u32));
                last.extend((0..batch).map(|b| ((b + 1) * seq_len).saturating_sub(1) as u32));
                (None, None)
            } else {
                let mut real = Vec::with_capacity(total);
                let mut padded = Vec::with_capacity(batch * seq_len);
                let mut start = 0u32;
                for (b, &len) in lengths.iter().enumerate() {
                    // An empty sequence has no row of its own (encoding refuses those anyway).
                    let own_first = start.min(last_row);
                    first.push(own_first);
                    last.push((start + len as u32).saturating_sub(1).min(last_row));
                    real.extend((0..len).map(|p| (b * seq_len + p) as u32));
                    padded.extend((0..seq_len).map(|p| {
                        if p < len {
                            start + p as u32
                        } else {
                            own_first
                        }
                    }));
                    start += len as u32;
                }
                (
                    Some(Tensor::from_vec(real, total, device)?),
                    Some(Tensor::from_vec(padded, batch * seq_len, device)?),
                )
            };
        Ok(Self {
            real,
            padded,
            first: Tensor::from_vec(first, batch, device)?,
            last: Tensor::from_vec(last, batch, device)?,
            batch,
            seq_len,
        })
    }

    /// `[b, s, ...]` -> the real rows `[t, ...]`.
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let mut flat = vec![self.batch * self.seq_len];
        flat.extend_from_slice(&x.dims()[2..]);
        let x = x.reshape(flat)?;
        match &self.real {
            Some(real) => x.index_select(real, 0),
            None => Ok(x),
        }
    }

    /// Packed rows `[t, h]` -> `[b, s, h]` (padding filled with a real row: mask it).
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dim(1)?;
        let x = match &self.padded {
            Some(padded) => x.index_select(padded, 0)?,
            None => x.clone(),
        };
        x.reshape((self.batch, self.seq_len, h))
    }

    /// Each sequence's first row: `[t, h]` -> `[b, h]`.
    pub fn first_rows(&self, x: &Tensor) -> Result<Tensor> {
        x.index_select(&self.first, 0)
    }

    /// Each sequence's last real row: `[t, h]` -> `[b, h]`.
    pub fn last_rows(&self, x: &Tensor) -> Result<Tensor> {
        x.index_select(&self.last, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, seeded};
    use super::*;

    /// Chunked attention gives the rows of the whole, for a causal [s, s] mask (narrowed
    /// per chunk), a [b, 1, 1, t] padding mask (broadcast), grouped-query heads and a cap.
    #[test]
    fn attention_in_chunks_matches_one_pass() {
        let dev = Device::Cpu;
        let (b, heads, kv_heads, s, d) = (2, 4, 2, 7, 8);
        let q = Tensor::from_vec(seeded(b * heads * s * d, 1), (b, heads, s, d), &dev).unwrap();
        let k =
            Tensor::from_vec(seeded(b * kv_heads * s * d, 2), (b, kv_heads, s, d), &dev).unwrap();
        let v =
            Tensor::from_vec(seeded(b * kv_heads * s * d, 3), (b, kv_heads, s, d), &dev).unwrap();
        let causal = causal_mask(s, Some(4), &dev).unwrap();
        let padding = padding_mask(&[s, 5], s, &dev).unwrap();
        for mask in [&causal, &padding] {
            for softcap in [None, Some(5.0)] {
                let whole = attention_rows(&q, &k, &v, mask, 0.3, softcap).unwrap();
                // 1 row, 3 rows (a short last chunk) and all rows per chunk.
                for rows in [1, 3, s] {
                    let limit = rows * b * heads * s;
                    let chunked =
                        attention_in_chunks(&q, &k, &v, mask, 0.3, softcap, limit).unwrap();
                    assert_eq!(chunked.dims(), whole.dims());
                    let gap = max_diff(&chunked, &whole);
                    assert!(gap < 1e-6, "{rows} rows per chunk: gap {gap}");
                }
            }
        }
    }

    #[test]
    fn packing_round_trips_real_rows_and_finds_first_rows() {
        let dev = Device::Cpu;
        let lengths = [3usize, 1, 2];
        let (b, s, h) = (3, 3, 2);
        let x = Tensor::arange(0f32, (b * s * h) as f32, &dev)
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        let packing = Packing::new(&lengths, s, &dev).unwrap();
        let packed = packing.pack(&x).unwrap();
        let rows: Vec<Vec<f32>> = packed.to_vec2().unwrap();
        // Sequence 0: all 3 rows; sequence 1: its first row; sequence 2: its first 2 rows.
        let want: Vec<Vec<f32>> = [0, 1, 2, 3, 6, 7]
            .iter()
            .map(|&r| vec![(2 * r) as f32, (2 * r + 1) as f32])
            .collect();
        assert_eq!(rows, want);
        let back: Vec<Vec<Vec<f32>>> = packing.unpack(&packed).unwrap().to_vec3().unwrap();
        let original: Vec<Vec<Vec<f32>>> = x.to_vec3().unwrap();
        for (bi, &len) in lengths.iter().enumerate() {
            assert_eq!(back[bi][..len], original[bi][..len]);
        }
        let first: Vec<Vec<f32>> = packing.first_rows(&packed).unwrap().to_vec2().unwrap();
        assert_eq!(first, vec![vec![0., 1.], vec![6., 7.], vec![12., 13.]]);
        let last: Vec<Vec<f32>> = packing.last_rows(&packed).unwrap().to_vec2().unwrap();
        assert_eq!(last, vec![vec![4., 5.], vec![6., 7.], vec![14., 15.]]);
        // No padding: plain reshapes.
        let dense = Packing::new(&[3, 3, 3], 3, &dev).unwrap();
        assert_eq!(dense.pack(&x).unwrap().dims(), &[9, 2]);
        let first: Vec<Vec<f32>> = dense
            .first_rows(&dense.pack(&x).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(first, vec![vec![0., 1.], vec![6., 7.], vec![12., 13.]]);
    }

    /// The device-built mask against the rule written out: key k is hidden from query q
    /// when k > q or, with a window w, when k + w <= q.
    #[test]
    fn causal_mask_matches_the_rule() {
        for seq in [1usize, 2, 7] {
            for window in [None, Some(1), Some(3), Some(10)] {
                let got: Vec<Vec<f32>> = causal_mask(seq, window, &Device::Cpu)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                for (q, row) in got.iter().enumerate() {
                    for (k, &v) in row.iter().enumerate() {
                        let hidden = k > q || window.is_some_and(|w| k + w <= q);
                        let want = if hidden { f32::NEG_INFINITY } else { 0.0 };
                        assert_eq!(v, want, "seq {seq}, window {window:?}, q {q}, k {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn sliding_window_keeps_window_keys_including_the_query() {
        let m = causal_mask(5, Some(2), &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let allowed: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(k, _)| k)
                    .collect()
            })
            .collect();
        assert_eq!(
            allowed,
            vec![vec![0], vec![0, 1], vec![1, 2], vec![2, 3], vec![3, 4]]
        );
    }
}
