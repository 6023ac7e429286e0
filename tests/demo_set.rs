//! The demo WARM set in models/: its members fuse (shared init), the fused model scores as
//! transformers scores the f32 weight average of the same members (the recipe's
//! expected.json), and the set stays within its size budget.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;
use warm::config::MembersConfig;
use warm::demo::{demo_members, DEMO_SET};
use warm::dtype::FloatDType;
use warm::scorer::{Combine, Scorer};
use warm::text::Input;

const TOLERANCE: f32 = 1e-4;
const SIZE_BUDGET: u64 = 40_000_000;

fn set_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(DEMO_SET)
}

fn members() -> MembersConfig {
    MembersConfig {
        dirs: demo_members().expect("the demo set is committed"),
        weights: None,
        allow_unrelated_members: false,
    }
}

#[test]
fn the_demo_set_has_at_least_four_members_that_share_an_init() {
    let config = members();
    assert!(config.dirs.len() >= 4, "{:?}", config.dirs);
    let report = warm::fuse::inspect(&config).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn the_fused_demo_set_scores_as_transformers_does() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(set_dir().join("expected.json")).unwrap()).unwrap();
    let config = members();
    let names: Vec<String> = config
        .dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let expected_names: Vec<String> = serde_json::from_value(expected["members"].clone()).unwrap();
    assert_eq!(names, expected_names);
    let scorer = Scorer::load(
        &config,
        Combine::Weights,
        FloatDType::F32,
        &Device::Cpu,
        None,
    )
    .unwrap();
    let mut worst = 0f32;
    for (i, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let input = Input::Pair {
            prompt: case["prompt"].as_str().unwrap().into(),
            response: case["response"].as_str().unwrap().into(),
        };
        let seq = scorer.encode(&input, false, None, true).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(seq.ids, want_ids, "case {i}: token ids");
        let got = scorer.score(&[&seq]).unwrap()[0].value;
        let want = case["score"].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < TOLERANCE,
            "case {i}: {got} vs transformers {want}"
        );
        worst = worst.max((got - want).abs());
    }
    eprintln!("demo set: max |diff| vs transformers {worst:.2e}");
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                size_of(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn the_demo_set_stays_within_its_size_budget() {
    let size = size_of(&set_dir());
    assert!(
        size <= SIZE_BUDGET,
        "models/{DEMO_SET} is {size} bytes, over the {SIZE_BUDGET} byte budget"
    );
}
