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

/// (warm's score of the checkpoint in `dir`, transformers' score) for each case of
/// `expected`, scored one at a time.
pub fn scored_cases(dir: &Path, expected: &Value) -> Vec<(f32, f32)> {
    let scorer = Scorer::load_one(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let sequence = scorer.encode(&input_of(case), false, None, true).unwrap();
            let got = scorer.score(&[&sequence]).unwrap()[0].value;
            (got, case["score"].as_f64().unwrap() as f32)
        })
        .collect()
}

/// A case's input: `text`, a `pair` or a `chat`.
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
