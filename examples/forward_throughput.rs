//! Forward-pass throughput of one checkpoint on the CPU, for comparing with transformers:
//!
//!   cargo run --release --example forward_throughput -- MODEL_DIR BATCH SEQ_LEN ITERS
//!
//! Scores ITERS batches of BATCH sequences of SEQ_LEN tokens (seeded random ids) after one
//! warm-up batch and prints tokens per second, with the allocator settings `warm serve` uses.
//! Threads: CANDLE_NUM_THREADS / RAYON_NUM_THREADS.

use std::path::PathBuf;
use std::time::Instant;

use warm::model::Sequence;
use warm::scorer::Scorer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, batch, seq_len, iters] = args.as_slice() else {
        return Err("usage: forward_throughput MODEL_DIR BATCH SEQ_LEN ITERS".into());
    };
    let (batch, seq_len, iters): (usize, usize, usize) =
        (batch.parse()?, seq_len.parse()?, iters.parse()?);
    warm::alloc::keep_freed_memory_for_reuse();
    let scorer = Scorer::load_one(&PathBuf::from(dir))?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let sequences: Vec<Sequence> = (0..batch)
        .map(|_| Sequence {
            ids: (0..seq_len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Ordinary vocabulary ids, clear of the special tokens at the start.
                    1000 + (state % 20_000) as u32
                })
                .collect(),
            type_ids: vec![0; seq_len],
        })
        .collect();
    let refs: Vec<&Sequence> = sequences.iter().collect();
    scorer.score(&refs)?;
    let started = Instant::now();
    for _ in 0..iters {
        scorer.score(&refs)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = (batch * seq_len * iters) as f64;
    println!(
        "warm: batch {batch} x {seq_len}, {iters} iterations: {:.1} ms/batch, {:.0} tokens/s",
        secs * 1000.0 / iters as f64,
        tokens / secs
    );
    Ok(())
}
