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

criterion_group!(benches, forward);
criterion_main!(benches);
