//! ArmoRM (RLHFlow's `LlamaForRewardModelWithGating`): the fixture
//! tests/fixtures/models/armo-llama is checked for parity in tests/parity.rs; these tests
//! serve it over HTTP (conversations scored, plain text refused on its own), average two
//! members with `warm fuse`, and name what is wrong with a checkpoint it cannot load.

mod common;

use std::path::PathBuf;

use common::cases::{assert_scores, expected, load_error};
use common::server::{fixture, Server};
use common::{unchanged, Stored};
use serde_json::{json, Value};

/// A copy of the fixture with config.json edited and each tensor passed through `tensor`.
fn variant(
    edit: impl FnOnce(&mut Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    common::fixture_variant("armo-llama", edit, tensor)
}

/// Pairs and conversations score as transformers does, on the native route (with each
/// objective's reward) and on `/get_reward` (templated text); a request with plain text, which has no prompt end for
/// the gate to read, is refused with the input named, and the server goes on serving.
#[test]
fn served_conversations_score_and_plain_text_is_refused() {
    let expected = expected("armo-llama");
    let cases = expected["cases"].as_array().unwrap();
    let server = Server::started(&["--model", &fixture("armo-llama").display().to_string()]);

    let inputs: Vec<Value> = cases
        .iter()
        .map(|c| match c["kind"].as_str().unwrap() {
            "pair" => json!({"prompt": c["prompt"], "response": c["response"]}),
            _ => json!({"messages": c["messages"]}),
        })
        .collect();
    let (status, native) = server.post("/v1/score", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{native}");
    let rendered: Vec<&str> = cases
        .iter()
        .map(|c| c["rendered"].as_str().unwrap())
        .collect();
    let (status, rewards) = server.post("/get_reward", &json!({ "query": rendered }));
    assert_eq!(status, 200, "{rewards}");
    // Each objective's reward, which the gate weighs into the score, beside it.
    for (case, got) in cases
        .iter()
        .zip(native["objective_scores"].as_array().unwrap())
    {
        let want = case["objective_scores"].as_array().unwrap();
        assert_eq!(got.as_array().map(Vec::len), Some(want.len()), "{got}");
        for (g, w) in got.as_array().unwrap().iter().zip(want) {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() < 1e-4,
                "objectives {got} vs transformers {want:?}"
            );
        }
    }
    let native = native["scores"].as_array().unwrap();
    let rewards = rewards["rewards"].as_array().unwrap();
    for ((case, a), b) in cases.iter().zip(native).zip(rewards) {
        let want = case["score"].as_f64().unwrap();
        for got in [a, b] {
            let got = got.as_f64().unwrap();
            assert!((got - want).abs() < 1e-4, "{got} vs transformers {want}");
        }
    }

    let text = expected["unscorable"][0]["text"].as_str().unwrap();
    let (status, body) = server.post("/v1/score", &json!({ "inputs": [inputs[0].clone(), text] }));
    assert_eq!(status, 422, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("inputs[1]:") && message.contains("prompt ends"),
        "{body}"
    );
    let (status, _) = server.post("/v1/score", &json!({ "inputs": [inputs[0].clone()] }));
    assert_eq!(status, 200);
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["architecture"], "LlamaForRewardModelWithGating",
        "{info}"
    );
}

/// WARM over ArmoRM members: a second member whose regression layer is three times the
/// first's averages to twice it, and the score, linear in the objectives' rewards, doubles.
/// The gate, the transform and the backbone are the same in both.
#[test]
fn warm_fuse_averages_armo_members() {
    let (_keep, tripled) = variant(
        |_| {},
        |name, t| match name.as_str() {
            "regression_layer.weight" => (name, common::scaled(t, 3.0)),
            _ => (name, t),
        },
    );
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&fixture("armo-llama"), &tripled], &fused, &[]);
    let config = common::read_config(&fused);
    assert_eq!(
        config["architectures"],
        json!(["LlamaForRewardModelWithGating"])
    );
    assert_eq!(config["num_objectives"], 5);
    assert_scores(&fused, "armo-llama", 2.0, 1e-4);
    // The objectives' rewards, the regression layer's outputs, double as well.
    let scorer = warm::scorer::Scorer::load_one(&fused).unwrap();
    for case in expected("armo-llama")["cases"].as_array().unwrap() {
        let sequence = scorer
            .encode(&common::cases::input_of(case), false, None, true)
            .unwrap();
        let got = scorer
            .score(&[&sequence])
            .unwrap()
            .remove(0)
            .objectives
            .unwrap();
        let want = case["objective_scores"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let w = 2.0 * w.as_f64().unwrap() as f32;
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "{got:?} vs 2 x {want:?}"
            );
        }
    }
}

