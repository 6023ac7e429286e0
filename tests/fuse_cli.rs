//! `warm fuse` and `warm inspect` as a user runs them: the real binary on checkpoint
//! folders, its output read back with an independent safetensors reader.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn run(args: &[&str]) -> Output {
    Command::new(warm_bin())
        .args(args)
        .env_remove("WARM_MODEL")
        .output()
        .expect("run warm")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes `m` fine-tuned members in `dtype` and returns their folders and float values
/// as stored (so the reference sees exactly what the binary reads).
fn members(root: &Path, m: usize, dtype: &str, shards: usize) -> Vec<PathBuf> {
    let init = family_init(1);
    (0..m)
        .map(|i| {
            let dir = root.join(format!("member{i}"));
            let tuned = fine_tuned(&init, 100 + i as u64, 0.02);
            write_checkpoint(
                &dir,
                &config("LlamaForSequenceClassification", 16),
                &stored(&tuned, dtype),
                shards,
            );
            dir
        })
        .collect()
}

fn fuse(dirs: &[PathBuf], out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["fuse"];
    for d in dirs {
        args.extend(["--model", path_str(d)]);
    }
    args.extend(["--output", path_str(out)]);
    args.extend(extra);
    run(&args)
}

/// |got - reference| within one unit in the last place of the output type (plus the f32
/// accumulation bound, which only matters where the terms cancel).
fn assert_close_to_reference(
    dirs: &[PathBuf],
    out: &Path,
    weights: &[f64],
    out_dtype: Option<&str>,
) {
    let inputs: Vec<_> = dirs.iter().map(|d| read_checkpoint(d)).collect();
    let fused = read_checkpoint(out);
    assert_eq!(fused.len(), inputs[0].len());
    let total: f64 = weights.iter().sum();
    for (name, first) in &inputs[0] {
        let got = &fused[name];
        assert_eq!(got.shape, first.shape, "{name}");
        if first.dtype == "I64" {
            assert_eq!(got, first, "{name}: integer tensors are copied");
            continue;
        }
        let dtype = out_dtype.unwrap_or(&first.dtype);
        assert_eq!(got.dtype, dtype, "{name}");
        let values: Vec<Vec<f64>> = inputs
            .iter()
            .map(|c| decode(&c[name].dtype, &c[name].bytes))
            .collect();
        let got = decode(&got.dtype, &got.bytes);
        let (mantissa, min_exp) = match dtype {
            "F32" => (23, -126),
            "F16" => (10, -14),
            _ => (7, -126),
        };
        for (k, g) in got.iter().enumerate() {
            let want: f64 = values
                .iter()
                .zip(weights)
                .map(|(v, w)| v[k] * w / total)
                .sum();
            let magnitude: f64 = values
                .iter()
                .zip(weights)
                .map(|(v, w)| (v[k] * w / total).abs())
                .sum();
            let exp = (want.abs().log2().floor() as i32).max(min_exp);
            let bound = 2f64.powi(exp - mantissa) + 4.0 * f64::from(f32::EPSILON) * magnitude;
            assert!((g - want).abs() <= bound, "{name}[{k}]: {g} vs {want}");
        }
    }
}

