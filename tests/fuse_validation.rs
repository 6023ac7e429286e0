//! Every reason to refuse a set of members, asserted by the message a user sees.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use warm::config::MembersConfig;
use warm::fuse::{self, FuseError};

fn members_config(dirs: &[PathBuf], weights: Option<Vec<f64>>) -> MembersConfig {
    MembersConfig {
        dirs: dirs.to_vec(),
        weights,
        allow_unrelated_members: false,
    }
}

/// The full message of the refusal `inspect` reports (plan and streaming problems alike).
fn refusal(dirs: &[PathBuf], weights: Option<Vec<f64>>) -> String {
    match fuse::inspect(&members_config(dirs, weights)) {
        Ok(report) => {
            assert!(!report.problems.is_empty(), "expected a refusal");
            fuse::describe(&report.problem_list)
        }
        Err(e) => e.to_string(),
    }
}

fn good_member(root: &Path, name: &str, seed: u64) -> PathBuf {
    let dir = root.join(name);
    let tuned = fine_tuned(&family_init(1), seed, 0.02);
    write_checkpoint(
        &dir,
        &config("LlamaForSequenceClassification", 16),
        &stored(&tuned, "F32"),
        1,
    );
    dir
}

fn member_with(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<(String, Stored)>),
) -> PathBuf {
    let dir = root.join(name);
    let mut cfg = config("LlamaForSequenceClassification", 16);
    let mut tensors = stored(&fine_tuned(&family_init(1), 77, 0.02), "F32");
    edit(&mut cfg, &mut tensors);
    write_checkpoint(&dir, &cfg, &tensors, 1);
    dir
}

fn set(tensors: &mut [(String, Stored)], name: &str, value: Stored) {
    tensors.iter_mut().find(|(n, _)| n == name).unwrap().1 = value;
}

#[test]
fn architecture_and_dimension_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = member_with(tmp.path(), "b", |cfg, _| {
        cfg["architectures"] = serde_json::json!(["Qwen2ForSequenceClassification"]);
        cfg["num_hidden_layers"] = 2.into();
        cfg["hidden_dropout_prob"] = 0.3.into();
    });
    let msg = refusal(&[a.clone(), b.clone()], None);
    assert!(msg.contains(&format!(
        "member 2 ({}): config.json 'architectures' is [\"Qwen2ForSequenceClassification\"], member 1 ({}) has [\"LlamaForSequenceClassification\"]",
        b.display(), a.display()
    )), "{msg}");
    assert!(
        msg.contains("config.json 'num_hidden_layers' is 2, member 1"),
        "{msg}"
    );
    assert!(
        !msg.contains("dropout"),
        "dropout may differ between fine-tuning runs: {msg}"
    );
}

#[test]
fn tensor_set_shape_and_dtype_differences_are_all_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = member_with(tmp.path(), "b", |_, t| {
        t.retain(|(n, _)| n != "model.norm.weight");
        t.push(("extra.bias".into(), float("F32", &[2], &[0.5, 0.5])));
        set(t, "score.weight", float("F32", &[2, 16], &[0.1; 32]));
        set(
            t,
            "model.layers.0.input_layernorm.weight",
            float("BF16", &[16], &[1.0; 16]),
        );
    });
    let msg = refusal(&[a, b], None);
    assert!(msg.contains("4 problems found"), "{msg}");
    assert!(
        msg.contains("tensor 'model.norm.weight' is missing"),
        "{msg}"
    );
    assert!(
        msg.contains("tensor 'extra.bias' is not in member 1"),
        "{msg}"
    );
    assert!(
        msg.contains("tensor 'score.weight' has shape [2, 16], member 1"),
        "{msg}"
    );
    assert!(msg.contains("has [1, 16]"), "{msg}");
    assert!(
        msg.contains("tensor 'model.layers.0.input_layernorm.weight' is stored as BF16, member 1"),
        "{msg}"
    );
    assert!(msg.contains("as F32"), "{msg}");
}

