//! Forward pass per architecture family at a few batch shapes, on the parity fixtures
//! (tiny models: this measures each family's code path and overheads) and, when
//! WARM_BENCH_MODEL names a checkpoint folder, on that model too.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use warm::model::Sequence;
use warm::scorer::Scorer;

const SHAPES: &[(usize, usize)] = &[(1, 32), (8, 128), (32, 64)];

fn load(dir: PathBuf) -> Scorer {
    Scorer::load_one(&dir).expect("load the model")
}

fn forward(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut models: Vec<(String, PathBuf, u32)> =
        ["bert", "roberta", "deberta-v2", "llama", "qwen3", "gemma2"]
            .iter()
            .map(|n| (n.to_string(), root.join(n), 300))
            .collect();
    if let Ok(dir) = std::env::var("WARM_BENCH_MODEL") {
        models.push(("custom".into(), PathBuf::from(dir), 20_000));
    }
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for (name, dir, vocab) in models {
        let scorer = load(dir);
        for &(batch, len) in SHAPES {
            let seqs = Sequence::synthetic_batch(batch, len, 5..5 + vocab);
            let refs: Vec<&Sequence> = seqs.iter().collect();
            group.throughput(Throughput::Elements((batch * len) as u64));
            group.bench_function(BenchmarkId::new(&name, format!("{batch}x{len}")), |b| {
                b.iter(|| scorer.score(&refs).expect("forward"));
            });
        }
    }
    group.finish();
}

/// Best-of-N on a decoder: one prompt of `PROMPT` tokens and `N` responses of varied
/// lengths per batch, with shared prefixes computed once (the default) and apart (0), and
/// a batch that shares nothing (the planning's cost alone).
fn shared_prefix(c: &mut Criterion) {
    const PROMPT: usize = 256;
    const N: usize = 8;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut models = vec![("llama".to_string(), root.join("llama"), 300u32)];
    if let Ok(dir) = std::env::var("WARM_BENCH_MODEL") {
        models.push(("custom".into(), PathBuf::from(dir), 20_000));
    }
    let mut group = c.benchmark_group("shared_prefix");
    group.sample_size(10);
    for (name, dir, vocab) in models {
        let mut scorer = load(dir);
        let prompt = &Sequence::synthetic_batch(1, PROMPT, 5..5 + vocab)[0];
        let best_of_n: Vec<Sequence> = Sequence::synthetic_batch(N, 48, 5..5 + vocab)
            .into_iter()
            .enumerate()
            .map(|(i, response)| {
                let ids: Vec<u32> = prompt
                    .ids
                    .iter()
                    .chain(&response.ids[..16 + 4 * i])
                    .copied()
                    .collect();
                Sequence::plain(ids)
            })
            .collect();
        let unrelated = Sequence::synthetic_batch(N, PROMPT + 32, 5..5 + vocab);
        for (workload, seqs) in [("best_of_8", &best_of_n), ("unrelated_8", &unrelated)] {
            let refs: Vec<&Sequence> = seqs.iter().collect();
            let tokens: usize = seqs.iter().map(|s| s.ids.len()).sum();
            group.throughput(Throughput::Elements(tokens as u64));
            for (mode, min) in [
                ("shared", warm::model::DEFAULT_MIN_SHARED_PREFIX),
                ("apart", 0),
            ] {
                scorer.share_prefixes_from(min);
                group.bench_function(BenchmarkId::new(&name, format!("{workload}/{mode}")), |b| {
                    b.iter(|| scorer.score(&refs).expect("forward"));
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, forward, shared_prefix);
criterion_main!(benches);
