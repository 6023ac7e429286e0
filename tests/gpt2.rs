//! GPT-2 reward models (`GPT2ForSequenceClassification`, as the gpt2-large helpful and
//! harmless reward models of the multi-objective RLHF papers are). The fixture is checked
//! for parity in tests/parity.rs; these tests load checkpoints as GPT-2's are saved,
//! average members, and serve TRL's value-head layout over `GPT2LMHeadModel`.

mod common;

use common::cases::assert_scores;
use common::Stored;
use serde_json::json;

const FIXTURE: &str = "gpt2";

/// GPT-2 checkpoints converted from the original carry each layer's causal mask
/// (`attn.bias`, `[1, 1, n_positions, n_positions]`) and `attn.masked_bias`, which
/// transformers ignores. Two such members whose score heads differ (the second's
/// tripled) fuse, and every reward doubles.
#[test]
fn gpt2_checkpoints_with_their_mask_buffers_fuse_and_score() {
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
        let tril: Vec<f32> = (0..positions * positions)
            .map(|i| f32::from(u8::from(i % positions <= i / positions)))
            .collect();
        for layer in 0..2 {
            let prefix = format!("transformer.h.{layer}.attn");
            tensors.push((
                format!("{prefix}.bias"),
                common::float("F32", &[1, 1, positions, positions], &tril),
            ));
            tensors.push((
                format!("{prefix}.masked_bias"),
                common::float("F32", &[], &[-1e4]),
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
    assert_scores(&fused, FIXTURE, 2.0, 1e-4);
}

/// TRL's AutoModelForCausalLMWithValueHead over `GPT2LMHeadModel` (PPO's classic value
/// model, as LLaMA-Factory saves it too): `v_head.summary` with a bias after the final
/// norm. It scores as the classifier plus that bias, and the fusion for serving leaves a
/// stored `lm_head.weight` (GPT-2 ties it to `wte`) out.
#[test]
fn a_value_head_over_gpt2_scores_as_the_classifier_plus_its_bias() {
    let bias = -0.75;
    let (_keep, dir) = common::fixture_variant(
        FIXTURE,
        |config| config["architectures"] = json!(["GPT2LMHeadModel"]),
        |name, t| (name.replace("score.", "v_head.summary."), t),
    );
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Stored)> = common::read_safetensors(&path).into_iter().collect();
    let wte = tensors
        .iter()
        .find(|(name, _)| name == "transformer.wte.weight")
        .map(|(_, t)| t.clone())
        .unwrap();
    tensors.push(("lm_head.weight".into(), wte));
    tensors.push((
        "v_head.summary.bias".into(),
        common::float("F32", &[1], &[bias]),
    ));
    common::write_safetensors(&path, &tensors);

    let (fused, _) = warm::fuse::fuse_to_tensors(
        &warm::config::MembersConfig::single(&dir),
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!fused.contains_key("lm_head.weight"));
    assert!(fused.contains_key("transformer.wte.weight"));

    common::cases::assert_scores_shifted(&dir, FIXTURE, bias, 1e-4);
}

/// GPT-2's per-layer score scaling is refused by name rather than served wrong.
#[test]
fn scale_attn_by_inverse_layer_idx_is_refused_by_name() {
    let (_keep, dir) = common::fixture_variant(
        FIXTURE,
        |config| config["scale_attn_by_inverse_layer_idx"] = json!(true),
        common::unchanged,
    );
    let message = common::cases::load_error(&dir);
    assert!(
        message.contains("scale_attn_by_inverse_layer_idx"),
        "{message}"
    );
}