#[test]
fn tokenizer_files_must_match_but_formatting_and_provenance_may_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = good_member(tmp.path(), "b", 2);
    // Same JSON value, other formatting and another name_or_path: fine.
    std::fs::write(
        b.join("tokenizer_config.json"),
        "{\n  \"name_or_path\": \"elsewhere\",\n  \"model_max_length\": 512\n}",
    )
    .unwrap();
    assert!(
        fuse::inspect(&members_config(&[a.clone(), b.clone()], None))
            .unwrap()
            .problems
            .is_empty()
    );
    std::fs::write(
        b.join("tokenizer.json"),
        TOKENIZER_JSON.replace("\"a\": 0", "\"b\": 0"),
    )
    .unwrap();
    std::fs::remove_file(b.join("tokenizer_config.json")).unwrap();
    let msg = refusal(&[a, b.clone()], None);
    assert!(
        msg.contains(&format!(
            "member 2 ({}): tokenizer.json differs from member 1",
            b.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("tokenizer_config.json differs"), "{msg}");
}

#[test]
fn bad_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [
        good_member(tmp.path(), "a", 1),
        good_member(tmp.path(), "b", 2),
    ];
    let cases = [
        (vec![1.0], "--weights: 1 weight(s) given for 2 member(s)"),
        (
            vec![1.0, -1.0],
            "--weights: weight 2 is -1: weights must be finite and not negative",
        ),
        (vec![f64::NAN, 1.0], "--weights: weight 1 is NaN"),
        (vec![0.0, 0.0], "--weights: the weights sum to zero"),
    ];
    for (w, want) in cases {
        let msg = refusal(&dirs, Some(w));
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn nan_and_inf_are_named_with_member_tensor_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = member_with(tmp.path(), "b", |_, t| {
        let mut v = vec![0.5f32; 48 * 16];
        v[100] = f32::NAN;
        v[700] = f32::NAN;
        set(
            t,
            "model.layers.0.mlp.up_proj.weight",
            float("F32", &[48, 16], &v),
        );
        let mut s = vec![0.1f32; 16];
        s[3] = f32::INFINITY;
        set(t, "score.weight", float("F32", &[1, 16], &s));
    });
    let msg = refusal(&[a, b.clone()], None);
    assert!(msg.contains(&format!(
        "member 2 ({}): tensor 'model.layers.0.mlp.up_proj.weight' holds 2 non-finite value(s), the first NaN at flat index 100",
        b.display()
    )), "{msg}");
    assert!(
        msg.contains(
            "tensor 'score.weight' holds 1 non-finite value(s), the first inf at flat index 3"
        ),
        "{msg}"
    );
    // And fusing refuses with the same message.
    let err = fuse::fuse_to_tensors(
        &members_config(&[good_member(tmp.path(), "c", 3), b.clone()], None),
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    // Found during the pass, after the writer started: no output folder is left.
    let output = tmp.path().join("fused");
    let err = fuse::fuse_to_directory(&warm::config::FuseConfig {
        members: members_config(&[good_member(tmp.path(), "d", 4), b.clone()], None),
        output: output.clone(),
        dtype: None,
        max_shard_size: u64::MAX,
        device: warm::config::DeviceChoice::Cpu,
    })
    .unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(
        !output.exists(),
        "the refused fusion left {}",
        output.display()
    );
}

#[test]
fn differing_integer_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = member_with(tmp.path(), "b", |_, t| {
        set(
            t,
            "model.position_ids",
            int64(&[1, 8], &[0, 1, 2, 3, 4, 5, 6, 9]),
        )
    });
    let msg = refusal(&[a, b], None);
    assert!(
        msg.contains("integer tensor 'model.position_ids' differs from member 1"),
        "{msg}"
    );
}

fn corrupt(root: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let dir = good_member(root, name, 5);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
    dir
}

#[test]
fn broken_safetensors_files_are_named_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let truncated = corrupt(tmp.path(), "truncated", |b| b.truncate(b.len() - 10));
    let msg = refusal(&[a.clone(), truncated.clone()], None);
    assert!(
        msg.contains(&format!(
            "{}: tensor 'model.position_ids': data_offsets",
            truncated.join("model.safetensors").display()
        )),
        "{msg}"
    );
    assert!(msg.contains("point outside the file"), "{msg}");

    let header = corrupt(tmp.path(), "header", |b| b[8] = b'!');
    let msg = refusal(&[a.clone(), header], None);
    assert!(msg.contains("corrupt safetensors header"), "{msg}");

    let length = corrupt(tmp.path(), "length", |b| {
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let msg = refusal(&[a.clone(), length], None);
    assert!(
        msg.contains("corrupt safetensors header: header length 18446744073709551615"),
        "{msg}"
    );

    let tiny = corrupt(tmp.path(), "tiny", |b| b.truncate(3));
    let msg = refusal(&[a.clone(), tiny], None);
    assert!(msg.contains("truncated safetensors file: 3 bytes"), "{msg}");

    // Every unreadable member is reported, not just the first.
    let msg = refusal(
        &[a, tmp.path().join("truncated"), tmp.path().join("tiny")],
        None,
    );
    assert!(msg.contains("2 problems found"), "{msg}");
}

#[test]
fn missing_files_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let no_config = good_member(tmp.path(), "noconfig", 2);
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    let msg = refusal(&[a.clone(), no_config.clone()], None);
    assert!(
        msg.contains(&format!("{}: config.json not found", no_config.display())),
        "{msg}"
    );

    let bin = good_member(tmp.path(), "bin", 3);
    std::fs::rename(bin.join("model.safetensors"), bin.join("pytorch_model.bin")).unwrap();
    let msg = refusal(&[a.clone(), bin], None);
    assert!(msg.contains("no safetensors weights"), "{msg}");
    assert!(
        msg.contains("found pytorch_model.bin: convert it to safetensors first"),
        "{msg}"
    );

    // Sharded pickles: the index is what is found.
    let bin_sharded = good_member(tmp.path(), "binsharded", 4);
    std::fs::remove_file(bin_sharded.join("model.safetensors")).unwrap();
    std::fs::write(bin_sharded.join("pytorch_model.bin.index.json"), "{}").unwrap();
    let msg = refusal(&[a.clone(), bin_sharded], None);
    assert!(
        msg.contains("found pytorch_model.bin.index.json: convert it to safetensors first"),
        "{msg}"
    );

    let sharded = tmp.path().join("sharded");
    write_checkpoint(
        &sharded,
        &config("LlamaForSequenceClassification", 16),
        &stored(&family_init(1), "F32"),
        2,
    );
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = refusal(&[a, sharded], None);
    assert!(
        msg.contains(
            "model-00002-of-00002.safetensors (named in model.safetensors.index.json) not found"
        ),
        "{msg}"
    );

    assert!(matches!(
        fuse::inspect(&members_config(&[], None)),
        Err(FuseError::NoMembers)
    ));
}

#[test]
fn unrelated_members_are_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = good_member(tmp.path(), "a", 1);
    let b = good_member(tmp.path(), "b", 2);
    let stranger = tmp.path().join("stranger");
    write_checkpoint(
        &stranger,
        &config("LlamaForSequenceClassification", 16),
        &stored(&family_init(4242), "F32"),
        1,
    );
    let msg = refusal(&[a.clone(), b.clone(), stranger.clone()], None);
    assert!(
        msg.contains(&format!(
            "member 3 ({}): cosine similarity to the mean of the other members is",
            stranger.display()
        )),
        "{msg}"
    );
    let mut config = members_config(&[a, b, stranger], None);
    config.allow_unrelated_members = true;
    let report = fuse::inspect(&config).unwrap();
    assert!(report.problems.is_empty());
    let cos: Vec<f64> = report
        .members
        .iter()
        .map(|m| m.cosine_to_rest.unwrap())
        .collect();
    assert!(cos[2].abs() < 0.3, "{cos:?}");
}

