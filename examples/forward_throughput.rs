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
    // Ordinary vocabulary ids, clear of the special tokens at the start.
    let sequences = Sequence::synthetic_batch(batch, seq_len, 1000..21_000);
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
