//! Attention straight on packed rows, on the CPU in f32.
//!
//! The general path (`layers::attention`) rebuilds the padded layout `[b, heads, s, d]`
//! from the packed rows, copies K and V once per query head for grouped-query attention,
//! materializes and adds a mask, runs the softmax over every key (masked ones included),
//! and packs the result again: memory passes that cost about as much as the attention
//! FLOPs. Here each (sequence, head) pair is one task on the packed rows as the
//! projections wrote them: two GEMMs that read Q, K and V in place through strides (a
//! query head reads its KV head directly), and a softmax over the keys each query may see
//! only, in f32 as transformers' eager attention does. Masked keys get probability 0
//! exactly, as `exp(-inf)` does there.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::layers::cpu_f32;
use super::vexp::{exp, tanh};

/// Whether attention runs on packed rows for tensors on `device` in `dtype`: on the CPU in
/// f32. Elsewhere the models take the padded layout.
pub fn applies(device: &Device, dtype: DType) -> bool {
    #[cfg(test)]
    if tests::PADDED_ONLY.with(std::cell::Cell::get) {
        return false;
    }
    matches!(device, Device::Cpu) && dtype == DType::F32
}

/// The error for input that [`attend`] or `Rotary::apply_packed` refused where
/// [`applies`] had said they would take it: a bug, not a user's mistake.
pub fn refused() -> candle_core::Error {
    candle_core::Error::Msg("attention on packed rows refused its input".into())
}

/// Which keys a query at position `p` of a sequence of `len` tokens sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpan {
    /// Every token of its sequence (encoders).
    All,
    /// Tokens `0..=p`, or the last `window` of them (decoders; sliding-window layers).
    Causal { window: Option<usize> },
}

impl KeySpan {
    fn range(self, p: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            KeySpan::All => 0..len,
            KeySpan::Causal { window } => {
                let end = (p + 1).min(len);
                let start = window.map_or(0, |w| end.saturating_sub(w));
                start..end
            }
        }
    }
}

/// Which rows the queries are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queries {
    /// Every packed row: q is `[t, heads * d]`.
    Every,
    /// One row per sequence, its first token: q is `[b, heads * d]` (encoders' last layer).
    First,
    /// One row per sequence, its last token: q is `[b, heads * d]` (decoders' last layer).
    Last,
}

/// Shape and scaling of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Gemma2's `tanh(x / cap) * cap` on the scaled scores.
    pub softcap: Option<f32>,
    pub keys: KeySpan,
}

