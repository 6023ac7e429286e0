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
//! exactly, as `exp(-inf)` does there. DeBERTa's relative-position terms are added to each
//! score as it is formed (`attend_biased`), from per-row products with the relative table,
//! instead of being gathered into `[b, heads, s, s]` tensors.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::layers::cpu_f32;
use super::relative_position::RelativeWindow;
use super::segments::Segments;
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
pub enum Queries<'a> {
    /// Every packed row: q is `[t, heads * d]`.
    Every,
    /// One row per sequence, its first token: q is `[b, heads * d]` (encoders' last layer).
    First,
    /// One row per sequence, its last token: q is `[b, heads * d]` (decoders' last layer).
    Last,
    /// These packed rows, in this order (repeats allowed): q is `[n, heads * d]` (a
    /// decoder's last layer when its head reads rows besides the last ones).
    Rows(&'a [usize]),
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

/// DeBERTa's disentangled terms, added to the scaled scores: for query row i at position
/// p and key row j at position o, `c2p[h, i, r] + p2c[h, j, r]` with r the pair's row of
/// the relative table, `window.row(p, o)`.
pub struct RelativeBias<'a> {
    /// `[heads, query rows, window.rows]`, already scaled (None without the c2p term).
    pub c2p: Option<&'a Tensor>,
    /// `[heads, key rows, window.rows]`, already scaled (None without the p2c term).
    pub p2c: Option<&'a Tensor>,
    pub window: &'a RelativeWindow,
}

/// Attention of `q` over `k`, `v` (`[t, kv_heads * d]`, the packed rows of `segments`),
/// returning one row `[heads * d]` per query row. A segment with a shared prefix sees the
/// prefix's rows before its own. `None` where this path does not apply (not CPU, not f32,
/// or a shape it does not handle); the caller then takes the general path.
pub fn attend(
    spec: &Spec,
    segments: &Segments,
    queries: Queries<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Option<Tensor>> {
    attend_biased(spec, segments, queries, q, k, v, None)
}

/// [`attend`] with DeBERTa's relative terms added to the scores (`bias`).
pub fn attend_biased(
    spec: &Spec,
    segments: &Segments,
    queries: Queries<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&RelativeBias>,
) -> Result<Option<Tensor>> {
    let (heads, kv_heads, d) = (spec.heads, spec.kv_heads, spec.head_dim);
    if kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
        return Ok(None);
    }
    let total = segments.total_rows();
    let q_rows = match queries {
        Queries::Every => total,
        Queries::First | Queries::Last => segments.inputs(),
        Queries::Rows(rows) => rows.len(),
    };
    if let Queries::Rows(rows) = queries {
        if rows.iter().any(|&row| row >= total) {
            return Ok(None);
        }
    }
    let shapes_fit = q.dims() == [q_rows, heads * d]
        && k.dims() == [total, kv_heads * d]
        && v.dims() == [total, kv_heads * d];
    let all_f32_cpu = [q, k, v]
        .iter()
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu));
    if !shapes_fit || !all_f32_cpu {
        return Ok(None);
    }
    let longest = (0..segments.count())
        .map(|s| segments.rows(s).1 + segments.prefix_rows(s).1)
        .max()
        .unwrap_or(0);
    if bias.is_some_and(|b| !b.window.covers(longest)) {
        return Ok(None);
    }
    let window_rows = bias.map_or(0, |b| b.window.rows);
    let fits = |t: &Tensor, rows: usize| {
        t.dims() == [heads, rows, window_rows]
            && t.dtype() == DType::F32
            && matches!(t.device(), Device::Cpu)
    };
    let (c2p, p2c) = (bias.and_then(|b| b.c2p), bias.and_then(|b| b.p2c));
    if c2p.is_some_and(|t| !fits(t, q_rows)) || p2c.is_some_and(|t| !fits(t, total)) {
        return Ok(None);
    }
    let c2p = c2p.map(Tensor::contiguous).transpose()?;
    let p2c = p2c.map(Tensor::contiguous).transpose()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = {
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (Some(qs), Some(ks), Some(vs)) = (cpu_f32(&q, &qs), cpu_f32(&k, &ks), cpu_f32(&v, &vs))
        else {
            return Ok(None);
        };
        let c2p_storage = c2p.as_ref().map(|t| t.storage_and_layout().0);
        let p2c_storage = p2c.as_ref().map(|t| t.storage_and_layout().0);
        let c2p_slice = c2p.as_ref().zip(c2p_storage.as_ref());
        let p2c_slice = p2c.as_ref().zip(p2c_storage.as_ref());
        let (c2p_slice, p2c_slice) = (
            c2p_slice.map(|(t, storage)| cpu_f32(t, storage)),
            p2c_slice.map(|(t, storage)| cpu_f32(t, storage)),
        );
        if matches!(c2p_slice, Some(None)) || matches!(p2c_slice, Some(None)) {
            return Ok(None);
        }
        let bias = bias.map(|b| BiasSlices {
            c2p: c2p_slice.flatten(),
            p2c: p2c_slice.flatten(),
            window: b.window,
            q_rows,
            key_rows: total,
        });
        attend_slices(spec, segments, queries, qs, ks, vs, bias.as_ref())
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

/// [`RelativeBias`] as checked slices.
struct BiasSlices<'a> {
    c2p: Option<&'a [f32]>,
    p2c: Option<&'a [f32]>,
    window: &'a RelativeWindow,
    q_rows: usize,
    key_rows: usize,
}

