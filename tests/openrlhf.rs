//! Reward models as OpenRLHF's `train_rm` saves them (class `RewardModel` over a
//! transformers decoder, head `<value_head_prefix>.weight`): the fixture
//! tests/fixtures/models/openrlhf-llama is checked for parity in tests/parity.rs; these tests
//! cover the variants older OpenRLHF versions wrote, the errors, and serving one over HTTP.

mod common;

use std::path::PathBuf;

use common::cases::{assert_scores, expected, load_error};
use common::server::{fixture, Server};
use common::{unchanged, Stored};
use serde_json::Value;

/// A copy of the fixture with config.json edited and each tensor passed through `tensor`.
fn variant(
    edit: impl FnOnce(&mut Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    common::fixture_variant("openrlhf-llama", edit, tensor)
}

/// Renames the head `score.weight` to `head.weight`.
fn head_named(head: &'static str) -> impl Fn(String, Stored) -> (String, Stored) {
    move |name, t| match name.as_str() {
        "score.weight" => (format!("{head}.weight"), t),
        _ => (name, t),
    }
}

/// Before December 2024 train_rm wrote no `value_head_prefix` and named the head
/// `value_head`; until mid-2024 the class was `LLMForSequenceRegression`. Each loads and
/// scores like the fixture.
#[test]
fn older_openrlhf_layouts_score_alike() {
    let without_prefix = |c: &mut Value| {
        c.as_object_mut().unwrap().remove("value_head_prefix");
    };
    let (_keep, dir) = variant(without_prefix, unchanged);
    assert_scores(&dir, "openrlhf-llama", 1.0, 1e-4);
    let (_keep, dir) = variant(without_prefix, head_named("value_head"));
    assert_scores(&dir, "openrlhf-llama", 1.0, 1e-4);
    let (_keep, dir) = variant(
        |c| {
            c["architectures"] = serde_json::json!(["LLMForSequenceRegression"]);
            c["value_head_prefix"] = "value_head".into();
        },
        head_named("value_head"),
    );
    assert_scores(&dir, "openrlhf-llama", 1.0, 1e-4);
}

#[test]
fn a_missing_head_and_an_unsupported_backbone_are_named() {
    let (_keep, dir) = variant(|c| c["value_head_prefix"] = "v_head".into(), unchanged);
    let message = load_error(&dir);
    assert!(message.contains("v_head.weight"), "{message}");

    let (_keep, dir) = variant(
        |c| {
            c.as_object_mut().unwrap().remove("value_head_prefix");
        },
        head_named("reward_head"),
    );
    let message = load_error(&dir);
    assert!(
        message.contains("no value head") && message.contains("value_head.weight"),
        "{message}"
    );

    let (_keep, dir) = variant(|c| c["model_type"] = "phi3".into(), unchanged);
    let message = load_error(&dir);
    assert!(
        message.contains("model_type 'phi3'") && message.contains("llama, mistral"),
        "{message}"
    );
}

/// OpenRLHF's PPO sends already templated text to `/get_reward`; the native route formats
/// a pair with the chat template. Both give transformers' scores.
#[test]
fn served_over_get_reward_and_the_native_route() {
    let expected = expected("openrlhf-llama");
    let cases = expected["cases"].as_array().unwrap();
    let templated: Vec<&Value> = cases.iter().filter(|c| c["rendered"].is_string()).collect();
    assert!(templated.len() >= 2);
    let server = Server::started(&["--model", &fixture("openrlhf-llama").display().to_string()]);
    let queries: Vec<&str> = templated
        .iter()
        .map(|c| c["rendered"].as_str().unwrap())
        .collect();
    let (status, body) = server.post("/get_reward", &serde_json::json!({ "query": queries }));
    assert_eq!(status, 200, "{body}");
    let pairs: Vec<Value> = templated
        .iter()
        .filter(|c| c["kind"] == "pair")
        .map(|c| serde_json::json!({"prompt": c["prompt"], "response": c["response"]}))
        .collect();
    let (status, native) = server.post("/v1/score", &serde_json::json!({ "inputs": pairs }));
    assert_eq!(status, 200, "{native}");
    let pair_scores = templated
        .iter()
        .filter(|c| c["kind"] == "pair")
        .zip(native["scores"].as_array().unwrap());
    let all = templated.iter().zip(body["rewards"].as_array().unwrap());
    for (case, got) in all.chain(pair_scores) {
        let (got, want) = (got.as_f64().unwrap(), case["score"].as_f64().unwrap());
        assert!((got - want).abs() < 1e-4, "{got} vs transformers {want}");
    }
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["architecture"], "RewardModel", "{info}");
}

/// WARM over OpenRLHF members: a second member whose head is three times the first's
/// (same backbone) averages to twice the head, so every reward doubles; the output is still
/// an OpenRLHF checkpoint (class, value_head_prefix, tensor names), without a reward mean
/// the members disagree on.
#[test]
fn warm_fuse_averages_openrlhf_members() {
    let (_keep, tripled) = variant(
        |c| c["mean"] = 0.5.into(),
        |name, t| match name.as_str() {
            "score.weight" => (name, common::scaled(t, 3.0)),
            _ => (name, t),
        },
    );
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&fixture("openrlhf-llama"), &tripled], &fused, &[]);
    let config = common::read_config(&fused);
    assert_eq!(config["architectures"], serde_json::json!(["RewardModel"]));
    assert_eq!(config["value_head_prefix"], "score");
    // The members' reward statistics (mean 0.25 and 0.5) describe neither the fused model.
    assert!(config.get("mean").is_none(), "{config}");
    assert_eq!(config["std"], 1.75, "equal in every member, so kept");
    assert_scores(&fused, "openrlhf-llama", 2.0, 1e-4);
}

