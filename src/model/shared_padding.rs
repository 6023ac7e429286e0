//! Shared prompts on the padded layout (GPU, half types): the same segments as on packed
//! rows (src/model/segments.rs), with attention in padded batches of candle ops that run
//! on any device and dtype.
//!
//! The dense layers run on the packed rows, a shared prompt's rows once. Attention runs in
//! padded parts. Segments with no prefix (shared prompts themselves and inputs sharing
//! nothing) attend to their own rows under the causal mask of the layout without sharing.
//! Segments that continue a prefix (the responses) attend to two key sets with one
//! softmax: their own rows, padded per response under the same causal mask, and their
//! prompt's rows, gathered once per prompt for all of its responses' queries (a mask from
//! positions hides padding and what a sliding window leaves out). A prompt's keys are so
//! held once per prompt, not once per response, and a response pads only to the longest
//! response.

use candle_core::{DType, Device, Result, Tensor, D};

use super::layers::{additive, attention, capped_scores, causal_mask, repeat_kv};
use super::segments::Segments;

/// Keys that hold no row sit here: past every query, so no mask lets them in.
const NO_KEY: f32 = 1e9;

/// One padded attention batch: `tasks` blocks of `queries` query rows and `keys` key rows
/// each, read from the packed rows through index tensors.
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
    /// Queries `[tasks, heads, queries, d]`, keys and values `[tasks, kv_heads, keys, d]`.
    fn gather(&self, q: &Tensor, k: &Tensor, v: &Tensor, how: &Heads) -> Result<[Tensor; 3]> {
        let d = how.head_dim;
        let gather = |x: &Tensor, rows: &Tensor, len: usize, heads: usize| {
            x.index_select(rows, 0)?
                .reshape((self.tasks, len, heads, d))?
                .transpose(1, 2)
        };
        Ok([
            gather(q, &self.query_rows, self.queries, how.heads)?,
            gather(k, &self.key_rows, self.keys, how.kv_heads)?,
            gather(v, &self.key_rows, self.keys, how.kv_heads)?,
        ])
    }

    fn query_slots(&self) -> usize {
        self.tasks * self.queries
    }

    fn gathered_rows(&self) -> usize {
        self.tasks * self.queries.max(self.keys)
    }

    fn mask(&self, sliding: bool) -> &Tensor {
        match (&self.window, sliding) {
            (Some(window), true) => window,
            _ => &self.full,
        }
    }

    /// Attention within the part: `[tasks * queries, heads * d]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        how: &Heads,
        sliding: bool,
    ) -> Result<Tensor> {
        let [q, k, v] = self.gather(q, k, v, how)?;
        attention(&q, &k, &v, self.mask(sliding), how.scale, how.softcap)?
            .reshape((self.query_slots(), how.heads * how.head_dim))
    }

    /// Masked scores in f32 `[tasks, heads, queries, keys]` and values repeated per query
    /// head `[tasks, heads, keys, d]`, for a softmax taken elsewhere.
    fn scores(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        how: &Heads,
        sliding: bool,
    ) -> Result<(Tensor, Tensor)> {
        let [q, k, v] = self.gather(q, k, v, how)?;
        let scores = capped_scores(&q, &k, how.scale, how.softcap)?
            .to_dtype(DType::F32)?
            .broadcast_add(self.mask(sliding))?;
        let v = repeat_kv(&v, how.heads / how.kv_heads)?.contiguous()?;
        Ok((scores, v))
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

/// Responses attending to their own rows (`own`: one block per response) and to their
/// prompt's (`prompts`: one block per prompt, its responses' rows as queries), with one
/// softmax over both. Rows are numbered in the order of the responses' packed rows.
struct Continuing {
    own: Part,
    prompts: Part,
    rows: usize,
    /// Per row: its query slot in `own` and in `prompts`.
    own_slot: Tensor,
    prompt_slot: Tensor,
    /// Per query slot of `own` and of `prompts`: its row (padding: the row it repeats).
    own_row: Tensor,
    prompt_row: Tensor,
}

impl Continuing {
    /// `[rows, heads * d]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        how: &Heads,
        sliding: bool,
    ) -> Result<Tensor> {
        let (heads, d) = (how.heads, how.head_dim);
        let dtype = q.dtype();
        let (own_scores, own_values) = self.own.scores(q, k, v, how, sliding)?;
        let (prompt_scores, prompt_values) = self.prompts.scores(q, k, v, how, sliding)?;
        // [tasks, heads, queries, 1] -> [tasks * queries, heads], and back.
        let to_slots = |x: &Tensor| x.squeeze(3)?.transpose(1, 2)?.reshape(((), heads));
        let from_rows = |x: &Tensor, slot_rows: &Tensor, part: &Part| {
            x.index_select(slot_rows, 0)?
                .reshape((part.tasks, part.queries, heads))?
                .transpose(1, 2)?
                .unsqueeze(3)
        };
        // Each row's largest score over both key sets (its own row is always seen).
        let own_max = to_slots(&own_scores.max_keepdim(D::Minus1)?)?;
        let prompt_max = to_slots(&prompt_scores.max_keepdim(D::Minus1)?)?;
        let max = own_max
            .index_select(&self.own_slot, 0)?
            .maximum(&prompt_max.index_select(&self.prompt_slot, 0)?)?;
        // Weights per key set, normalized by their sum over both (so that, as in one
        // softmax, they stay within [0, 1] and a half-type product cannot overflow).
        let weights = |scores: &Tensor, part: &Part, slot_rows: &Tensor| {
            scores
                .broadcast_sub(&from_rows(&max, slot_rows, part)?)?
                .exp()
        };
        let own_weights = weights(&own_scores, &self.own, &self.own_row)?;
        let prompt_weights = weights(&prompt_scores, &self.prompts, &self.prompt_row)?;
        let sums = |weights: &Tensor, slots: &Tensor| {
            to_slots(&weights.sum_keepdim(D::Minus1)?)?.index_select(slots, 0)
        };
        let total =
            (sums(&own_weights, &self.own_slot)? + sums(&prompt_weights, &self.prompt_slot)?)?;
        let outputs = |weights: &Tensor, values: &Tensor, part: &Part, slot_rows, slots| {
            weights
                .broadcast_div(&from_rows(&total, slot_rows, part)?)?
                .to_dtype(dtype)?
                .matmul(values)?
                .to_dtype(DType::F32)?
                .transpose(1, 2)?
                .reshape(((), heads, d))?
                .index_select(slots, 0)
        };
        let own = outputs(
            &own_weights,
            &own_values,
            &self.own,
            &self.own_row,
            &self.own_slot,
        )?;
        let prompt = outputs(
            &prompt_weights,
            &prompt_values,
            &self.prompts,
            &self.prompt_row,
            &self.prompt_slot,
        )?;
        (own + prompt)?
            .to_dtype(dtype)?
            .reshape((self.rows, heads * d))
    }
}