impl BiasSlices<'_> {
    /// Adds the terms of head `h` to `scores` (`count` rows of `keys`): query row
    /// `q_row + i` at position `first_pos + i`; key `j` is the row `key_row(j)` at
    /// position `j` (a shared prefix's rows come first, at its positions).
    fn add(
        &self,
        h: usize,
        scores: &mut [f32],
        (q_row, first_pos, count): (usize, usize, usize),
        keys: usize,
        parts: &KeyParts,
    ) {
        let rows = self.window.rows;
        let key_row = |j: usize| {
            if j < parts.prefix.1 {
                parts.prefix.0 + j
            } else {
                parts.own.0 + j - parts.prefix.1
            }
        };
        for (i, row_scores) in scores.chunks_exact_mut(keys).take(count).enumerate() {
            let position = first_pos + i;
            if let Some(c2p) = self.c2p {
                let table = &c2p[(h * self.q_rows + q_row + i) * rows..][..rows];
                for (j, score) in row_scores.iter_mut().enumerate() {
                    *score += table[self.window.row(position, j) as usize];
                }
            }
            if let Some(p2c) = self.p2c {
                let head = &p2c[h * self.key_rows * rows..][..self.key_rows * rows];
                for (j, score) in row_scores.iter_mut().enumerate() {
                    *score += head[key_row(j) * rows + self.window.row(position, j) as usize];
                }
            }
        }
    }
}

