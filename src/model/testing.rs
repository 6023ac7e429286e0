//! Helpers shared by the model unit tests.

use candle_core::{Device, Tensor};

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