/// A batch whose inputs share prompts, laid out for padded attention.
pub struct SharedPadding {
    alone: Option<Part>,
    continuing: Option<Continuing>,
    /// Per packed row: its row in the parts' outputs, `alone`'s then `continuing`'s.
    back: Tensor,
}

impl SharedPadding {
    /// The layout of `segments`, with sliding-window masks of `window` keys where given.
    pub fn new(segments: &Segments, window: Option<usize>, device: &Device) -> Result<Self> {
        let (alone, continuing): (Vec<usize>, Vec<usize>) =
            (0..segments.count()).partition(|&s| segments.prefix_rows(s).1 == 0);
        let mut back = vec![0u32; segments.total_rows()];
        let mut outputs = 0;
        let alone = if alone.is_empty() {
            None
        } else {
            let part = own_rows_part(segments, &alone, window, device)?;
            for (task, &s) in alone.iter().enumerate() {
                let (start, own) = segments.rows(s);
                for j in 0..own {
                    back[start + j] = (task * part.queries + j) as u32;
                }
            }
            outputs = part.query_slots();
            Some(part)
        };
        let continuing = if continuing.is_empty() {
            None
        } else {
            let part = continuing_part(segments, &continuing, window, device)?;
            let mut row = outputs;
            for &s in &continuing {
                let (start, own) = segments.rows(s);
                for j in 0..own {
                    back[start + j] = row as u32;
                    row += 1;
                }
            }
            Some(part)
        };
        let rows = back.len();
        Ok(Self {
            alone,
            continuing,
            back: Tensor::from_vec(back, rows, device)?,
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
        let mut outputs = Vec::with_capacity(2);
        if let Some(part) = &self.alone {
            outputs.push(part.attend(&q, &k, &v, how, sliding)?);
        }
        if let Some(part) = &self.continuing {
            outputs.push(part.attend(&q, &k, &v, how, sliding)?);
        }
        Tensor::cat(&outputs, 0)?.index_select(&self.back, 0)
    }

    /// Query rows of the padded blocks (a response's once, in its own block).
    pub fn padded_rows(&self) -> usize {
        self.alone.as_ref().map_or(0, Part::query_slots)
            + self.continuing.as_ref().map_or(0, |c| c.own.query_slots())
    }

    /// Rows gathered for attention, the larger of queries and keys per block: the
    /// batch's largest per-token tensors.
    pub fn gathered_rows(&self) -> usize {
        self.alone.as_ref().map_or(0, Part::gathered_rows)
            + self
                .continuing
                .as_ref()
                .map_or(0, |c| c.own.gathered_rows() + c.prompts.gathered_rows())
    }
}

/// Segments attending to their own rows only, padded on the right: the causal mask alone
/// keeps real queries from the padding, as in the layout without sharing. Positions
/// within a segment differ from its rows' by the same offset, so the mask is the same.
fn own_rows_part(
    segments: &Segments,
    tasks: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Result<Part> {
    let len = tasks.iter().map(|&s| segments.rows(s).1).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(tasks.len() * len);
    for &s in tasks {
        let (start, own) = segments.rows(s);
        for j in 0..len {
            rows.push((start + j.min(own.saturating_sub(1))) as u32);
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

/// A segment's packed rows: the first and how many.
type Rows = (usize, usize);

/// Segments continuing a prefix (`tasks`, in row order, those of one prefix together):
/// their own rows, and per prefix its rows as keys for all of its segments' rows.
fn continuing_part(
    segments: &Segments,
    tasks: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Result<Continuing> {
    let own = own_rows_part(segments, tasks, window, device)?;
    // The responses of each prompt: its rows and theirs, each (first row, count).
    let mut prompts: Vec<(Rows, Vec<Rows>)> = Vec::new();
    for &s in tasks {
        let prefix = segments.prefix_rows(s);
        match prompts.last_mut() {
            Some((p, members)) if *p == prefix => members.push(segments.rows(s)),
            _ => prompts.push((prefix, vec![segments.rows(s)])),
        }
    }
    let keys = prompts.iter().map(|((_, len), _)| *len).max().unwrap_or(0);
    let queries = prompts
        .iter()
        .map(|(_, members)| members.iter().map(|m| m.1).sum::<usize>())
        .max()
        .unwrap_or(0);
    let rows: usize = tasks.iter().map(|&s| segments.rows(s).1).sum();
    let mut own_slot = Vec::with_capacity(rows);
    let mut own_row = vec![0u32; own.query_slots()];
    let mut row = 0;
    for (task, &s) in tasks.iter().enumerate() {
        let own_len = segments.rows(s).1;
        for j in 0..own.queries {
            own_row[task * own.queries + j] = (row + j.min(own_len.saturating_sub(1))) as u32;
        }
        own_slot.extend((0..own_len).map(|j| (task * own.queries + j) as u32));
        row += own_len;
    }
    let n = prompts.len();
    let mut prompt_slot = Vec::with_capacity(rows);
    let mut prompt_row = Vec::with_capacity(n * queries);
    let (mut query_rows, mut query_positions) = (Vec::with_capacity(n * queries), Vec::new());
    let (mut key_rows, mut key_positions) = (Vec::with_capacity(n * keys), Vec::new());
    let mut row = 0;
    for (prompt, ((p_start, p_len), members)) in prompts.iter().enumerate() {
        // This prompt's queries: its responses' rows in order, at their positions.
        let mut slots = Vec::new();
        for &(start, len) in members {
            for j in 0..len {
                prompt_slot.push((prompt * queries + slots.len()) as u32);
                slots.push((start + j, p_len + j, row));
                row += 1;
            }
        }
        for i in 0..queries {
            // A padding query repeats the last real one, so it sees keys and stays finite.
            let (packed, position, of_row) = slots[i.min(slots.len().saturating_sub(1))];
            query_rows.push(packed as u32);
            query_positions.push(position as f32);
            prompt_row.push(of_row as u32);
        }
        for j in 0..keys {
            key_rows.push((p_start + j.min(p_len.saturating_sub(1))) as u32);
            key_positions.push(if j < *p_len { j as f32 } else { NO_KEY });
        }
    }
    let query_positions = Tensor::from_vec(query_positions, (n, 1, queries, 1), device)?;
    let key_positions = Tensor::from_vec(key_positions, (n, 1, 1, keys), device)?;
    // Query position less key position: a key is seen when that is >= 0 (and < window).
    let distance = query_positions.broadcast_sub(&key_positions)?;
    let seen = distance.ge(0f64)?;
    let prompts = Part {
        tasks: n,
        queries,
        keys,
        query_rows: Tensor::from_vec(query_rows, n * queries, device)?,
        key_rows: Tensor::from_vec(key_rows, n * keys, device)?,
        full: additive(&seen)?,
        window: window
            .map(|w| additive(&seen.mul(&distance.lt(w as f64)?)?))
            .transpose()?,
    };
    let own_slots = own.query_slots();
    Ok(Continuing {
        own,
        prompts,
        rows,
        own_slot: Tensor::from_vec(own_slot, rows, device)?,
        prompt_slot: Tensor::from_vec(prompt_slot, rows, device)?,
        own_row: Tensor::from_vec(own_row, own_slots, device)?,
        prompt_row: Tensor::from_vec(prompt_row, n * queries, device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{split_heads, Packing};
    use crate::model::segments::SharedCount;
    use crate::model::testing::{max_diff, prompt_batch, rows_for, Draws};
    use crate::model::{BatchCost, BatchLayout, Sequence};

    fn seq(ids: Vec<u32>) -> Sequence {
        Sequence::plain(ids)
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
        // responses, padded to 8, and per prompt its keys (padded to 23) for its
        // responses' 3 + 1 + 8 and 1 + 6 rows (padded to 12).
        assert_eq!(layout.padded_rows(), 3 * 23 + 5 * 8);
        assert_eq!(layout.gathered_rows(), 3 * 23 + 5 * 8 + 2 * 23);
    }

    #[test]
    fn a_long_prompt_does_not_overflow_half_types() {
        // 2000 prompt keys of equal score and values of 50: weighed before normalizing,
        // f16 products would sum to 1e5 (past its 65504); normalized, each output is 50.
        let prompt: Vec<u32> = (0..2000).map(|p| p % 97).collect();
        let inputs = [
            seq([prompt.as_slice(), &[1]].concat()),
            seq([prompt.as_slice(), &[2, 3]].concat()),
        ];
        let refs: Vec<&Sequence> = inputs.iter().collect();
        let (segments, ids) = Segments::share_prefixes(&refs, 8);
        assert_eq!(ids.len(), 2003);
        let how = Heads {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
            softcap: None,
        };
        let half = |value: f64, width: usize| {
            Tensor::full(value, (ids.len(), width), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let layout = SharedPadding::new(&segments, None, &Device::Cpu).unwrap();
        let out = layout
            .attend(&half(0.0, 8), &half(0.0, 4), &half(50.0, 4), &how, false)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let expected = Tensor::full(50f32, out.shape(), &Device::Cpu).unwrap();
        // f16 rounding: its step at 50 is 1/32.
        let diff = max_diff(&out, &expected);
        assert!(diff < 0.1, "{diff}");
    }

    #[test]
    fn the_batchers_count_is_what_the_layouts_compute() {
        // Seeded batches drawn from a few prompts (some short, some empty) and tails, in
        // token order as the batcher feeds them: the count built input by input equals the
        // packed rows of the segments and the rows this layout gathers.
        let mut draws = Draws::new(0x2545_f491_4f6c_dd1d);
        let mut sharing = 0;
        for _ in 0..300 {
            let mut inputs = prompt_batch(&mut draws, 30, 4, 10, 7);
            inputs.sort_by(|a, b| a.ids.cmp(&b.ids));
            let refs: Vec<&Sequence> = inputs.iter().collect();
            let min_shared = 1 + draws.below(6);
            let mut count = SharedCount::new(min_shared);
            for input in &inputs {
                count.push(&input.ids);
            }
            let tally = count.tally();
            let (segments, _) = Segments::share_prefixes(&refs, min_shared);
            sharing += usize::from(segments.rows_saved(&refs) > 0);
            assert_eq!(tally.rows, segments.total_rows());
            let layout = SharedPadding::new(&segments, None, &Device::Cpu).unwrap();
            assert_eq!(tally.gathered_rows(), layout.gathered_rows());
            // The batcher's cost, asked before the last input joins, is the same.
            let (last, rest) = refs.split_last().unwrap();
            for (layout, cost) in [
                (BatchLayout::PackedSharing { min_shared }, tally.rows),
                (
                    BatchLayout::PaddedSharing { min_shared },
                    tally.gathered_rows(),
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