/// Attention of `q` over `k`, `v` (`[t, kv_heads * d]`, packed rows of sequences of
/// `lengths`), returning one row `[heads * d]` per query row. `None` where this path does
/// not apply (not CPU, not f32, or a shape it does not handle); the caller then takes the
/// general path.
pub fn attend(
    spec: &Spec,
    lengths: &[usize],
    queries: Queries,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Option<Tensor>> {
    let (heads, kv_heads, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    if kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
        return Ok(None);
    }
    let total: usize = lengths.iter().sum();
    let q_rows = match queries {
        Queries::Every => total,
        Queries::First | Queries::Last => lengths.len(),
    };
    let shapes_fit = q.dims() == [q_rows, heads * d]
        && k.dims() == [total, kv_heads * d]
        && v.dims() == [total, kv_heads * d];
    let all_f32_cpu = [q, k, v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu));
    if !shapes_fit || !all_f32_cpu {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = {
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (Some(qs), Some(ks), Some(vs)) = (cpu_f32(&q, &qs), cpu_f32(&k, &ks), cpu_f32(&v, &vs))
        else {
            return Ok(None);
        };
        attend_slices(spec, lengths, queries, qs, ks, vs)
    };
    Tensor::from_vec(out, (q_rows, heads * d), &Device::Cpu).map(Some)
}

/// A destination shared by tasks that each write their own disjoint elements.
struct Shared(*mut f32);
// SAFETY: tasks write disjoint (row, head) blocks of the buffer; see `attend_slices`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element at `offset`.
    ///
    /// # Safety
    /// `offset` is inside the buffer, and no other task writes what the caller writes there.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// `attend` on checked slices: `q` holds the query rows, `k` and `v` `total` rows each.
fn attend_slices(
    spec: &Spec,
    lengths: &[usize],
    queries: Queries,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let (heads, kv_heads, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    let group = heads / kv_heads;
    let (q_stride, kv_stride) = (heads * d, kv_heads * d);
    let starts: Vec<usize> = lengths
        .iter()
        .scan(0, |start, &len| {
            let here = *start;
            *start += len;
            Some(here)
        })
        .collect();
    let q_rows = q.len() / q_stride;
    let mut out: Vec<f32> = Vec::with_capacity(q_rows * q_stride);
    let dst = Shared(out.as_mut_ptr());
    (0..lengths.len() * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let (len, start) = (lengths[b], starts[b]);
        // The first query row, its position in the sequence, and how many there are.
        let (row, first_pos, count) = match queries {
            Queries::Every => (start, 0, len),
            Queries::First => (b, 0, 1),
            Queries::Last => (b, len.saturating_sub(1), 1),
        };
        // SAFETY: this task alone writes columns h*d..(h+1)*d of rows row..row+count.
        let out_block = unsafe { dst.at(row * q_stride + h * d) };
        if len == 0 {
            // No keys (encoding refuses empty inputs; kept defined all the same).
            for r in 0..count {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(out_block.add(r * q_stride), 0, d) };
            }
            return;
        }
        let kv_col = (h / group) * d;
        let k_block = &k[start * kv_stride + kv_col..];
        let v_block = &v[start * kv_stride + kv_col..];
        let q_block = &q[row * q_stride + h * d..];
        // Left uninitialized: the first GEMM writes every element.
        let mut scores: Vec<f32> = Vec::with_capacity(count * len);
        // SAFETY (both calls): every pointer addresses `count`/`len` rows of `d` (or
        // `len`) elements inside its slice or the output, read with the strides given;
        // gemm writes all count x len (count x d) destination elements, so `scores` is
        // initialized once the first returns.
        unsafe {
            // scores = scale * Q K^T; K^T's element (c, j) is k_block[j * kv_stride + c].
            gemm::gemm(
                count,
                len,
                d,
                scores.as_mut_ptr(),
                1,
                len as isize,
                false,
                q_block.as_ptr(),
                1,
                q_stride as isize,
                k_block.as_ptr(),
                kv_stride as isize,
                1,
                0.0,
                spec.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            scores.set_len(count * len);
        }
        for (i, row_scores) in scores.chunks_exact_mut(len).enumerate() {
            softmax_span(
                row_scores,
                spec.keys.range(first_pos + i, len),
                spec.softcap,
            );
        }
        unsafe {
            // out = P V, straight into this head's columns of the output rows.
            gemm::gemm(
                count,
                d,
                len,
                out_block,
                1,
                q_stride as isize,
                false,
                scores.as_ptr(),
                1,
                len as isize,
                v_block.as_ptr(),
                1,
                kv_stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    // SAFETY: the tasks wrote every element: each (query row, head) block belongs to
    // exactly one task (its sequence's), which fills it by gemm or with zeros.
    unsafe { out.set_len(q_rows * q_stride) };
    out
}

/// Softmax of `row[span]` in place (after Gemma2's capping), zero elsewhere.
fn softmax_span(row: &mut [f32], span: std::ops::Range<usize>, softcap: Option<f32>) {
    softmax_row(&mut row[span.clone()], softcap);
    row[..span.start].fill(0.0);
    row[span.end..].fill(0.0);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(xs: &mut [f32], softcap: Option<f32>) {
    softmax(xs, softcap);
}

fn softmax_row(xs: &mut [f32], softcap: Option<f32>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { softmax_avx2(xs, softcap) };
        }
    }
    softmax(xs, softcap);
}

/// Softmax in place (after Gemma2's capping), in loops the compiler vectorizes. Terms
/// below e^-80 of the largest are 0: as libm's subnormal results they would add nothing,
/// and slow the GEMM after.
#[inline(always)]
fn softmax(xs: &mut [f32], softcap: Option<f32>) {
    if let Some(cap) = softcap {
        for x in xs.iter_mut() {
            *x = tanh(*x / cap) * cap;
        }
    }
    let max = fold_lanes(xs, f32::NEG_INFINITY, f32::max);
    for x in xs.iter_mut() {
        let shifted = *x - max;
        *x = if shifted < -80.0 { 0.0 } else { exp(shifted) };
    }
    let sum = fold_lanes(xs, 0.0, |a, b| a + b);
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

/// `xs` folded with `f` in eight interleaved lanes (so that the loop vectorizes), then
/// the lanes and the tail.
#[inline(always)]
fn fold_lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, x);
        }
    }
    let mut folded = tail.iter().fold(init, |acc, &x| f(acc, x));
    for lane in lanes {
        folded = f(folded, lane);
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{attention, causal_mask, padding_mask, split_heads, Packing};
    use crate::model::testing::{max_diff, seeded};
    use crate::model::Sequence;
    use crate::scorer::Scorer;

    thread_local! {
        /// Set by a test to make the models on its thread take the padded layout.
        pub(super) static PADDED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn fixture_models_score_alike_on_packed_rows_and_on_the_padded_layout() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        // Ragged lengths, some past the fixtures' sliding window of 16.
        let sequences: Vec<Sequence> = [3usize, 21, 40, 9, 17]
            .iter()
            .enumerate()
            .map(|(i, &len)| Sequence {
                ids: (0..len)
                    .map(|p| 5 + ((p * 7 + i * 13) % 90) as u32)
                    .collect(),
                type_ids: vec![0; len],
            })
            .collect();
        let refs: Vec<&Sequence> = sequences.iter().collect();
        for name in ["bert", "roberta", "llama", "mistral", "qwen3", "gemma2"] {
            let scorer = Scorer::load_one(&root.join(name)).expect("load the fixture");
            let packed = scorer.score(&refs).expect("score on packed rows");
            PADDED_ONLY.with(|p| p.set(true));
            let padded = scorer.score(&refs);
            PADDED_ONLY.with(|p| p.set(false));
            let padded = padded.expect("score on the padded layout");
            for (a, b) in packed.iter().zip(&padded) {
                assert!(
                    (a.value - b.value).abs() < 1e-5,
                    "{name}: {} packed vs {} padded",
                    a.value,
                    b.value
                );
            }
        }
    }

    /// The general path: padded layout, repeated KV heads, additive masks.
    fn reference(spec: &Spec, lengths: &[usize], q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let dev = Device::Cpu;
        let seq = *lengths.iter().max().unwrap();
        let packing = Packing::new(lengths, seq, &dev).unwrap();
        let heads = |t: &Tensor, n| split_heads(&packing.unpack(t).unwrap(), n, spec.head_dim);
        let mask = match spec.keys {
            KeySpan::All => padding_mask(lengths, seq, &dev).unwrap(),
            KeySpan::Causal { window } => causal_mask(seq, window, &dev).unwrap(),
        };
        let out = attention(
            &heads(q, spec.heads).unwrap(),
            &heads(k, spec.kv_heads).unwrap(),
            &heads(v, spec.kv_heads).unwrap(),
            &mask,
            spec.scale as f64,
            spec.softcap.map(f64::from),
        )
        .unwrap();
        packing.pack(&out).unwrap()
    }

    #[test]
    fn matches_the_padded_path_for_every_key_span_and_query_choice() {
        let dev = Device::Cpu;
        // Ragged lengths (one of them 1), odd head size, grouped and plain KV heads.
        let lengths = [7usize, 1, 12, 5];
        let total: usize = lengths.iter().sum();
        let spans = [
            KeySpan::All,
            KeySpan::Causal { window: None },
            KeySpan::Causal { window: Some(3) },
        ];
        for (heads, kv_heads) in [(4, 4), (6, 2), (3, 1)] {
            for keys in spans {
                for softcap in [None, Some(2.5f32)] {
                    let d = 5;
                    let spec = Spec {
                        heads,
                        kv_heads,
                        head_dim: d,
                        scale: 0.37,
                        softcap,
                        keys,
                    };
                    let q =
                        Tensor::from_vec(seeded(total * heads * d, 1), (total, heads * d), &dev)
                            .unwrap();
                    let kv = (total, kv_heads * d);
                    let k = Tensor::from_vec(seeded(total * kv_heads * d, 2), kv, &dev).unwrap();
                    let v = Tensor::from_vec(seeded(total * kv_heads * d, 3), kv, &dev).unwrap();
                    let want = reference(&spec, &lengths, &q, &k, &v);
                    let what = format!("{heads}/{kv_heads} heads, {keys:?}, softcap {softcap:?}");
                    let got = attend(&spec, &lengths, Queries::Every, &q, &k, &v)
                        .unwrap()
                        .expect("f32 CPU takes this path");
                    // Padded rows of the reference are packed away; compare real rows.
                    assert!(max_diff(&got, &want) < 1e-5, "every row: {what}");

                    let packing = Packing::new(&lengths, 12, &dev).unwrap();
                    for (queries, pick) in [
                        (Queries::First, packing.first_rows(&want).unwrap()),
                        (Queries::Last, packing.last_rows(&want).unwrap()),
                    ] {
                        let rows = match queries {
                            Queries::First => packing.first_rows(&q).unwrap(),
                            _ => packing.last_rows(&q).unwrap(),
                        };
                        let got = attend(&spec, &lengths, queries, &rows, &k, &v)
                            .unwrap()
                            .expect("f32 CPU takes this path");
                        assert!(max_diff(&got, &pick) < 1e-5, "{queries:?}: {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_inside_its_span_and_is_zero_outside() {
        // 11 keys: past one vector of 8, with a term far below the largest (exactly 0, not
        // a subnormal) and ties.
        let mut row = [9.0f32, 1.0, 2.0, 2.0, -95.0, 0.5, 3.0, 1.0, 2.0, 0.0, 7.0];
        softmax_span(&mut row, 1..10, None);
        assert_eq!((row[0], row[10]), (0.0, 0.0));
        assert_eq!(row[4], 0.0);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
        let scores = [1.0f64, 2.0, 2.0, 0.5, 3.0, 1.0, 2.0, 0.0];
        let total: f64 = scores.iter().map(|s| s.exp()).sum();
        let want: Vec<f64> = scores.iter().map(|s| s.exp() / total).collect();
        let got = [
            row[1], row[2], row[3], row[5], row[6], row[7], row[8], row[9],
        ];
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-7, "{g} vs {w}");
        }
    }

    #[test]
    fn other_dtypes_and_mismatched_shapes_take_the_general_path() {
        let dev = Device::Cpu;
        let spec = Spec {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
            softcap: None,
            keys: KeySpan::All,
        };
        let q = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let half = q.to_dtype(DType::BF16).unwrap();
        assert!(attend(&spec, &[3], Queries::Every, &half, &kv, &kv)
            .unwrap()
            .is_none());
        // Lengths that do not add up to the rows given.
        assert!(attend(&spec, &[2], Queries::Every, &q, &kv, &kv)
            .unwrap()
            .is_none());
    }
}
