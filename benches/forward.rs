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

/// A process reward model reads a row at every step tag: 8 inputs of 256 tokens with a tag
/// after every 32 (8 steps each), on the qwen2-prm fixture and, when WARM_BENCH_PRM names
/// one (benches/make_prm.py), on a Qwen2.5-Math-PRM of SmolLM2-135M's shapes.
fn step_rows(c: &mut Criterion) {
    const INPUTS: usize = 8;
    const LEN: usize = 256;
    const STEP: usize = 32;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut models = vec![("qwen2-prm".to_string(), root.join("qwen2-prm"))];
    if let Ok(dir) = std::env::var("WARM_BENCH_PRM") {
        models.push(("custom".into(), PathBuf::from(dir)));
    }
    let mut group = c.benchmark_group("step_rows");
    group.sample_size(10);
    for (name, dir) in models {
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .expect("the model's tokenizer.json");
        let tag = tokenizer
            .token_to_id("<extra_0>")
            .expect("Qwen2.5-Math-PRM's step tag");
        let scorer = load(dir);
        let seqs: Vec<Sequence> = Sequence::synthetic_batch(INPUTS, LEN, 5..305)
            .into_iter()
            .map(|s| {
                let mut ids: Vec<u32> = s.ids.into_iter().filter(|&id| id != tag).collect();
                for step_end in (STEP - 1..ids.len()).step_by(STEP) {
                    ids[step_end] = tag;
                }
                Sequence::plain(ids)
            })
            .collect();
        let refs: Vec<&Sequence> = seqs.iter().collect();
        group.throughput(Throughput::Elements((INPUTS * LEN) as u64));
        group.bench_function(BenchmarkId::new(&name, format!("{INPUTS}x{LEN}")), |b| {
            b.iter(|| scorer.score(&refs).expect("forward"));
        });
    }
    group.finish();
}

criterion_group!(benches, forward, shared_prefix, step_rows);
criterion_main!(benches);
