//! GPT-NeoX reward models (Pythia; TRL's TL;DR reward models are
//! `GPTNeoXForSequenceClassification`). The fixture is checked for parity in
//! tests/parity.rs; these tests load checkpoints as Pythia's are saved, average members,
//! and serve the same backbone under OpenRLHF's and LLaMA-Factory's heads.

mod common;

use common::cases::{assert_scores, load_error};
use common::Stored;
use serde_json::json;

const FIXTURE: &str = "gpt-neox";

/// Pythia's checkpoints carry each layer's attention buffers (the causal mask as a bool
/// `attention.bias`, `attention.masked_bias`, `rotary_emb.inv_freq`), which transformers
/// ignores. Two such members whose score heads differ (the second's tripled) fuse, the
/// buffers are copied, and every reward doubles.
#[test]
fn pythia_checkpoints_with_their_buffers_fuse_and_score() {
    let with_buffers = |scale: f32| {
        let (keep, dir) = common::fixture_copy(FIXTURE);
        let path = dir.join("model.safetensors");
        let mut tensors: Vec<(String, Stored)> = common::read_safetensors(&path)
            .into_iter()
            .map(|(name, t)| match name.as_str() {
                "score.weight" => (name, common::scaled(t, scale)),
                _ => (name, t),
            })
            .collect();
        let positions = 256;
        let tril: Vec<u8> = (0..positions * positions)
            .map(|i| u8::from(i % positions <= i / positions))
            .collect();
        for layer in 0..2 {
            let prefix = format!("gpt_neox.layers.{layer}.attention");
            let mask = Stored {
                dtype: "BOOL".into(),
                shape: vec![1, 1, positions, positions],
                bytes: tril.clone(),
            };
            tensors.push((format!("{prefix}.bias"), mask));
            tensors.push((
                format!("{prefix}.masked_bias"),
                common::float("F32", &[], &[-1e9]),
            ));
            tensors.push((
                format!("{prefix}.rotary_emb.inv_freq"),
                common::float("F32", &[2], &[1.0, 0.01]),
            ));
        }
        common::write_safetensors(&path, &tensors);
        (keep, dir)
    };
    let (_a, first) = with_buffers(1.0);
    assert_scores(&first, FIXTURE, 1.0, 1e-4);
    let (_b, tripled) = with_buffers(3.0);
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&first, &tripled], &fused, &[]);
    let tensors = common::read_checkpoint(&fused);
    assert_eq!(
        tensors["gpt_neox.layers.1.attention.bias"].bytes,
        common::read_safetensors(&first.join("model.safetensors"))
            ["gpt_neox.layers.1.attention.bias"]
            .bytes
    );
    assert_scores(&fused, FIXTURE, 2.0, 1e-4);
}

/// OpenRLHF's RewardModel keeps the backbone under its own prefix (`gpt_neox`) and a
/// bias-free head named by `value_head_prefix`: the same tensors, the same rewards.
#[test]
fn an_openrlhf_reward_model_over_gpt_neox_scores_as_the_classifier() {
    let (_keep, dir) = common::fixture_variant(
        FIXTURE,
        |config| {
            config["architectures"] = json!(["RewardModel"]);
            config["value_head_prefix"] = json!("value_head");
            config["normalize_reward"] = json!(false);
        },
        |name, t| (name.replace("score.", "value_head."), t),
    );
    assert_scores(&dir, FIXTURE, 1.0, 1e-4);
}

/// LLaMA-Factory saves a causal LM (`embed_out`, GPT-NeoX's untied LM head, included) and
/// a value head with a bias: it scores as the classifier with that bias added, and the
/// fusion for serving leaves the unread LM head out.
#[test]
fn a_llamafactory_value_head_over_gpt_neox_is_served_without_its_lm_head() {
    let bias = 0.5;
    let (_keep, dir) = common::fixture_variant(
        FIXTURE,
        |config| config["architectures"] = json!(["GPTNeoXForCausalLM"]),
        |name, t| (name.replace("score.", "v_head.summary."), t),
    );
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Stored)> = common::read_safetensors(&path).into_iter().collect();
    let (vocab, hidden) = (560, 32);
    let lm_head = common::Rng(7).vec(vocab * hidden, 0.1);
    tensors.push((
        "embed_out.weight".into(),
        common::float("F32", &[vocab, hidden], &lm_head),
    ));
    tensors.push((
        "v_head.summary.bias".into(),
        common::float("F32", &[1], &[bias]),
    ));
    common::write_safetensors(&path, &tensors);

    let (tensors, _) = warm::fuse::fuse_to_tensors(
        &warm::config::MembersConfig::single(&dir),
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!tensors.contains_key("embed_out.weight"));
    assert!(tensors.contains_key("gpt_neox.embed_in.weight"));
    assert!(tensors.contains_key("v_head.summary.bias"));
    // Two members, fused by `warm fuse` (which keeps every tensor), score alike.
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(&[&dir, &dir], &fused, &[]);
    assert!(common::read_checkpoint(&fused).contains_key("embed_out.weight"));
    for checkpoint in [&dir, &fused] {
        common::cases::assert_scores_shifted(checkpoint, FIXTURE, bias, 1e-4);
    }
}

/// A fused projection of the wrong size is named, with the shape it should have.
#[test]
fn a_fused_projection_of_the_wrong_size_is_named() {
    let (_keep, dir) = common::fixture_variant(
        FIXTURE,
        |_| {},
        |name, t| {
            if name == "gpt_neox.layers.1.attention.query_key_value.weight" {
                let values: Vec<f32> = common::decode(&t.dtype, &t.bytes)[..64 * 32]
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                (name, common::float("F32", &[64, 32], &values))
            } else {
                (name, t)
            }
        },
    );
    let message = load_error(&dir);
    assert!(
        message.contains("query_key_value") && message.contains("96"),
        "{message}"
    );
}

/// OpenAssistant's GPTNeoXRewardModel with `pooling: mean` (an average over every token,
/// which warm does not compute) is refused by name rather than served at the last token.
#[test]
fn an_oasst_reward_model_with_mean_pooling_is_refused() {
    let (_keep, dir) = common::fixture_variant(
        "oasst-pythia-rm",
        |config| config["pooling"] = json!("mean"),
        common::unchanged,
    );
    let message = load_error(&dir);
    assert!(
        message.contains("pooling 'mean'") && message.contains("'last'"),
        "{message}"
    );
}
