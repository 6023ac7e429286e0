//! `warm eval` on preference pairs: accuracies of members, WARM and ENS match scores
//! computed directly with the library.

mod common;

use std::process::Command;

use candle_core::Device;
use common::server::fixture;
use warm::config::MembersConfig;
use warm::dtype::FloatDType;
use warm::scorer::{Combine, Scorer};
use warm::text::Input;

#[test]
fn eval_reports_member_warm_and_ens_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixture("llama");
    // A second member: the fixture with its score head negated, so accuracies differ.
    let other = tmp.path().join("negated");
    std::fs::create_dir_all(&other).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(llama.join(f), other.join(f)).unwrap();
    }
    let mut tensors = common::read_safetensors(&llama.join("model.safetensors"));
    let score = tensors.get_mut("score.weight").unwrap();
    let negated: Vec<f32> = common::decode("F32", &score.bytes)
        .iter()
        .map(|v| -*v as f32)
        .collect();
    score.bytes = common::encode("F32", &negated);
    common::write_safetensors(
        &other.join("model.safetensors"),
        &tensors.into_iter().collect::<Vec<_>>(),
    );

    let lines = [
        r#"{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5, or maybe 22, it depends"}"#,
        r#"{"prompt": "Capital of France?", "chosen": "Paris is the capital.", "rejected": "London"}"#,
        r#"{"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": [{"role": "assistant", "content": "No."}]}"#,
    ];
    let pairs_path = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs_path, lines.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warm"))
        .args(["eval", "--json", "--allow-unrelated-members"])
        .args([
            "--model",
            llama.to_str().unwrap(),
            "--model",
            other.to_str().unwrap(),
        ])
        .args(["--pairs", pairs_path.to_str().unwrap()])
        .env_remove("WARM_MODEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pairs"], 3);

    // The same numbers straight from the library.
    let inputs: Vec<(Input, Input)> = warm::eval::read_pairs(&pairs_path)
        .unwrap()
        .into_iter()
        .map(|p| (p.chosen, p.rejected))
        .collect();
    let score = |dirs: Vec<std::path::PathBuf>| -> Vec<(f64, f64)> {
        let members = MembersConfig {
            dirs,
            weights: None,
            allow_unrelated_members: true,
        };
        let scorer = Scorer::load(
            &members,
            Combine::Weights,
            FloatDType::F32,
            &Device::Cpu,
            None,
        )
        .unwrap();
        inputs
            .iter()
            .map(|(c, r)| {
                let s = |i: &Input| {
                    f64::from(
                        scorer
                            .score(&[&scorer.encode(i, true, None, true).unwrap()])
                            .unwrap()[0]
                            .value,
                    )
                };
                (s(c), s(r))
            })
            .collect()
    };
    let acc = |scores: &[(f64, f64)]| {
        scores.iter().filter(|(c, r)| c > r).count() as f64 / scores.len() as f64
    };
    let a = score(vec![llama.clone()]);
    let b = score(vec![other.clone()]);
    let warm = score(vec![llama.clone(), other.clone()]);
    let ens: Vec<(f64, f64)> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x.0 + y.0) / 2.0, (x.1 + y.1) / 2.0))
        .collect();
    let close = |v: &serde_json::Value, want: f64| {
        assert!((v.as_f64().unwrap() - want).abs() < 1e-9, "{v} vs {want}")
    };
    close(&report["members"][0]["accuracy"], acc(&a));
    close(&report["members"][1]["accuracy"], acc(&b));
    close(&report["warm"]["accuracy"], acc(&warm));
    close(&report["ens"]["accuracy"], acc(&ens));
    // A negated head ranks every pair the other way round (no ties here).
    assert!((acc(&a) + acc(&b) - 1.0).abs() < 1e-9);

    // A malformed line is named.
    std::fs::write(&pairs_path, "{\"prompt\": \"x\", \"chosen\": 1}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warm"))
        .args([
            "eval",
            "--model",
            llama.to_str().unwrap(),
            "--pairs",
            pairs_path.to_str().unwrap(),
        ])
        .env_remove("WARM_MODEL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pairs.jsonl:1:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// OpenRLHF members whose reward statistics differ fuse into a checkpoint without them;
/// `warm eval --write-reward-stats` measures the fused model's as OpenRLHF's train_rm does
/// (mean and sample standard deviation of every chosen and rejected reward) and writes
/// them where `--normalize-reward` reads them. Several models are refused before scoring.
#[test]
fn write_reward_stats_records_the_fused_models_statistics() {
    let (_keep, shifted) = common::fixture_variant(
        "openrlhf-llama",
        |c| c["mean"] = 0.5.into(),
        common::unchanged,
    );
    let tmp = tempfile::tempdir().unwrap();
    let fused = tmp.path().join("fused");
    let original = fixture("openrlhf-llama");
    common::warm_fuse(&[&original, &shifted], &fused, &[]);
    assert!(warm::reward_stats::RewardStats::of(&fused).is_err());

    let pairs_path = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs_path,
        [
            r#"{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5, or maybe 22"}"#,
            r#"{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let eval = |models: &[&std::path::Path]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_warm"));
        command.args(["eval", "--json", "--write-reward-stats"]);
        for m in models {
            command.arg("--model").arg(m);
        }
        command
            .arg("--pairs")
            .arg(&pairs_path)
            .env_remove("WARM_MODEL")
            .output()
            .unwrap()
    };
    let out = eval(&[&fused]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The statistics straight from the library's scores.
    let scorer = Scorer::load_one(&fused).unwrap();
    let rewards: Vec<f64> = warm::eval::read_pairs(&pairs_path)
        .unwrap()
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .map(|input| {
            let sequence = scorer.encode(input, true, None, true).unwrap();
            f64::from(scorer.score(&[&sequence]).unwrap()[0].value)
        })
        .collect();
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let stats = warm::reward_stats::RewardStats::of(&fused).unwrap();
    assert!(
        (f64::from(stats.mean) - mean).abs() < 1e-5,
        "{stats} vs {mean}"
    );
    assert!(
        (f64::from(stats.std) - std).abs() < 1e-5,
        "{stats} vs {std}"
    );
    assert_eq!(
        report["warm"]["reward_mean"].as_f64().unwrap() as f32,
        stats.mean
    );

    let out = eval(&[&original, &shifted]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("one checkpoint's config.json, and 2 models"),
        "{stderr}"
    );
}
