//! Helpers shared by the model unit tests.

use candle_core::{Device, Tensor};

use super::Sequence;

/// `len` seeded pseudo-random values in [-1, 1] (xorshift), the same for every call.
pub fn seeded(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// The largest absolute difference between two same-shaped f32 tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Rows of `width` that depend only on a token and its position, as a shared prefix's
/// rows are the same in every input that holds it.
pub fn rows_for(ids: &[u32], positions: &[usize], width: usize) -> Tensor {
    let data: Vec<f32> = ids
        .iter()
        .zip(positions)
        .flat_map(|(&id, &p)| seeded(width, id * 1000 + p as u32))
        .collect();
    Tensor::from_vec(data, (ids.len(), width), &Device::Cpu).unwrap()
}

/// A seeded xorshift stream of draws.
pub struct Draws(u64);

impl Draws {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n) as usize
    }
}

/// Up to `inputs` inputs drawn from one to four prompts (some empty) of fewer than
/// `prompt_len` tokens, each with a tail of 1 to `tail` tokens, tokens below `vocab`:
/// prompts shared by several inputs, duplicates included.
pub fn prompt_batch(
    draws: &mut Draws,
    prompt_len: u64,
    vocab: u64,
    inputs: u64,
    tail: u64,
) -> Vec<Sequence> {
    let prompts: Vec<Vec<u32>> = (0..1 + draws.below(4))
        .map(|_| {
            (0..draws.below(prompt_len))
                .map(|_| draws.below(vocab) as u32)
                .collect()
        })
        .collect();
    (0..1 + draws.below(inputs))
        .map(|_| {
            let prompt = &prompts[draws.below(prompts.len() as u64)];
            let ids: Vec<u32> = prompt
                .iter()
                .copied()
                .chain((0..1 + draws.below(tail)).map(|_| draws.below(vocab) as u32))
                .collect();
            Sequence::plain(ids)
        })
        .collect()
}
