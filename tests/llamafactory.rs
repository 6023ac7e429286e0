//! Reward models as LLaMA-Factory saves them (`stage: rm`): the causal LM's checkpoint
//! plus value_head.safetensors. The fixture tests/fixtures/models/llamafactory-qwen2 is
//! checked for parity in tests/parity.rs; these tests cover fusing such members and the
//! errors.

mod common;

use common::cases::{expected, load_error, scored_cases};
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
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fused.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Qwen2ForCausalLM"])
    );

    for (i, (got, want)) in scored_cases(&fused, &expected(FIXTURE))
        .into_iter()
        .enumerate()
    {
        assert!(
            (got - 2.0 * want).abs() < 2e-4,
            "case {i}: {got} vs {}",
            2.0 * want
        );
    }
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