#[test]
fn fused_tensors_feed_a_candle_var_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [
        good_member(tmp.path(), "a", 1),
        good_member(tmp.path(), "b", 2),
    ];
    let (tensors, report) = fuse::fuse_to_tensors(
        &members_config(&dirs, None),
        warm::dtype::FloatDType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(report
        .members
        .iter()
        .all(|m| m.cosine_to_rest.unwrap() > 0.99));
    let vb = candle_nn::VarBuilder::from_tensors(
        tensors,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let score = vb.get((1, 16), "score.weight").unwrap();
    let want: Vec<f64> = {
        let a = read_checkpoint(&dirs[0]);
        let b = read_checkpoint(&dirs[1]);
        let (x, y) = (
            decode("F32", &a["score.weight"].bytes),
            decode("F32", &b["score.weight"].bytes),
        );
        x.iter().zip(&y).map(|(p, q)| (p + q) / 2.0).collect()
    };
    let got: Vec<f32> = score.flatten_all().unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() < 1e-6);
    }
    let ids = vb
        .get_with_hints_dtype(
            (1, 8),
            "model.position_ids",
            Default::default(),
            candle_core::DType::I64,
        )
        .unwrap();
    assert_eq!(
        ids.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
        (0..8).collect::<Vec<i64>>()
    );
}