#[test]
fn fused_output_reloads_and_matches_the_reference_in_every_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in ["F32", "F16", "BF16"] {
        let dirs = members(&tmp.path().join(dtype), 3, dtype, 1);
        let out = tmp.path().join(format!("{dtype}-uniform"));
        let o = fuse(&dirs, &out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("fused 3 members"));
        assert_close_to_reference(&dirs, &out, &[1.0, 1.0, 1.0], None);

        let out = tmp.path().join(format!("{dtype}-weighted"));
        let o = fuse(&dirs, &out, &["--weights", "0.2,0.3,0.5"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_close_to_reference(&dirs, &out, &[0.2, 0.3, 0.5], None);
    }
}

#[test]
fn dtype_conversion_sharding_and_companion_files() {
    let tmp = tempfile::tempdir().unwrap();
    // Sharded inputs, sharded output.
    let dirs = members(tmp.path(), 2, "F32", 2);
    let out = tmp.path().join("out");
    let o = fuse(&dirs, &out, &["--dtype", "bf16", "--max-shard-size", "2KB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close_to_reference(&dirs, &out, &[1.0, 1.0], Some("BF16"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    for s in &shards {
        assert!(out.join(s).is_file());
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        TOKENIZER_JSON
    );
    assert!(out.join("tokenizer_config.json").is_file());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("warm_fusion.json")).unwrap()).unwrap();
    assert_eq!(record["members"].as_array().unwrap().len(), 2);
    // No temporary files left behind.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.starts_with('.'), "{name}");
    }
    // The fused checkpoint is itself a valid member.
    let o = run(&["inspect", "--model", path_str(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn a_checkpoint_fused_with_itself_is_returned_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in ["F32", "F16", "BF16"] {
        let dir = &members(&tmp.path().join(dtype), 1, dtype, 1)[0];
        for m in [2, 3, 5] {
            let out = tmp.path().join(format!("{dtype}-{m}"));
            let dirs = vec![dir.clone(); m];
            let o = fuse(&dirs, &out, &[]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(read_checkpoint(&out), read_checkpoint(dir), "{dtype} x{m}");
        }
    }
}

#[test]
fn inspect_reports_the_shared_init_check_and_exits_by_fusability() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = members(tmp.path(), 3, "F32", 1);
    let o = run(&[
        "inspect",
        "--model",
        path_str(&dirs[0]),
        "--model",
        path_str(&dirs[1]),
        "--model",
        path_str(&dirs[2]),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}");
    assert!(
        stdout.contains("LlamaForSequenceClassification"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: the members can be fused"), "{stdout}");
    let cosines: Vec<f64> = stdout
        .lines()
        .filter(|l| l.contains("member"))
        .filter_map(|l| l.split_whitespace().nth(6)?.parse().ok())
        .collect();
    assert_eq!(cosines.len(), 3, "{stdout}");
    assert!(cosines.iter().all(|c| *c > 0.99), "{cosines:?}");

    // A model of the same shape but another init.
    let other = tmp.path().join("other");
    write_checkpoint(
        &other,
        &config("LlamaForSequenceClassification", 16),
        &stored(&family_init(999), "F32"),
        1,
    );
    let o = run(&[
        "inspect",
        "--model",
        path_str(&dirs[0]),
        "--model",
        path_str(&dirs[1]),
        "--model",
        path_str(&other),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("member 3 ("), "{stdout}");
    assert!(
        stdout.contains("not fine-tuned from the same init?"),
        "{stdout}"
    );
    let o = run(&[
        "inspect",
        "--allow-unrelated-members",
        "--model",
        path_str(&dirs[0]),
        "--model",
        path_str(&other),
    ]);
    assert!(o.status.success());
}

#[test]
fn refusal_is_one_message_with_every_problem_and_a_failing_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = members(tmp.path(), 2, "F32", 1);
    let mut bad = stored(&fine_tuned(&family_init(1), 7, 0.02), "F32");
    bad.retain(|(n, _)| n != "model.norm.weight");
    bad[0].1 = float("F32", &[50, 8], &[0.0; 400]);
    let bad_dir = tmp.path().join("bad");
    write_checkpoint(
        &bad_dir,
        &config("LlamaForSequenceClassification", 16),
        &bad,
        1,
    );
    let out = tmp.path().join("out");
    let o = fuse(
        &[dirs[0].clone(), dirs[1].clone(), bad_dir.clone()],
        &out,
        &[],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("2 problems found"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "member 3 ({}): tensor 'model.embed_tokens.weight' has shape [50, 8], member 1 ({}) has [50, 16]",
            bad_dir.display(),
            dirs[0].display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("tensor 'model.norm.weight' is missing"),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused fusion left its output folder");
}

#[test]
fn members_and_weights_come_from_the_environment_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = members(tmp.path(), 2, "F16", 1);
    let out = tmp.path().join("out");
    let o = Command::new(warm_bin())
        .args(["fuse", "--output", path_str(&out)])
        .env(
            "WARM_MODEL",
            format!("{},{}", dirs[0].display(), dirs[1].display()),
        )
        .env("WARM_WEIGHTS", "3,1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close_to_reference(&dirs, &out, &[3.0, 1.0], None);
}

#[test]
fn device_choice_runs_on_the_cpu_or_refuses_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = members(tmp.path(), 2, "BF16", 1);
    let out = tmp.path().join("auto");
    let o = fuse(&dirs, &out, &["--device", "auto"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close_to_reference(&dirs, &out, &[1.0, 1.0], None);

    // This test binary has no CUDA (or no GPU): one clear line, exit 1, nothing written.
    let out = tmp.path().join("cuda");
    let o = fuse(&dirs, &out, &["--device", "cuda:1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("--device cuda:1: "), "{stderr}");
    assert!(!out.exists(), "{stderr}");

    let o = fuse(&dirs, &out, &["--device", "gpu"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown device 'gpu'"), "{stderr}");
}

/// Ctrl-C in the middle of a fusion: exit 130 and nothing left in the output folder, the
/// writer's hidden temporary file included. The members are sparse files of zeros (no disk
/// used), large enough that the pass is still running when the signal comes.
#[test]
fn an_interrupted_fusion_leaves_no_partial_files() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let dir = root.path().join(format!("member{i}"));
            sparse_member(&dir, 4);
            dir
        })
        .collect();
    let out = root.path().join("fused");
    let mut child = Command::new(warm_bin())
        .args(["fuse", "--model", path_str(&dirs[0]), "--model"])
        .args([path_str(&dirs[1]), "--output", path_str(&out)])
        .env_remove("WARM_MODEL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listing = || -> Vec<String> {
        std::fs::read_dir(&out).map_or_else(
            |_| Vec::new(),
            |entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            },
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !listing().iter().any(|name| name.ends_with(".partial")) {
        assert!(child.try_wait().unwrap().is_none(), "warm fuse ended early");
        assert!(
            std::time::Instant::now() < deadline,
            "no .partial file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!out.exists(), "left behind: {:?}", listing());
}
