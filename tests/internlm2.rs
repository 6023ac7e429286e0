//! InternLM2's reward models (`InternLM2ForRewardModel`): the fixture
//! tests/fixtures/models/internlm2-rm is checked for parity in tests/parity.rs (every input
//! ends with the reward token, truncation leaves room for it); these tests serve it over
//! HTTP, average two members with `warm fuse`, and name what is wrong with a checkpoint it
//! cannot load.

mod common;

use std::path::PathBuf;

use common::cases::{assert_scores, expected, load_error};
use common::server::{fixture, Server};
use common::{unchanged, Stored};
use serde_json::{json, Value};

const NAME: &str = "internlm2-rm";

fn variant(
    edit: impl FnOnce(&mut Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    common::fixture_variant(NAME, edit, tensor)
}

/// Texts, pairs and conversations score as get_score does on the native route, and the
/// templated texts of the pairs and conversations on `/get_reward` (OpenRLHF's route, no
/// special tokens added) score the same: the reward token is appended on every route.
/// `/info` names the token.
#[test]
fn served_inputs_end_with_the_reward_token() {
    let expected = expected(NAME);
    let cases = expected["cases"].as_array().unwrap();
    let server = Server::started(&["--model", &fixture(NAME).display().to_string()]);

    let inputs: Vec<Value> = cases
        .iter()
        .map(|c| match c["kind"].as_str().unwrap() {
            "text" => c["text"].clone(),
            "pair" => json!({"prompt": c["prompt"], "response": c["response"]}),
            _ => json!({"messages": c["messages"]}),
        })
        .collect();
    let (status, body) = server.post("/v1/score", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{body}");
    for (case, got) in cases.iter().zip(body["scores"].as_array().unwrap()) {
        let (got, want) = (got.as_f64().unwrap(), case["score"].as_f64().unwrap());
        assert!((got - want).abs() < 1e-4, "{got} vs transformers {want}");
    }

    let templated: Vec<&Value> = cases.iter().filter(|c| c["kind"] != "text").collect();
    let rendered: Vec<&str> = templated
        .iter()
        .map(|c| c["rendered"].as_str().unwrap())
        .collect();
    let (status, body) = server.post("/get_reward", &json!({ "query": rendered }));
    assert_eq!(status, 200, "{body}");
    for (case, got) in templated.iter().zip(body["rewards"].as_array().unwrap()) {
        let (got, want) = (got.as_f64().unwrap(), case["score"].as_f64().unwrap());
        assert!((got - want).abs() < 1e-4, "/get_reward {got} vs {want}");
    }
    // A client that appends the reward token to its text itself gets no second one.
    let token = expected["reward_token"].as_str().unwrap();
    let with_token: Vec<String> = rendered.iter().map(|r| format!("{r}{token}")).collect();
    let (status, again) = server.post("/get_reward", &json!({ "query": with_token }));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["rewards"], body["rewards"]);

    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["architecture"], "InternLM2ForRewardModel", "{info}");
    assert_eq!(
        info["reward_token"],
        json!({"id": expected["reward_token_id"], "text": expected["reward_token"]}),
        "{info}"
    );
}

/// WARM over InternLM2 members: the second member's v_head is three times the first's, the
/// average twice it, and the score (linear in v_head) doubles. The fused checkpoint keeps
/// InternLM2's own names (the packed wqkv is averaged, then cut at load).
#[test]
fn warm_fuse_averages_internlm2_members() {
    let (_keep, tripled) = variant(
        |_| {},
        |name, t| match name.as_str() {
            "v_head.weight" => (name, common::scaled(t, 3.0)),
            _ => (name, t),
        },
    );
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&fixture(NAME), &tripled], &fused, &[]);
    let config = common::read_config(&fused);
    assert_eq!(config["architectures"], json!(["InternLM2ForRewardModel"]));
    let tensors = common::read_checkpoint(&fused);
    assert!(tensors.contains_key("model.layers.0.attention.wqkv.weight"));
    assert!(!tensors.keys().any(|name| name.contains("q_proj")));
    assert_scores(&fused, NAME, 2.0, 1e-4);
}

#[test]
fn what_cannot_load_is_named() {
    let without = |key: &'static str| {
        move |c: &mut Value| {
            c.as_object_mut().unwrap().remove(key);
        }
    };
    let (_keep, dir) = variant(without("reward_token_id"), unchanged);
    let message = load_error(&dir);
    assert!(message.contains("'reward_token_id'"), "{message}");

    let (_keep, dir) = variant(
        |c| c["reward_token_id"] = c["vocab_size"].clone(),
        unchanged,
    );
    let message = load_error(&dir);
    assert!(message.contains("vocab_size"), "{message}");

    // Four key/value heads in config.json, two in the packed weights.
    let (_keep, dir) = variant(|c| c["num_key_value_heads"] = 4.into(), unchanged);
    let message = load_error(&dir);
    assert!(
        message.contains("attention.wqkv") && message.contains("4 key/value heads"),
        "{message}"
    );

    // Biases in config.json (absent: InternLM2Config's default, true) and none in the
    // weights.
    let (_keep, dir) = variant(
        |_| {},
        |name, t| {
            if name.ends_with(".bias") {
                (name.replace(".bias", ".unused"), t)
            } else {
                (name, t)
            }
        },
    );
    let message = load_error(&dir);
    assert!(
        message.contains("model.layers.0.attention.wqkv.bias"),
        "{message}"
    );
    let (_keep, dir) = variant(
        |c| {
            c.as_object_mut().unwrap().remove("bias");
        },
        |name, t| (name.replace("feed_forward.w3", "feed_forward.w4"), t),
    );
    let message = load_error(&dir);
    assert!(
        message.contains("model.layers.0.feed_forward.w3.weight"),
        "{message}"
    );
}