/// Members whose gates differ in temperature compute different functions of the same
/// weights: they are not averaged.
#[test]
fn members_with_other_gating_keys_are_refused() {
    let (_keep, other) = variant(|c| c["gating_temperature"] = 10.0.into(), unchanged);
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::warm_bin())
        .arg("fuse")
        .arg("--model")
        .arg(fixture("armo-llama"))
        .arg("--model")
        .arg(&other)
        .arg("--output")
        .arg(out.path().join("fused"))
        .env_remove("WARM_MODEL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gating_temperature"), "{stderr}");
}

#[test]
fn what_cannot_load_is_named() {
    // The gate finds the prompt's end by Llama 3's special tokens: Qwen2's tokenizer has none.
    let (_keep, dir) = variant(|_| {}, unchanged);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen2").join(file), dir.join(file)).unwrap();
    }
    let message = load_error(&dir);
    assert!(
        message.contains("tokenizer") && message.contains("<|eot_id|>"),
        "{message}"
    );

    let (_keep, dir) = variant(|c| c["gating_temperature"] = 0.into(), unchanged);
    let message = load_error(&dir);
    assert!(message.contains("gating_temperature"), "{message}");

    // Three gating layers in config.json, two in the weights.
    let (_keep, dir) = variant(|c| c["gating_n_hidden"] = 3.into(), unchanged);
    let message = load_error(&dir);
    assert!(message.contains("gating.layers"), "{message}");

    let (_keep, dir) = variant(
        |_| {},
        |name, t| match name.as_str() {
            "reward_transform_matrix" => ("transform".into(), t),
            _ => (name, t),
        },
    );
    let message = load_error(&dir);
    assert!(message.contains("reward_transform_matrix"), "{message}");
}

/// Truncation keeps the end of a conversation: when it cuts the prompt's end away, the
/// input is refused with a message saying so, and a limit that keeps it scores.
#[test]
fn truncation_that_drops_the_prompt_end_is_refused() {
    let expected = expected("armo-llama");
    let long_pair = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "pair")
        .max_by_key(|c| c["ids"].as_array().unwrap().len())
        .unwrap()
        .clone();
    let ids: Vec<u64> = serde_json::from_value(long_pair["ids"].clone()).unwrap();
    let end: Vec<u64> = serde_json::from_value(expected["prompt_end_ids"].clone()).unwrap();
    let at = ids
        .windows(end.len())
        .rposition(|w| w == end.as_slice())
        .unwrap();
    // Tokens from the prompt's end to the last one: the limit of 40 below cuts it.
    assert!(
        ids.len() - at > 40,
        "{} tokens, prompt end at {at}",
        ids.len()
    );
    let input = json!({"prompt": long_pair["prompt"], "response": long_pair["response"]});
    let server = Server::started(&["--model", &fixture("armo-llama").display().to_string()]);
    let (status, body) = server.post(
        "/v1/score",
        &json!({"inputs": [input.clone()], "truncate": true}),
    );
    assert_eq!(status, 200, "{body}");
    let want = long_pair["score"].as_f64().unwrap();
    assert!(
        (body["scores"][0].as_f64().unwrap() - want).abs() < 1e-4,
        "{body}"
    );
    drop(server);
    let server = Server::started(&[
        "--model",
        &fixture("armo-llama").display().to_string(),
        "--max-input-length",
        "40",
    ]);
    let (status, body) = server.post("/v1/score", &json!({"inputs": [input], "truncate": true}));
    assert_eq!(status, 422, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("keep that point when truncating"),
        "{body}"
    );
}
