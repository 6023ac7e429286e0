//! Reward models as LLaMA-Factory saves them (`stage: rm`): the causal LM's checkpoint
//! plus value_head.safetensors. The fixture tests/fixtures/models/llamafactory-qwen2 is
//! checked for parity in tests/parity.rs; these tests cover fusing such members and the
//! errors.

mod common;

use common::cases::{assert_scores, load_error};
use common::server::fixture;

const FIXTURE: &str = "llamafactory-qwen2";
const VALUE_HEAD: &str = "value_head.safetensors";

/// WARM over two members whose value heads differ (the second's weight and bias tripled,
/// same backbone): the fused head is twice the first's, so every reward doubles. The
/// output is still LLaMA-Factory's layout, sharded here: the head alone in
/// value_head.safetensors (where LLaMA-Factory's loader looks), every other tensor in the
/// model's shards and index.
#[test]
fn warm_fuse_writes_the_value_head_apart_and_averages_it() {
    let (_keep, tripled) = common::fixture_copy(FIXTURE);
    common::map_safetensors(&tripled.join(VALUE_HEAD), |name, t| {
        (name, common::scaled(t, 3.0))
    });
    let out = tempfile::tempdir().unwrap();
    let fused = out.path().join("fused");
    common::warm_fuse(
        &[&fixture(FIXTURE), &tripled],
        &fused,
        &["--max-shard-size", "100KB"],
    );

    let head = common::read_safetensors(&fused.join(VALUE_HEAD));
    let names: Vec<&str> = head.keys().map(String::as_str).collect();
    assert_eq!(names, ["v_head.summary.bias", "v_head.summary.weight"]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fused.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let model = common::read_checkpoint(&fused);
    let inputs = common::read_checkpoint(&fixture(FIXTURE));
    assert!(weight_map.len() > 1 && weight_map.keys().all(|k| !k.starts_with("v_head.")));
    assert_eq!(
        weight_map.len(),
        inputs.len(),
        "every model tensor is in the index"
    );
    assert!(model.keys().all(|k| !k.starts_with("v_head.")));
    let config = common::read_config(&fused);
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Qwen2ForCausalLM"])
    );

    assert_scores(&fused, FIXTURE, 2.0, 1e-4);
}

#[test]
fn a_causal_lm_without_a_value_head_is_refused_by_name() {
    let (_keep, dir) = common::fixture_copy(FIXTURE);
    std::fs::remove_file(dir.join(VALUE_HEAD)).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("Qwen2ForCausalLM is a language model")
            && message.contains("v_head.summary.weight")
            && message.contains(VALUE_HEAD),
        "{message}"
    );

    // LLaMA-Factory writes value_head.bin with save_safetensors: false.
    std::fs::write(dir.join("value_head.bin"), b"a torch pickle").unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("value_head.bin") && message.contains("convert it to safetensors"),
        "{message}"
    );
}

/// Serving fuses what the model reads: the causal LM's lm_head is left out (the fixture's
/// embedding table is stored apart), everything else is there.
#[test]
fn serving_leaves_the_unread_lm_head_out_of_the_fusion() {
    let stored = common::read_checkpoint(&fixture(FIXTURE));
    assert!(stored.contains_key("lm_head.weight"));
    let (tensors, report) = warm::fuse::fuse_to_tensors(
        &warm::config::MembersConfig::single(&fixture(FIXTURE)),
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    assert!(tensors.contains_key("model.embed_tokens.weight"));
    assert!(tensors.contains_key("v_head.summary.weight"));
    // Every stored tensor but lm_head, plus the value head's two.
    assert_eq!(tensors.len(), stored.len() - 1 + 2);
    assert_eq!(report.tensors, tensors.len());
}

/// An index that lists value_head.safetensors among the shards (written by hand or by
/// another tool) loads the same: the file is read once.
#[test]
fn an_index_naming_the_value_head_file_loads_alike() {
    let (_keep, dir) = common::fixture_copy(FIXTURE);
    let mut weight_map = serde_json::Map::new();
    for file in ["model.safetensors", VALUE_HEAD] {
        for name in common::read_safetensors(&dir.join(file)).into_keys() {
            weight_map.insert(name, file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    assert_scores(&dir, FIXTURE, 1.0, 1e-4);
}

/// TRL's own save_pretrained of AutoModelForCausalLMWithValueHead keeps `v_head.*` inside
/// model.safetensors: that loads alike too.
#[test]
fn a_value_head_inside_the_model_file_loads_alike() {
    let (_keep, dir) = common::fixture_copy(FIXTURE);
    let mut tensors: Vec<_> = common::read_safetensors(&dir.join("model.safetensors"))
        .into_iter()
        .collect();
    tensors.extend(common::read_safetensors(&dir.join(VALUE_HEAD)));
    common::write_safetensors(&dir.join("model.safetensors"), &tensors);
    std::fs::remove_file(dir.join(VALUE_HEAD)).unwrap();
    assert_scores(&dir, FIXTURE, 1.0, 1e-4);
}

/// LLaMA-Factory creates the value head in float32 and never casts it, while the model is
/// exported in bf16: such a member loads, and scores as transformers' f32 did within what
/// bf16 weights allow.
#[test]
fn a_bf16_model_with_an_f32_value_head_loads() {
    let (_keep, dir) = common::fixture_copy(FIXTURE);
    common::map_safetensors(&dir.join("model.safetensors"), |name, t| {
        let values: Vec<f32> = common::decode(&t.dtype, &t.bytes)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let bytes = common::encode("BF16", &values);
        let t = common::Stored {
            dtype: "BF16".into(),
            bytes,
            ..t
        };
        (name, t)
    });
    assert_scores(&dir, FIXTURE, 1.0, 0.05);
}
