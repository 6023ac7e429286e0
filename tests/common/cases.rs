//! The cases of tests/fixtures/expected/*.json (written by tests/fixtures/generate.py).
#![allow(dead_code)]

use serde_json::Value;
use warm::text::{Input, Message};

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
