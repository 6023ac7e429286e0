//! Shared prompts on the padded layout (GPU, half types): the same segments as on packed
//! rows (src/model/segments.rs), with attention in padded batches of candle ops that run
//! on any device and dtype.
//!
//! The dense layers run on the packed rows, a shared prompt's rows once. Attention runs in
//! two padded parts: segments with no prefix (shared prompts themselves and inputs sharing
//! nothing), each attending to its own rows under the causal mask of the layout without
//! sharing; and segments that continue a prefix, each attending to its prefix's rows then
//! its own, under a mask computed on the device from the keys' and queries' positions.
//! Keeping them apart spares the responses the padding of a long prompt's queries.

use candle_core::{DType, Device, Result, Tensor};

use super::layers::{attention, causal_mask};
use super::segments::Segments;

/// Keys that hold no row sit here: past every query, so no mask lets them in.
const NO_KEY: f32 = 1e9;

/// One padded attention batch: `tasks` segments of `queries` query rows and `keys` key
/// rows each, read from the packed rows through index tensors.
struct Part {
    tasks: usize,
    queries: usize,
    keys: usize,
    /// `[tasks * queries]` packed rows (padding repeats a real row; its output is dropped).
    query_rows: Tensor,
    /// `[tasks * keys]` packed rows (padding repeats a real row; the mask hides it).
    key_rows: Tensor,
    /// Additive masks broadcast against the scores `[tasks, heads, queries, keys]`, without
    /// and with the sliding window.
    full: Tensor,
    window: Option<Tensor>,
}

impl Part {
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        how: &Heads,
        sliding: bool,
    ) -> Result<Tensor> {
        let d = how.head_dim;
        let gather = |x: &Tensor, rows: &Tensor, len: usize, heads: usize| {
            x.index_select(rows, 0)?
                .reshape((self.tasks, len, heads, d))?
                .transpose(1, 2)
        };
        let q = gather(q, &self.query_rows, self.queries, how.heads)?;
        let k = gather(k, &self.key_rows, self.keys, how.kv_heads)?;
        let v = gather(v, &self.key_rows, self.keys, how.kv_heads)?;
        let mask = match (&self.window, sliding) {
            (Some(window), true) => window,
            _ => &self.full,
        };
        attention(&q, &k, &v, mask, how.scale, how.softcap)?
            .reshape((self.tasks * self.queries, how.heads * d))
    }
}

/// The attention shape of a layer.
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
}

/// A batch whose inputs share prompts, laid out for padded attention.
pub struct SharedPadding {
    parts: Vec<Part>,
    /// Per packed row: its row in the parts' outputs, one part after the other.
    back: Tensor,
    /// Query rows of the padded parts: the tokens attention computed, padding included.
    padded_rows: usize,
    /// Key rows of the padded parts: each continuing segment holds its prompt's keys.
    key_rows: usize,
}

impl SharedPadding {
    /// The layout of `segments`, with sliding-window masks of `window` keys where given.
    pub fn new(segments: &Segments, window: Option<usize>, device: &Device) -> Result<Self> {
        let (alone, continuing): (Vec<usize>, Vec<usize>) =
            (0..segments.count()).partition(|&s| segments.prefix_rows(s).1 == 0);
        let mut back = vec![0u32; segments.total_rows()];
        let mut parts = Vec::new();
        let mut offset = 0;
        if !alone.is_empty() {
            let part = alone_part(segments, &alone, window, &mut back, offset, device)?;
            offset += part.tasks * part.queries;
            parts.push(part);
        }
        if !continuing.is_empty() {
            let part = continuing_part(segments, &continuing, window, &mut back, offset, device)?;
            offset += part.tasks * part.queries;
            parts.push(part);
        }
        let rows = back.len();
        let key_rows = parts.iter().map(|part| part.tasks * part.keys).sum();
        Ok(Self {
            parts,
            back: Tensor::from_vec(back, rows, device)?,
            padded_rows: offset,
            key_rows,
        })
    }

