//! Test helpers: a tiny safetensors writer and reader written independently of the crate's
//! own, and builders for small Hugging Face checkpoint folders.
#![allow(dead_code)]

pub mod cases;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// A tensor as stored: dtype name, shape, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn encode(dtype: &str, values: &[f32]) -> Vec<u8> {
    match dtype {
        "F32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "F16" => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        "BF16" => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        other => panic!("encode: {other}"),
    }
}

pub fn decode(dtype: &str, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
        other => panic!("decode: {other}"),
    }
}

pub fn float(dtype: &str, shape: &[usize], values: &[f32]) -> Stored {
    assert_eq!(shape.iter().product::<usize>(), values.len());
    Stored {
        dtype: dtype.into(),
        shape: shape.to_vec(),
        bytes: encode(dtype, values),
    }
}

pub fn int64(shape: &[usize], values: &[i64]) -> Stored {
    Stored {
        dtype: "I64".into(),
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub fn write_safetensors(path: &Path, tensors: &[(String, Stored)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (_, t) in tensors {
        out.extend_from_slice(&t.bytes);
    }
    std::fs::write(path, out).unwrap();
}

pub fn read_safetensors(path: &Path) -> BTreeMap<String, Stored> {
    let data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&data[8..8 + n]).unwrap();
    let mut out = BTreeMap::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let [b, e] = [0, 1].map(|k| v["data_offsets"][k].as_u64().unwrap() as usize);
        out.insert(
            name,
            Stored {
                dtype: v["dtype"].as_str().unwrap().into(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                bytes: data[8 + n + b..8 + n + e].to_vec(),
            },
        );
    }
    out
}

/// All tensors of a checkpoint folder, single-file or sharded.
pub fn read_checkpoint(dir: &Path) -> BTreeMap<String, Stored> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return read_safetensors(&dir.join("model.safetensors"));
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
    let mut files: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    files.sort();
    files.dedup();
    let mut out = BTreeMap::new();
    for f in files {
        out.extend(read_safetensors(&dir.join(f)));
    }
    out
}

/// A copy of the fixture `name` (tests/fixtures/models) in a temporary folder: the folder
/// guard and the copy's path.
pub fn fixture_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(server::fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

/// A copy of the fixture `name` with config.json edited by `edit` and each tensor of
/// model.safetensors passed through `tensor` (see [`unchanged`]).
pub fn fixture_variant(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    tensor: impl Fn(String, Stored) -> (String, Stored),
) -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = fixture_copy(name);
    let mut config = read_config(&dir);
    edit(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    map_safetensors(&dir.join("model.safetensors"), tensor);
    (tmp, dir)
}

/// `dir`/config.json.
pub fn read_config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Every tensor as it was, for [`fixture_variant`].
pub fn unchanged(name: String, t: Stored) -> (String, Stored) {
    (name, t)
}

/// Rewrites the safetensors file `path` with each tensor passed through `tensor`.
pub fn map_safetensors(path: &Path, tensor: impl Fn(String, Stored) -> (String, Stored)) {
    let tensors: Vec<_> = read_safetensors(path)
        .into_iter()
        .map(|(name, t)| tensor(name, t))
        .collect();
    write_safetensors(path, &tensors);
}

/// A float tensor with every value multiplied by `factor`.
pub fn scaled(t: Stored, factor: f32) -> Stored {
    let values: Vec<f32> = decode(&t.dtype, &t.bytes)
        .into_iter()
        .map(|v| factor * v as f32)
        .collect();
    Stored {
        bytes: encode(&t.dtype, &values),
        ..t
    }
}

pub fn config(architecture: &str, hidden: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": [architecture],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "vocab_size": 50,
        "num_labels": 1,
        "torch_dtype": "float32",
        "hidden_dropout_prob": 0.1,
    })
}

pub const TOKENIZER_JSON: &str =
    r#"{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#;

/// Writes a checkpoint folder: config.json, tokenizer files, and the tensors in one file
/// or in `shards` shards with an index.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Stored)],
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 512, "name_or_path": "somewhere"}"#,
    )
    .unwrap();
    if shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), tensors);
        return;
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        for (t, _) in chunk {
            weight_map.insert(t.clone(), name.clone().into());
        }
        write_safetensors(&dir.join(&name), chunk);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// The tensors of a small reward model: fine-tuned members are `init` plus a small
/// member-specific perturbation.
pub fn family_init(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(seed);
    let specs: [(&str, Vec<usize>); 5] = [
        ("model.embed_tokens.weight", vec![50, 16]),
        ("model.layers.0.mlp.up_proj.weight", vec![48, 16]),
        ("model.layers.0.input_layernorm.weight", vec![16]),
        ("model.norm.weight", vec![16]),
        ("score.weight", vec![1, 16]),
    ];
    specs
        .into_iter()
        .map(|(n, s)| {
            let numel = s.iter().product();
            (n.to_string(), s, rng.vec(numel, 0.5))
        })
        .collect()
}

pub fn fine_tuned(
    init: &[(String, Vec<usize>, Vec<f32>)],
    seed: u64,
    scale: f32,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(seed);
    init.iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().map(|x| x + scale * rng.uniform()).collect(),
            )
        })
        .collect()
}

/// Stores float tensors in `dtype`, plus an integer buffer that must be copied.
pub fn stored(tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: &str) -> Vec<(String, Stored)> {
    let mut out: Vec<(String, Stored)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), float(dtype, s, v)))
        .collect();
    out.push((
        "model.position_ids".into(),
        int64(&[1, 8], &[0, 1, 2, 3, 4, 5, 6, 7]),
    ));
    out
}

pub fn warm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_warm"))
}

/// Runs `warm fuse` of `members` into `output` with `extra` flags; panics with its stderr
/// if it fails.
pub fn warm_fuse(members: &[&Path], output: &Path, extra: &[&str]) {
    let mut command = std::process::Command::new(warm_bin());
    command.arg("fuse").args(extra);
    for member in members {
        command.arg("--model").arg(member);
    }
    let run = command
        .arg("--output")
        .arg(output)
        .env_remove("WARM_MODEL")
        .output()
        .expect("run warm fuse");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// A member whose weights are one sparse file: `gib` GiB of zeros that cost no disk but
/// take seconds to read and average, with the llama fixture's config and tokenizer.
pub fn sparse_member(dir: &Path, gib: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(server::fixture("llama")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let bytes = gib << 30;
    let rows = bytes / (64 * 4);
    let mut header = serde_json::json!({
        "model.embed_tokens.weight":
            {"dtype": "F32", "shape": [rows, 64], "data_offsets": [0, bytes]}
    })
    .to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut file = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    use std::io::Write;
    file.write_all(&(header.len() as u64).to_le_bytes())
        .unwrap();
    file.write_all(header.as_bytes()).unwrap();
    file.set_len(8 + header.len() as u64 + bytes).unwrap();
}
