//! `--reward-label`: which logit of a classifier of several labels is the reward (TRL's
//! sentiment example reads POSITIVE, the second of lvwerra/distilbert-imdb's two).

mod common;

use common::server::{start_failure, Server};
use serde_json::{json, Value};
use warm::scorer::{RewardLabelError, Scorer};

/// The bert fixture with a second label: NEGATIVE is its score head as it was (logit s),
/// POSITIVE `-2 (s - b) + 0.5` with b the head's bias.
fn two_labels() -> (tempfile::TempDir, std::path::PathBuf, f32) {
    let bias = common::decode(
        "F32",
        &common::read_safetensors(&common::server::fixture("bert").join("model.safetensors"))
            ["classifier.bias"]
            .bytes,
    )[0] as f32;
    let (keep, dir) = common::fixture_variant(
        "bert",
        |config| {
            config["id2label"] = json!({"0": "NEGATIVE", "1": "POSITIVE"});
            config["label2id"] = json!({"NEGATIVE": 0, "POSITIVE": 1});
        },
        |name, t| match name.as_str() {
            "classifier.weight" => {
                let w: Vec<f32> = common::decode(&t.dtype, &t.bytes)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect();
                let rows: Vec<f32> = w
                    .iter()
                    .copied()
                    .chain(w.iter().map(|v| -2.0 * v))
                    .collect();
                (name, common::float("F32", &[2, w.len()], &rows))
            }
            "classifier.bias" => {
                let b = common::decode(&t.dtype, &t.bytes)[0] as f32;
                (name, common::float("F32", &[2], &[b, 0.5]))
            }
            _ => (name, t),
        },
    );
    (keep, dir, bias)
}

fn cases() -> Vec<(Value, f32)> {
    common::cases::expected("bert")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let input = match case["kind"].as_str().unwrap() {
                "text" => case["text"].clone(),
                _ => json!({"prompt": case["prompt"], "response": case["response"]}),
            };
            (input, case["score"].as_f64().unwrap() as f32)
        })
        .collect()
}

fn scores(server: &Server, inputs: &[Value]) -> Vec<f32> {
    let (status, body) = server.post("/v1/score", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{body}");
    body["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// By name or by index, the chosen label's logit is the reward on the native routes,
/// while TEI's `/predict` still gives every label; without the flag it is the first.
#[test]
fn the_named_label_is_the_reward() {
    let (_keep, dir, bias) = two_labels();
    let dir = dir.display().to_string();
    let (inputs, first): (Vec<Value>, Vec<f32>) = cases().into_iter().unzip();
    let positive: Vec<f32> = first.iter().map(|s| -2.0 * (s - bias) + 0.5).collect();
    for (flag, want, name) in [
        (Some("POSITIVE"), &positive, "POSITIVE"),
        (Some("1"), &positive, "POSITIVE"),
        (None, &first, "NEGATIVE"),
    ] {
        let mut args = vec!["--model", dir.as_str()];
        args.extend(
            flag.map(|label| ["--reward-label", label])
                .into_iter()
                .flatten(),
        );
        let server = Server::started(&args);
        for (got, want) in scores(&server, &inputs).iter().zip(want.iter()) {
            assert!((got - want).abs() < 1e-4, "{flag:?}: {got} vs {want}");
        }
        let (_, info) = server.get("/info");
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["reward_label"]["name"], name, "{info}");
        let (status, predicted) = server.post(
            "/predict",
            &json!({"inputs": inputs[0], "raw_scores": true}),
        );
        assert_eq!(status, 200, "{predicted}");
        assert_eq!(predicted.as_array().unwrap().len(), 2, "{predicted}");
    }
}

/// An unknown label stops the start with the model's labels listed.
#[test]
fn an_unknown_label_is_refused_at_start_with_the_labels() {
    let (_keep, dir, _) = two_labels();
    for label in ["NEUTRAL", "2"] {
        let stderr = start_failure(&[
            "--model".as_ref(),
            dir.as_os_str(),
            "--reward-label".as_ref(),
            label.as_ref(),
        ]);
        assert!(
            stderr.contains(&format!("--reward-label '{label}'"))
                && stderr.contains("0 NEGATIVE, 1 POSITIVE"),
            "{stderr}"
        );
    }
}

/// With ENS the members' chosen logits are combined; a process reward model, whose
/// reward is its weakest step's, refuses a label.
#[test]
fn ensembles_combine_the_chosen_logit_and_process_reward_models_refuse_one() {
    let (_keep, dir, bias) = two_labels();
    let members = warm::config::MembersConfig {
        dirs: vec![dir.clone(), dir],
        weights: None,
        allow_unrelated_members: false,
    };
    let mut ens = Scorer::load(
        &members,
        warm::scorer::Combine::Predictions,
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    ens.reward_from_label("POSITIVE").unwrap();
    let (inputs, first): (Vec<Value>, Vec<f32>) = cases().into_iter().unzip();
    let text = inputs[0].as_str().unwrap().to_string();
    let sequence = ens
        .encode(&warm::text::Input::Text(text), false, None, true)
        .unwrap();
    let score = &ens.score(&[&sequence]).unwrap()[0];
    let want = -2.0 * (first[0] - bias) + 0.5;
    assert!(
        (score.value - want).abs() < 1e-4,
        "{} vs {want}",
        score.value
    );
    assert!(score.uncertainty.unwrap().abs() < 1e-6);

    let mut prm = Scorer::load_one(&common::server::fixture("qwen2-prm")).unwrap();
    assert!(matches!(
        prm.reward_from_label("0"),
        Err(RewardLabelError::Steps)
    ));
}

/// TRL's sentiment loop over lvwerra/distilbert-imdb reads the POSITIVE logit of the
/// text-classification pipeline (special tokens added): the distilbert fixture (its shape)
/// served with `--reward-label POSITIVE` gives transformers' second logit as the reward.
#[test]
fn distilbert_positive_logit_is_transformers_second_logit() {
    let expected = common::cases::expected("distilbert");
    let cases = expected["cases"].as_array().unwrap();
    let dir = common::server::fixture("distilbert").display().to_string();
    let server = Server::started(&["--model", &dir, "--reward-label", "POSITIVE"]);
    let inputs: Vec<Value> = cases
        .iter()
        .map(|case| match case["kind"].as_str().unwrap() {
            "text" => case["text"].clone(),
            _ => json!({"prompt": case["prompt"], "response": case["response"]}),
        })
        .collect();
    let got = scores(&server, &inputs);
    assert_eq!(got.len(), cases.len());
    for (got, case) in got.iter().zip(cases) {
        let want = case["logits"][1].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}