/// `attend` on checked slices: `q` holds the query rows, `k` and `v` the segments' rows.
fn attend_slices(
    spec: &Spec,
    segments: &Segments,
    queries: Queries<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&BiasSlices>,
) -> Vec<f32> {
    let heads = spec.heads;
    let q_stride = heads * spec.head_dim;
    let q_rows = q.len() / q_stride;
    // One task per (segment, head) for every row, per (input, head) for one row each,
    // per (query row, head) for given rows.
    let owners = match queries {
        Queries::Every => segments.count(),
        Queries::First | Queries::Last => segments.inputs(),
        Queries::Rows(rows) => rows.len(),
    };
    let mut out: Vec<f32> = Vec::with_capacity(q_rows * q_stride);
    let dst = Shared(out.as_mut_ptr());
    (0..owners * heads).into_par_iter().for_each(|task| {
        let (owner, h) = (task / heads, task % heads);
        let segment = match queries {
            Queries::Every => owner,
            Queries::First | Queries::Last => segments.end_of(owner),
            Queries::Rows(rows) => segments.segment_of(rows[owner]),
        };
        let (start, len) = segments.rows(segment);
        let (prefix_start, prefix_len) = segments.prefix_rows(segment);
        // Keys in input order: the prefix's rows, then the segment's own.
        let keys = prefix_len + len;
        // The first query row, its position among the keys, and how many there are.
        let (row, first_pos, count) = match queries {
            Queries::Every => (start, prefix_len, len),
            Queries::First => (owner, 0, 1),
            Queries::Last => (owner, keys.saturating_sub(1), 1),
            Queries::Rows(rows) => (owner, prefix_len + rows[owner] - start, 1),
        };
        // SAFETY: this task alone writes columns h*d..(h+1)*d of rows row..row+count.
        let out_block = unsafe { dst.at(row * q_stride + h * spec.head_dim) };
        let parts = KeyParts {
            prefix: (prefix_start, prefix_len),
            own: (start, len),
        };
        head_attention(
            spec,
            h,
            &parts,
            (row, first_pos, count),
            q,
            k,
            v,
            bias,
            out_block,
        );
    });
    // SAFETY: the tasks wrote every element: each (query row, head) block belongs to
    // exactly one task (its segment's, input's or own), which fills it by gemm or with zeros.
    unsafe { out.set_len(q_rows * q_stride) };
    out
}

/// The key rows of one task: a shared prefix's (maybe none) and the segment's own, each
/// as first row and count.
struct KeyParts {
    prefix: (usize, usize),
    own: (usize, usize),
}