    /// Attention of packed rows: q `[t, heads * d]`, k and v `[t, kv_heads * d]` (rotated
    /// at their positions) -> `[t, heads * d]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        how: &Heads,
        sliding: bool,
    ) -> Result<Tensor> {
        // Gathering rows needs contiguous tensors (a no-op for projections' outputs).
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let outputs = self
            .parts
            .iter()
            .map(|part| part.attend(&q, &k, &v, how, sliding))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outputs, 0)?.index_select(&self.back, 0)
    }

    pub fn padded_rows(&self) -> usize {
        self.padded_rows
    }

    pub fn key_rows(&self) -> usize {
        self.key_rows
    }
}

/// Segments attending to their own rows only, padded on the right: the causal mask alone
/// keeps real queries from the padding, as in the layout without sharing.
fn alone_part(
    segments: &Segments,
    tasks: &[usize],
    window: Option<usize>,
    back: &mut [u32],
    offset: usize,
    device: &Device,
) -> Result<Part> {
    let len = tasks.iter().map(|&s| segments.rows(s).1).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(tasks.len() * len);
    for (task, &s) in tasks.iter().enumerate() {
        let (start, own) = segments.rows(s);
        for j in 0..len {
            rows.push((start + j.min(own.saturating_sub(1))) as u32);
        }
        for j in 0..own {
            back[start + j] = (offset + task * len + j) as u32;
        }
    }
    let rows = Tensor::from_vec(rows, tasks.len() * len, device)?;
    Ok(Part {
        tasks: tasks.len(),
        queries: len,
        keys: len,
        query_rows: rows.clone(),
        key_rows: rows,
        full: causal_mask(len, None, device)?,
        window: window
            .map(|w| causal_mask(len, Some(w), device))
            .transpose()?,
    })
}

/// Segments continuing a prefix: keys are the prefix's rows (padded to the longest
/// prefix), then the segment's own (padded to the longest segment); queries are its own
/// rows, at positions after the prefix.
fn continuing_part(
    segments: &Segments,
    tasks: &[usize],
    window: Option<usize>,
    back: &mut [u32],
    offset: usize,
    device: &Device,
) -> Result<Part> {
    let prefix_len = tasks
        .iter()
        .map(|&s| segments.prefix_rows(s).1)
        .max()
        .unwrap_or(0);
    let own_len = tasks.iter().map(|&s| segments.rows(s).1).max().unwrap_or(0);
    let keys = prefix_len + own_len;
    let n = tasks.len();
    let (mut query_rows, mut query_positions) = (Vec::with_capacity(n * own_len), Vec::new());
    let (mut key_rows, mut key_positions) = (Vec::with_capacity(n * keys), Vec::new());
    for (task, &s) in tasks.iter().enumerate() {
        let (p_start, p_len) = segments.prefix_rows(s);
        let (start, own) = segments.rows(s);
        let last = own.saturating_sub(1);
        for j in 0..own_len {
            // A padding query repeats the last real one, so it sees keys and stays finite.
            query_rows.push((start + j.min(last)) as u32);
            query_positions.push((p_len + j.min(last)) as f32);
        }
        for j in 0..prefix_len {
            key_rows.push((p_start + j.min(p_len.saturating_sub(1))) as u32);
            key_positions.push(if j < p_len { j as f32 } else { NO_KEY });
        }
        for j in 0..own_len {
            key_rows.push((start + j.min(last)) as u32);
            key_positions.push(if j < own { (p_len + j) as f32 } else { NO_KEY });
        }
        for j in 0..own {
            back[start + j] = (offset + task * own_len + j) as u32;
        }
    }
    let query_positions = Tensor::from_vec(query_positions, (n, 1, own_len, 1), device)?;
    let key_positions = Tensor::from_vec(key_positions, (n, 1, 1, keys), device)?;
    // Query position less key position: a key is seen when that is >= 0 (and < window).
    let distance = query_positions.broadcast_sub(&key_positions)?;
    let seen = distance.ge(0f64)?;
    let full = additive(&seen)?;
    let window = window
        .map(|w| additive(&seen.mul(&distance.lt(w as f64)?)?))
        .transpose()?;
    Ok(Part {
        tasks: n,
        queries: own_len,
        keys,
        query_rows: Tensor::from_vec(query_rows, n * own_len, device)?,
        key_rows: Tensor::from_vec(key_rows, n * keys, device)?,
        full,
        window,
    })
}

