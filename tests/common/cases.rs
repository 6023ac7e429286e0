//! The cases of tests/fixtures/expected/*.json (written by tests/fixtures/generate.py).
#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;
use warm::scorer::Scorer;
use warm::text::{Input, Message};

/// tests/fixtures/expected/NAME.json.
pub fn expected(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/expected")
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Scores every case of tests/fixtures/expected/`fixture`.json with the checkpoint in `dir`,
/// one at a time, and checks each is `factor` times transformers' score, to `tolerance`
/// (relative above 1 in magnitude, absolute below).
pub fn assert_scores(dir: &Path, fixture: &str, factor: f32, tolerance: f32) {
    check_scores(dir, fixture, tolerance, |s| factor * s);
}

/// [`assert_scores`] for a checkpoint whose scores are transformers' plus `offset` (a head
/// with a bias the fixture's has not).
pub fn assert_scores_shifted(dir: &Path, fixture: &str, offset: f32, tolerance: f32) {
    check_scores(dir, fixture, tolerance, |s| s + offset);
}

fn check_scores(dir: &Path, fixture: &str, tolerance: f32, want_of: impl Fn(f32) -> f32) {
    let scorer = Scorer::load_one(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (i, case) in expected(fixture)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let sequence = scorer.encode(&input_of(case), false, None, true).unwrap();
        let got = scorer.score(&[&sequence]).unwrap()[0].value;
        let transformers = case["score"].as_f64().unwrap() as f32;
        let want = want_of(transformers);
        assert!(
            (got - want).abs() < tolerance * want.abs().max(1.0),
            "{}, case {i}: {got} vs {want} (transformers {transformers})",
            dir.display()
        );
    }
}

/// A case's input: `text`, a `pair`, a `chat` or a prompt with its `steps`.
pub fn input_of(case: &Value) -> Input {
    let s = |k: &str| case[k].as_str().unwrap().to_string();
    match case["kind"].as_str().unwrap() {
        "text" => Input::Text(s("text")),
        "pair" => Input::Pair {
            prompt: s("prompt"),
            response: s("response"),
        },
        "chat" => Input::Messages(
            serde_json::from_value::<Vec<Message>>(case["messages"].clone()).unwrap(),
        ),
        "steps" => Input::Steps {
            prompt: s("prompt"),
            steps: serde_json::from_value(case["steps"].clone()).unwrap(),
        },
        other => panic!("unknown case kind {other}"),
    }
}

/// The message of the error loading `dir` fails with; panics if it loads.
pub fn load_error(dir: &Path) -> String {
    match Scorer::load_one(dir) {
        Ok(_) => panic!("{}: loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}