/// A member saved before train_rm wrote `value_head_prefix` and one saved after, with the
/// same head tensor, can be averaged: the tensor names decide, not the key.
#[test]
fn members_with_and_without_value_head_prefix_fuse() {
    let (_keep, older) = variant(
        |c| {
            c.as_object_mut().unwrap().remove("value_head_prefix");
        },
        unchanged,
    );
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&fixture("openrlhf-llama"), &older], &fused, &[]);
    assert_scores(&fused, "openrlhf-llama", 1.0, 1e-4);
}

/// `--normalize-reward`, as OpenRLHF's serve_rm --normalize_reward (its example remote RM
/// script uses it): every reward becomes (reward - mean) / std with config.json's
/// statistics (the fixture's: 0.25 and 1.75).
#[test]
fn normalize_reward_standardizes_with_the_config_statistics() {
    let expected = expected("openrlhf-llama");
    let cases: Vec<&Value> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["rendered"].is_string())
        .collect();
    let server = Server::started(&[
        "--model",
        &fixture("openrlhf-llama").display().to_string(),
        "--normalize-reward",
    ]);
    let queries: Vec<&str> = cases
        .iter()
        .map(|c| c["rendered"].as_str().unwrap())
        .collect();
    let (status, body) = server.post("/get_reward", &serde_json::json!({ "query": queries }));
    assert_eq!(status, 200, "{body}");
    for (case, got) in cases.iter().zip(body["rewards"].as_array().unwrap()) {
        let raw = case["score"].as_f64().unwrap() as f32;
        let want = (raw - 0.25) / 1.75;
        let got = got.as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "{got} vs {want} (raw {raw})");
    }
    // The native route too (a pair, formatted as /get_reward's text was), and TEI's
    // /predict applies its sigmoid to the standardized reward.
    let pair = cases.iter().find(|c| c["kind"] == "pair").unwrap();
    let raw = pair["score"].as_f64().unwrap() as f32;
    let standardized = (raw - 0.25) / 1.75;
    let input = serde_json::json!({"prompt": pair["prompt"], "response": pair["response"]});
    let (status, native) = server.post("/v1/score", &serde_json::json!({ "inputs": [input] }));
    assert_eq!(status, 200, "{native}");
    let got = native["scores"][0].as_f64().unwrap() as f32;
    assert!(
        (got - standardized).abs() < 1e-4,
        "{native} vs {standardized}"
    );
    let text = pair["rendered"].as_str().unwrap();
    let (_, plain) = server.post("/v1/score", &serde_json::json!({ "inputs": [text] }));
    let (status, tei) = server.post("/predict", &serde_json::json!({ "inputs": text }));
    assert_eq!(status, 200, "{tei}");
    let plain = plain["scores"][0].as_f64().unwrap() as f32;
    let sigmoid = 1.0 / (1.0 + (-plain).exp());
    let got = tei[0]["score"].as_f64().unwrap() as f32;
    assert!((got - sigmoid).abs() < 1e-5, "{tei} vs sigmoid({plain})");
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["reward_statistics"],
        serde_json::json!([{"mean": 0.25, "std": 1.75}]),
        "{info}"
    );
}

/// With ENS each member is standardized by its own statistics before the members are
/// averaged; averaging weights, whose statistics are unknown when the members' differ,
/// refuses to start with one message naming both.
#[test]
fn normalize_reward_per_member_and_refused_for_a_fusion_of_differing_members() {
    let (_keep, shifted) = variant(|c| c["mean"] = 0.5.into(), unchanged);
    let members = warm::config::MembersConfig {
        dirs: vec![fixture("openrlhf-llama"), shifted.clone()],
        weights: None,
        allow_unrelated_members: false,
    };
    let mut ens = warm::scorer::Scorer::load(
        &members,
        warm::scorer::Combine::Predictions,
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    ens.normalize_rewards(&members).unwrap();
    let case = &expected("openrlhf-llama")["cases"][3];
    let sequence = ens
        .encode(&common::cases::input_of(case), false, None, true)
        .unwrap();
    let got = ens.score(&[&sequence]).unwrap()[0].value;
    let raw = case["score"].as_f64().unwrap() as f32;
    let want = ((raw - 0.25) / 1.75 + (raw - 0.5) / 1.75) / 2.0;
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");

    let original = fixture("openrlhf-llama");
    let stderr = common::server::start_failure(&[
        "--normalize-reward".as_ref(),
        "--model".as_ref(),
        original.as_os_str(),
        "--model".as_ref(),
        shifted.as_os_str(),
    ]);
    assert!(
        stderr.contains("--normalize-reward: the members' reward statistics differ")
            && stderr.contains("mean 0.5, std 1.75"),
        "{stderr}"
    );
}