/// One head's attention for `count` query rows from `row` (at key position `first_pos`
/// on), written into `out_block` (row stride `heads * d`).
#[allow(clippy::too_many_arguments)]
fn head_attention(
    spec: &Spec,
    h: usize,
    parts: &KeyParts,
    (row, first_pos, count): (usize, usize, usize),
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&BiasSlices>,
    out_block: *mut f32,
) {
    let (heads, d) = (spec.heads, spec.head_dim);
    let (q_stride, kv_stride) = (heads * d, spec.kv_heads * d);
    let keys = parts.prefix.1 + parts.own.1;
    if keys == 0 {
        // No keys (encoding refuses empty inputs; kept defined all the same).
        for r in 0..count {
            // SAFETY: the caller's block, `count` rows of `d` elements at stride q_stride.
            unsafe { std::ptr::write_bytes(out_block.add(r * q_stride), 0, d) };
        }
        return;
    }
    let kv_col = (h / (heads / spec.kv_heads)) * d;
    let q_block = &q[row * q_stride + h * d..];
    // Left uninitialized: the score GEMMs write every element (columns 0..prefix from the
    // prefix's keys, the rest from the segment's own).
    let mut scores: Vec<f32> = Vec::with_capacity(count * keys);
    let mut column = 0;
    for &(first, n) in [parts.prefix, parts.own].iter().filter(|p| p.1 > 0) {
        let k_block = &k[first * kv_stride + kv_col..];
        // SAFETY: q_block holds `count` rows of `d` at stride q_stride, k_block `n` rows
        // of `d` at stride kv_stride, and the destination columns column..column+n of
        // `count` rows of `keys` lie inside `scores`' capacity.
        unsafe {
            // scores = scale * Q K^T; K^T's element (c, j) is k_block[j * kv_stride + c].
            gemm::gemm(
                count,
                n,
                d,
                scores.as_mut_ptr().add(column),
                1,
                keys as isize,
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
        }
        column += n;
    }
    // SAFETY: the GEMMs above wrote all count x keys elements.
    unsafe { scores.set_len(count * keys) };
    if let Some(bias) = bias {
        bias.add(h, &mut scores, (row, first_pos, count), keys, parts);
    }
    for (i, row_scores) in scores.chunks_exact_mut(keys).enumerate() {
        softmax_span(
            row_scores,
            spec.keys.range(first_pos + i, keys),
            spec.softcap,
        );
    }
    let mut column = 0;
    for &(first, n) in [parts.prefix, parts.own].iter().filter(|p| p.1 > 0) {
        let v_block = &v[first * kv_stride + kv_col..];
        // out (+)= P[:, column..column+n] V_part, straight into this head's columns.
        // SAFETY: as above; the first part writes the block, a second one adds to it.
        unsafe {
            gemm::gemm(
                count,
                d,
                n,
                out_block,
                1,
                q_stride as isize,
                column > 0,
                scores.as_ptr().add(column),
                1,
                keys as isize,
                v_block.as_ptr(),
                1,
                kv_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        column += n;
    }
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
    use crate::dtype::FloatDType;
    use crate::model::layers::{attention, causal_mask, padding_mask, split_heads, Packing};
    use crate::model::testing::{max_diff, rows_for, seeded};
    use crate::model::Sequence;
    use crate::scorer::{Score, Scorer};

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
                read_at: None,
            })
            .collect();
        let refs: Vec<&Sequence> = sequences.iter().collect();
        for name in [
            "bert",
            "roberta",
            "distilbert",
            "deberta-v2",
            "deberta-v2-conv",
            "llama",
            "mistral",
            "qwen3",
            "gemma",
            "gemma2",
            "gpt-neox",
            "gpt2",
            "openrlhf-llama",
            "qwen2-rm",
            "inform-llama",
            "llamafactory-qwen2",
        ] {
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

    #[test]
    fn decoder_fixtures_score_alike_with_and_without_shared_prefixes() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        // Three prompts (one past the sliding window of 16 on its own), several responses
        // each, one response a prefix of another, and an input that shares nothing.
        let prompts: Vec<Vec<u32>> = [30usize, 12, 20]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                (0..len)
                    .map(|p| 5 + ((p * 11 + i * 3) % 90) as u32)
                    .collect()
            })
            .collect();
        let responses: [(usize, &[u32]); 7] = [
            (0, &[40, 41, 42]),
            (1, &[7]),
            (
                0,
                &[
                    40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                ],
            ),
            (2, &[60, 61]),
            (0, &[70]),
            (1, &[8, 9, 10, 11]),
            (2, &[60, 61, 62, 63]),
        ];
        let mut sequences: Vec<Sequence> = responses
            .iter()
            .map(|&(p, r)| {
                let ids: Vec<u32> = prompts[p].iter().chain(r).copied().collect();
                Sequence::plain(ids)
            })
            .collect();
        sequences.push(Sequence {
            ids: vec![90, 91, 92],
            type_ids: vec![0; 3],
            read_at: None,
        });
        let refs: Vec<&Sequence> = sequences.iter().collect();
        let (segments, _) = Segments::share_prefixes(&refs, 8);
        assert!(
            segments.rows_saved(&refs) >= 2 * 30 + 12 + 20,
            "{segments:?}"
        );
        let saved = segments.rows_saved(&refs);
        // On packed rows (CPU, f32) and on the padded layout (GPU, half types).
        for padded in [false, true] {
            PADDED_ONLY.with(|p| p.set(padded));
            for name in [
                "llama",
                "mistral",
                "qwen2",
                "qwen3",
                "gemma",
                "gemma2",
                "gpt-neox",
                "gpt2",
                "openrlhf-llama",
                "qwen2-rm",
                "inform-llama",
                "llamafactory-qwen2",
            ] {
                let mut scorer = Scorer::load_one(&root.join(name)).expect("load the fixture");
                scorer.share_prefixes_from(8);
                let (shared, work) = scorer
                    .score_batch(&refs)
                    .expect("score with shared prefixes");
                assert_eq!(work.shared, saved, "{name}, padded {padded}");
                scorer.share_prefixes_from(0);
                let (apart, work) = scorer.score_batch(&refs).expect("score without");
                assert_eq!(work.shared, 0);
                let alone: Vec<f32> = refs
                    .iter()
                    .map(|s| scorer.score(&[s]).expect("score alone")[0].value)
                    .collect();
                for (i, ((a, b), c)) in shared.iter().zip(&apart).zip(&alone).enumerate() {
                    assert!(
                        (a.value - b.value).abs() < 1e-5 && (a.value - c).abs() < 1e-5,
                        "{name} (padded {padded}) input {i}: {} shared, {} apart, {c} alone",
                        a.value,
                        b.value
                    );
                }
            }
        }
        PADDED_ONLY.with(|p| p.set(false));
    }

    /// The checkpoint in `dir` computing in `dtype` on the CPU.
    fn load_in(dir: &std::path::Path, dtype: FloatDType) -> Scorer {
        Scorer::load(
            &crate::config::MembersConfig::single(dir),
            crate::scorer::Combine::Weights,
            dtype,
            &Device::Cpu,
            None,
        )
        .expect("load in a half type")
    }

    #[test]
    fn armo_reads_the_prompt_end_alike_in_every_layout() {
        // ArmoRM's gate reads the hidden state where the prompt ends: inside a shared
        // prompt (best-of-N), in an input's own rows (a prompt only partly shared), and at
        // the last of two occurrences (two turns).
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let expected: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures.join("expected/armo-llama.json")).expect("expected"),
        )
        .expect("json");
        let end: Vec<u32> =
            serde_json::from_value(expected["prompt_end_ids"].clone()).expect("prompt_end_ids");
        let filler = |seed: usize, len: usize| -> Vec<u32> {
            (0..len)
                .map(|p| 5 + ((p * 11 + seed * 7) % 90) as u32)
                .collect()
        };
        let prompt: Vec<u32> = [vec![600], filler(0, 20), end.clone()].concat();
        let mut inputs: Vec<Vec<u32>> = [3usize, 9, 1]
            .iter()
            .enumerate()
            .map(|(i, &len)| [prompt.clone(), filler(i + 1, len), vec![605]].concat())
            .collect();
        // Shares the first 21 tokens only: its prompt end is in its own rows.
        inputs.push([&prompt[..21], &filler(9, 6), &end, &filler(4, 5), &[605]].concat());
        // Two turns after the shared prompt: the gate reads the second prompt end.
        inputs.push([&prompt[..], &filler(5, 4), &end, &filler(6, 7), &[605]].concat());
        assert_every_layout_scores_as_alone(&fixtures.join("models/armo-llama"), inputs);
    }

    #[test]
    fn prm_reads_every_step_alike_in_every_layout() {
        // A process reward model reads every step tag: in a shared prompt (the same first
        // steps), in an input's own rows, several per input.
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let expected: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixtures.join("expected/qwen2-prm.json")).expect("expected"),
        )
        .expect("json");
        let tag = expected["step_tag_id"].as_u64().expect("step_tag_id") as u32;
        let filler = |seed: usize, len: usize| -> Vec<u32> {
            (0..len)
                .map(|p| 5 + ((p * 13 + seed * 5) % 90) as u32)
                .collect()
        };
        let prompt: Vec<u32> = [filler(0, 12), vec![tag], filler(1, 8), vec![tag]].concat();
        let inputs = vec![
            [prompt.clone(), filler(2, 3), vec![tag]].concat(),
            [
                prompt.clone(),
                filler(3, 9),
                vec![tag],
                filler(4, 2),
                vec![tag, 7],
            ]
            .concat(),
            // No tag of its own: its steps are all in the shared prompt.
            [prompt.clone(), filler(5, 4)].concat(),
            // Shares the first 10 tokens only: every tag is in its own rows.
            [&prompt[..10], &filler(6, 5), &[tag], &filler(7, 6), &[tag]].concat(),
        ];
        assert_every_layout_scores_as_alone(&fixtures.join("models/qwen2-prm"), inputs);
    }

    /// Scores `inputs` in one batch in each layout (packed and padded, prompts shared and
    /// not; bf16 and f16 within their rounding) and checks each input's reward and step
    /// rewards equal those it gets alone.
    fn assert_every_layout_scores_as_alone(dir: &std::path::Path, inputs: Vec<Vec<u32>>) {
        let sequences: Vec<Sequence> = inputs.into_iter().map(Sequence::plain).collect();
        let refs: Vec<&Sequence> = sequences.iter().collect();
        let mut scorer = Scorer::load_one(dir).expect("load the fixture");
        let alone: Vec<Score> = refs
            .iter()
            .map(|s| scorer.score(&[s]).expect("score alone").remove(0))
            .collect();
        let assert_alike = |scores: &[Score], tolerance: f32, layout: &str| {
            for (i, (s, a)) in scores.iter().zip(&alone).enumerate() {
                let steps = |s: &Score| s.steps.clone().unwrap_or_default();
                assert_eq!(steps(s).len(), steps(a).len(), "{layout}, input {i}");
                for (got, want) in std::iter::once(s.value)
                    .chain(steps(s))
                    .zip(std::iter::once(a.value).chain(steps(a)))
                {
                    assert!(
                        (got - want).abs() < tolerance,
                        "{layout}, input {i}: {got} vs {want} alone"
                    );
                }
            }
        };
        for padded in [false, true] {
            PADDED_ONLY.with(|p| p.set(padded));
            for min_shared in [8, 0] {
                scorer.share_prefixes_from(min_shared);
                let (scores, work) = scorer.score_batch(&refs).expect("score the batch");
                assert_eq!(work.shared > 0, min_shared > 0, "padded {padded}");
                let layout = format!("padded {padded}, shared from {min_shared}");
                assert_alike(&scores, 1e-5, &layout);
            }
        }
        PADDED_ONLY.with(|p| p.set(false));
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let mut half = load_in(dir, dtype);
            half.share_prefixes_from(8);
            let scores = half.score(&refs).expect("score in a half type");
            assert_alike(&scores, 5e-2, &format!("{dtype:?}"));
        }
    }

    #[test]
    fn half_type_models_share_prompts_within_their_rounding() {
        // bf16 and f16 take the padded layout on any device: with prompts shared, scores
        // stay as close to f32's as without.
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        let prompt: Vec<u32> = (0..40).map(|p| 5 + (p * 11 % 90)).collect();
        let sequences: Vec<Sequence> = [&[40u32, 41, 42][..], &[7], &[8, 9, 10, 11, 12]]
            .iter()
            .map(|tail| {
                let ids: Vec<u32> = prompt.iter().chain(tail.iter()).copied().collect();
                Sequence::plain(ids)
            })
            .collect();
        let refs: Vec<&Sequence> = sequences.iter().collect();
        let exact: Vec<f32> = Scorer::load_one(&dir)
            .expect("load in f32")
            .score(&refs)
            .expect("score in f32")
            .iter()
            .map(|s| s.value)
            .collect();
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let mut scorer = load_in(&dir, dtype);
            let mut errors = Vec::new();
            for min_shared in [8, 0] {
                scorer.share_prefixes_from(min_shared);
                let (scores, work) = scorer.score_batch(&refs).expect("score");
                assert_eq!(work.shared > 0, min_shared > 0, "{dtype:?}");
                let error = scores
                    .iter()
                    .zip(&exact)
                    .map(|(s, e)| (s.value - e).abs())
                    .fold(0f32, f32::max);
                errors.push(error);
            }
            let (shared, apart) = (errors[0], errors[1]);
            assert!(
                shared <= 2.0 * apart + 5e-3,
                "{dtype:?}: shared {shared}, apart {apart} from f32"
            );
        }
    }

    /// Every combination of (heads, KV heads), key span and capping (none or 2.5), with
    /// head size 5 and scale 0.37.
    fn specs(heads: &[(usize, usize)], spans: &[KeySpan]) -> Vec<Spec> {
        let mut all = Vec::new();
        for &(heads, kv_heads) in heads {
            for &keys in spans {
                for softcap in [None, Some(2.5f32)] {
                    all.push(Spec {
                        heads,
                        kv_heads,
                        head_dim: 5,
                        scale: 0.37,
                        softcap,
                        keys,
                    });
                }
            }
        }
        all
    }

    #[test]
    fn a_shared_prefix_attends_as_if_each_input_held_it() {
        let prompt: Vec<u32> = (1..=6).collect();
        let inputs: Vec<Sequence> = [&[20u32, 21, 22][..], &[30], &[20, 21, 23, 24, 25]]
            .iter()
            .map(|r| {
                let ids: Vec<u32> = prompt.iter().chain(r.iter()).copied().collect();
                Sequence::plain(ids)
            })
            .chain([Sequence {
                ids: vec![9, 8, 7],
                type_ids: vec![0; 3],
                read_at: None,
            }])
            .collect();
        let refs: Vec<&Sequence> = inputs.iter().collect();
        let lengths: Vec<usize> = inputs.iter().map(|s| s.ids.len()).collect();
        let plain = Segments::plain(&lengths);
        let plain_ids: Vec<u32> = inputs.iter().flat_map(|s| s.ids.clone()).collect();
        let (shared, shared_ids) = Segments::share_prefixes(&refs, 4);
        assert_eq!(shared.rows_saved(&refs), 2 * 6, "{shared:?}");
        // Causal spans only: a prefix's rows do not see what follows them, so sharing is
        // for causal models alone.
        let spans = [
            KeySpan::Causal { window: None },
            KeySpan::Causal { window: Some(3) },
        ];
        for spec in specs(&[(4, 4), (6, 2)], &spans) {
            let (heads, kv_heads, d) = (spec.heads, spec.kv_heads, spec.head_dim);
            let (keys, softcap) = (spec.keys, spec.softcap);
            let what = format!("{heads}/{kv_heads} heads, {keys:?}, softcap {softcap:?}");
            let run = |segments: &Segments, ids: &[u32], queries: Queries| {
                let positions = segments.positions();
                let q = rows_for(ids, &positions, heads * d);
                let q = match queries {
                    Queries::Every => q,
                    _ => {
                        let rows: Vec<u32> = match queries {
                            Queries::Last => segments.last_rows(),
                            Queries::Rows(rows) => rows.iter().map(|&r| r as u32).collect(),
                            _ => (0..segments.inputs())
                                .map(|i| {
                                    let s = segments.end_of(i);
                                    let (p, n) = segments.prefix_rows(s);
                                    (if n > 0 { p } else { segments.rows(s).0 }) as u32
                                })
                                .collect(),
                        };
                        let n = rows.len();
                        q.index_select(&Tensor::from_vec(rows, n, &Device::Cpu).unwrap(), 0)
                            .unwrap()
                    }
                };
                let k = rows_for(ids, &positions, kv_heads * d);
                let v = rows_for(
                    ids,
                    &positions.iter().map(|p| p + 50).collect::<Vec<_>>(),
                    kv_heads * d,
                );
                attend(&spec, segments, queries, &q, &k, &v)
                    .unwrap()
                    .expect("f32 CPU takes this path")
            };
            for queries in [Queries::Last, Queries::First] {
                let want = run(&plain, &plain_ids, queries);
                let got = run(&shared, &shared_ids, queries);
                assert!(max_diff(&got, &want) < 1e-5, "{queries:?}: {what}");
            }
            // Every row: input i's row at position p, found in either layout.
            let want = run(&plain, &plain_ids, Queries::Every);
            let got = run(&shared, &shared_ids, Queries::Every);
            for (i, input) in inputs.iter().enumerate() {
                let s = shared.end_of(i);
                let (prefix_start, prefix_len) = shared.prefix_rows(s);
                for p in 0..input.ids.len() {
                    let row = if p < prefix_len {
                        prefix_start + p
                    } else {
                        shared.rows(s).0 + p - prefix_len
                    };
                    let plain_row = plain.rows(i).0 + p;
                    let diff = max_diff(
                        &got.narrow(0, row, 1).unwrap(),
                        &want.narrow(0, plain_row, 1).unwrap(),
                    );
                    assert!(diff < 1e-5, "input {i} position {p}: {what}");
                }
            }
            // Given rows (a prefix's and inputs' own, out of order, repeated): those rows
            // of every row's attention.
            let total = shared.total_rows();
            let picked: Vec<usize> = (0..total).rev().step_by(3).chain([0, 0, 5]).collect();
            let rows = run(&shared, &shared_ids, Queries::Rows(&picked));
            for (i, &row) in picked.iter().enumerate() {
                let diff = max_diff(
                    &rows.narrow(0, i, 1).unwrap(),
                    &got.narrow(0, row, 1).unwrap(),
                );
                assert!(diff < 1e-5, "row {row} as query {i}: {what}");
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
        let segments = Segments::plain(&lengths);
        let total: usize = lengths.iter().sum();
        let spans = [
            KeySpan::All,
            KeySpan::Causal { window: None },
            KeySpan::Causal { window: Some(3) },
        ];
        for spec in specs(&[(4, 4), (6, 2), (3, 1)], &spans) {
            let (heads, kv_heads, d) = (spec.heads, spec.kv_heads, spec.head_dim);
            let (keys, softcap) = (spec.keys, spec.softcap);
            let q =
                Tensor::from_vec(seeded(total * heads * d, 1), (total, heads * d), &dev).unwrap();
            let kv = (total, kv_heads * d);
            let k = Tensor::from_vec(seeded(total * kv_heads * d, 2), kv, &dev).unwrap();
            let v = Tensor::from_vec(seeded(total * kv_heads * d, 3), kv, &dev).unwrap();
            let want = reference(&spec, &lengths, &q, &k, &v);
            let what = format!("{heads}/{kv_heads} heads, {keys:?}, softcap {softcap:?}");
            let got = attend(&spec, &segments, Queries::Every, &q, &k, &v)
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
                let got = attend(&spec, &segments, queries, &rows, &k, &v)
                    .unwrap()
                    .expect("f32 CPU takes this path");
                assert!(max_diff(&got, &pick) < 1e-5, "{queries:?}: {what}");
            }
            // Rows of any input, the one-token input's included, in any order.
            let picked = [24usize, 7, 0, 8, 8, 3, 19];
            let index = Tensor::from_vec(
                picked.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                picked.len(),
                &dev,
            )
            .unwrap();
            let got = attend(
                &spec,
                &segments,
                Queries::Rows(&picked),
                &q.index_select(&index, 0).unwrap(),
                &k,
                &v,
            )
            .unwrap()
            .expect("f32 CPU takes this path");
            let pick = want.index_select(&index, 0).unwrap();
            assert!(max_diff(&got, &pick) < 1e-5, "given rows: {what}");
            let beyond = [total];
            let refused = attend(
                &spec,
                &segments,
                Queries::Rows(&beyond),
                &q.narrow(0, 0, 1).unwrap(),
                &k,
                &v,
            );
            assert!(
                refused.unwrap().is_none(),
                "a row beyond the batch is not attended"
            );
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
        assert!(attend(
            &spec,
            &Segments::plain(&[3]),
            Queries::Every,
            &half,
            &kv,
            &kv
        )
        .unwrap()
        .is_none());
        // Lengths that do not add up to the rows given.
        assert!(
            attend(&spec, &Segments::plain(&[2]), Queries::Every, &q, &kv, &kv)
                .unwrap()
                .is_none()
        );
    }
}