/// 0 where `seen` (u8) is set, -inf elsewhere, in f32.
fn additive(seen: &Tensor) -> Result<Tensor> {
    let shape = seen.shape();
    let zero = Tensor::zeros((), DType::F32, seen.device())?.broadcast_as(shape)?;
    let hidden = Tensor::new(f32::NEG_INFINITY, seen.device())?.broadcast_as(shape)?;
    seen.where_cond(&zero, &hidden)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{split_heads, Packing};
    use crate::model::segments::SharedCount;
    use crate::model::testing::{max_diff, rows_for};
    use crate::model::{BatchCost, BatchLayout, Sequence};

    fn seq(ids: Vec<u32>) -> Sequence {
        Sequence {
            type_ids: vec![0; ids.len()],
            ids,
        }
    }

    /// Attention of each input whole, on the layout without sharing: `[tokens, heads * d]`
    /// in input order.
    fn each_whole(inputs: &[Sequence], how: &Heads, window: Option<usize>) -> Tensor {
        let (heads, kv, d) = (how.heads, how.kv_heads, how.head_dim);
        let outputs: Vec<Tensor> = inputs
            .iter()
            .map(|s| {
                let positions: Vec<usize> = (0..s.ids.len()).collect();
                let len = s.ids.len();
                let packing = Packing::new(&[len], len, &Device::Cpu).unwrap();
                let split =
                    |x: Tensor, n: usize| split_heads(&packing.unpack(&x).unwrap(), n, d).unwrap();
                let q = split(rows_for(&s.ids, &positions, heads * d), heads);
                let k = split(
                    rows_for(&s.ids, &positions, kv * d + 1)
                        .narrow(1, 0, kv * d)
                        .unwrap(),
                    kv,
                );
                let v = split(
                    rows_for(&s.ids, &positions, kv * d + 2)
                        .narrow(1, 0, kv * d)
                        .unwrap(),
                    kv,
                );
                let mask = causal_mask(len, window, &Device::Cpu).unwrap();
                let out = attention(&q, &k, &v, &mask, how.scale, how.softcap).unwrap();
                packing.pack(&out).unwrap()
            })
            .collect();
        Tensor::cat(&outputs, 0).unwrap()
    }

    #[test]
    fn inputs_sharing_prompts_attend_as_if_each_held_its_prompt() {
        // Two prompts (one longer than the window), responses of several lengths, and an
        // input sharing nothing.
        let prompt_a: Vec<u32> = (0..23).map(|p| 5 + (p * 7 % 40)).collect();
        let prompt_b: Vec<u32> = (0..11).map(|p| 50 + (p * 3 % 20)).collect();
        let with = |p: &[u32], tail: &[u32]| seq([p, tail].concat());
        let inputs = vec![
            with(&prompt_a, &[1, 2, 3]),
            with(&prompt_b, &[9]),
            seq(vec![70, 71, 72, 73]),
            with(&prompt_a, &[4]),
            with(&prompt_b, &[8, 7, 6, 5, 4, 3]),
            with(&prompt_a, &[1, 2, 3, 4, 5, 6, 7, 8]),
        ];
        let refs: Vec<&Sequence> = inputs.iter().collect();
        let (segments, ids) = Segments::share_prefixes(&refs, 8);
        assert_eq!(segments.rows_saved(&refs), 2 * 23 + 11);
        let positions = segments.positions();
        for (heads, kv_heads) in [(2, 2), (4, 2)] {
            for softcap in [None, Some(2.5)] {
                for window in [None, Some(5)] {
                    let how = Heads {
                        heads,
                        kv_heads,
                        head_dim: 4,
                        scale: 0.37,
                        softcap,
                    };
                    let d = how.head_dim;
                    let q = rows_for(&ids, &positions, heads * d);
                    let k = rows_for(&ids, &positions, kv_heads * d + 1)
                        .narrow(1, 0, kv_heads * d)
                        .unwrap();
                    let v = rows_for(&ids, &positions, kv_heads * d + 2)
                        .narrow(1, 0, kv_heads * d)
                        .unwrap();
                    let layout = SharedPadding::new(&segments, window, &Device::Cpu).unwrap();
                    let out = layout.attend(&q, &k, &v, &how, window.is_some()).unwrap();
                    // Each input's rows in the shared output: its prefix's, then its own.
                    let mut rows = Vec::new();
                    for input in 0..inputs.len() {
                        let s = segments.end_of(input);
                        let (p_start, p_len) = segments.prefix_rows(s);
                        let (start, len) = segments.rows(s);
                        rows.extend((p_start..p_start + p_len).chain(start..start + len));
                    }
                    let rows: Vec<u32> = rows.into_iter().map(|r| r as u32).collect();
                    let count = rows.len();
                    let shared = out
                        .index_select(&Tensor::from_vec(rows, count, &Device::Cpu).unwrap(), 0)
                        .unwrap();
                    let whole = each_whole(&inputs, &how, window);
                    let diff = max_diff(&shared, &whole);
                    assert!(
                        diff < 1e-6,
                        "heads {heads}/{kv_heads}, softcap {softcap:?}, window {window:?}: {diff}"
                    );
                }
            }
        }
        let layout = SharedPadding::new(&segments, None, &Device::Cpu).unwrap();
        // Alone: the two prompts and the lone input, padded to 23; continuing: five
        // responses, padded to 8, after the longer prompt's 23 keys.
        assert_eq!(layout.padded_rows(), 3 * 23 + 5 * 8);
        assert_eq!(layout.key_rows(), 3 * 23 + 5 * (23 + 8));
    }

    #[test]
    fn the_batchers_count_is_what_the_layouts_compute() {
        // Seeded batches drawn from a few prompts (some short, some empty) and tails, in
        // token order as the batcher feeds them: the count built input by input equals the
        // packed rows of the segments and the key rows of this layout.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        let mut sharing = 0;
        for _ in 0..300 {
            let prompts: Vec<Vec<u32>> = (0..1 + next(4))
                .map(|_| (0..next(30)).map(|_| next(4) as u32).collect())
                .collect();
            let mut inputs: Vec<Sequence> = (0..1 + next(10))
                .map(|_| {
                    let prompt = &prompts[next(prompts.len() as u64)];
                    let tail: Vec<u32> = (0..1 + next(7)).map(|_| next(4) as u32).collect();
                    seq([prompt.as_slice(), &tail].concat())
                })
                .collect();
            inputs.sort_by(|a, b| a.ids.cmp(&b.ids));
            let refs: Vec<&Sequence> = inputs.iter().collect();
            let min_shared = 1 + next(6);
            let mut count = SharedCount::new(min_shared);
            for input in &inputs {
                count.push(&input.ids);
            }
            let tally = count.tally();
            let (segments, _) = Segments::share_prefixes(&refs, min_shared);
            sharing += usize::from(segments.rows_saved(&refs) > 0);
            assert_eq!(tally.rows, segments.total_rows());
            let layout = SharedPadding::new(&segments, None, &Device::Cpu).unwrap();
            assert_eq!(tally.padded_key_rows(), layout.key_rows());
            // The batcher's cost, asked before the last input joins, is the same.
            let (last, rest) = refs.split_last().unwrap();
            for (layout, cost) in [
                (BatchLayout::PackedSharing { min_shared }, tally.rows),
                (
                    BatchLayout::PaddedSharing { min_shared },
                    tally.padded_key_rows(),
                ),
            ] {
                let mut before = BatchCost::new(layout);
                for input in rest {
                    before.push(&input.ids);
                }
                assert_eq!(before.tokens_with(&last.ids), cost, "{layout:?}");
            }
        }
        assert!(
            sharing >= 100,
            "only {sharing} of 300 batches shared a prompt"
        );
    }
}
