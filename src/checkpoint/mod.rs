//! Finding and validating one Hugging Face checkpoint folder: config.json, safetensors
//! weights (single file or sharded with an index) and tokenizer files.

mod config;
mod error;
mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use config::{ConfigDiff, ModelConfig, STRUCTURAL_KEYS};
pub use error::CheckpointError;
pub use safetensors::{SafetensorsFile, TensorInfo};

use crate::dtype::DType;

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Where LLaMA-Factory saves a reward model's value head, apart from the causal LM's weights.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// Tokenizer files that must be identical across the members of a WARM set.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spm.model",
    "sentencepiece.bpe.model",
];

/// Keys of tokenizer_config.json that record where a tokenizer was loaded from, not what
/// it does.
const TOKENIZER_PROVENANCE_KEYS: &[&str] = &["name_or_path", "tokenizer_file"];

/// Where one tensor lives: which shard and which entry of that shard's header.
#[derive(Debug, Clone, Copy)]
pub struct TensorLocation {
    pub shard: usize,
    pub entry: usize,
}

pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<SafetensorsFile>,
    tensors: BTreeMap<String, TensorLocation>,
    tokenizer_files: BTreeMap<String, Vec<u8>>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        if !dir.is_dir() {
            return Err(CheckpointError::NotADirectory(dir.to_path_buf()));
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(CheckpointError::MissingFile {
                dir: dir.to_path_buf(),
                file: CONFIG_FILE.into(),
            });
        }
        let config = ModelConfig::read(&config_path)?;
        let shard_names = weight_files(dir)?;
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors = BTreeMap::new();
        for (shard, name) in shard_names.iter().enumerate() {
            let file = SafetensorsFile::open(&dir.join(name))?;
            for (entry, info) in file.tensors().iter().enumerate() {
                if tensors
                    .insert(info.name.clone(), TensorLocation { shard, entry })
                    .is_some()
                {
                    return Err(CheckpointError::BadTensor {
                        path: file.path().to_path_buf(),
                        tensor: info.name.clone(),
                        reason: "stored in more than one shard".into(),
                    });
                }
            }
            shards.push(file);
        }
        let checkpoint = Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
            tokenizer_files: read_tokenizer_files(dir)?,
        };
        checkpoint.check_index()?;
        Ok(checkpoint)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    pub fn tensor(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let loc = self.tensors.get(name)?;
        let shard = &self.shards[loc.shard];
        Some((shard, &shard.tensors()[loc.entry]))
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Tensors in storage order (shard by shard, by offset), the order that reads the files
    /// sequentially.
    pub fn tensors_in_file_order(&self) -> impl Iterator<Item = &TensorInfo> {
        self.shards.iter().flat_map(|s| s.tensors().iter())
    }

    /// How many tensors the value head's own file holds (0 without one): the last ones in
    /// file order.
    pub fn value_head_tensors(&self) -> usize {
        self.shards
            .last()
            .filter(|s| s.path().file_name() == Some(VALUE_HEAD_FILE.as_ref()))
            .map_or(0, |s| s.tensors().len())
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors_in_file_order().map(TensorInfo::numel).sum()
    }

    /// The dtype most of the parameters are stored in (models keep a few tensors, such as
    /// norms, in another type at times).
    pub fn main_dtype(&self) -> Option<DType> {
        let mut counts: BTreeMap<&str, (usize, DType)> = BTreeMap::new();
        for t in self.tensors_in_file_order() {
            counts
                .entry(t.dtype.safetensors_name())
                .or_insert((0, t.dtype))
                .0 += t.numel();
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }

    pub fn weight_bytes(&self) -> u64 {
        self.tensors_in_file_order()
            .map(|t| t.range.len() as u64)
            .sum()
    }

    /// Tokenizer files present in the folder, by file name.
    pub fn tokenizer_files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.tokenizer_files
    }

    /// Whether tokenizer file `name` of this checkpoint means the same as `other`'s: JSON
    /// files compare as values (formatting and provenance keys aside), others byte for byte.
    pub fn tokenizer_file_matches(&self, name: &str, other: &Checkpoint) -> bool {
        match (
            self.tokenizer_files.get(name),
            other.tokenizer_files.get(name),
        ) {
            (None, None) => true,
            (Some(a), Some(b)) if name.ends_with(".json") => {
                match (normalized_json(a), normalized_json(b)) {
                    (Some(a), Some(b)) => a == b,
                    _ => a == b,
                }
            }
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// With a sharded checkpoint, every tensor the index names must be in the shard it
    /// names.
    fn check_index(&self) -> Result<(), CheckpointError> {
        let index_path = self.dir.join(INDEX_FILE);
        if !index_path.is_file() {
            return Ok(());
        }
        for (tensor, file) in read_index(&index_path)? {
            let found = self
                .tensor(&tensor)
                .map(|(shard, _)| shard.path().file_name() == Some(file.as_ref()));
            if found != Some(true) {
                return Err(CheckpointError::BadTensor {
                    path: index_path,
                    tensor,
                    reason: format!("listed in shard {file}, which does not contain it"),
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The safetensors files of a checkpoint, in shard order, then the value head's file where
/// there is one.
fn weight_files(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut files = model_weight_files(dir)?;
    if files.iter().any(|f| f == VALUE_HEAD_FILE) {
        // An index that names it has put it among the shards already.
        return Ok(files);
    }
    if dir.join(VALUE_HEAD_FILE).is_file() {
        files.push(VALUE_HEAD_FILE.to_string());
    } else if dir.join("value_head.bin").is_file() {
        return Err(CheckpointError::MissingFile {
            dir: dir.to_path_buf(),
            file: format!(
                "{VALUE_HEAD_FILE} (found value_head.bin, which warm cannot read: convert it to safetensors)"
            ),
        });
    }
    Ok(files)
}

/// The model's own safetensors files (single or sharded), in shard order.
fn model_weight_files(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let mut files: Vec<String> = read_index(&index_path)?.into_values().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !dir.join(f).is_file() {
                return Err(CheckpointError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: format!("{f} (named in {INDEX_FILE})"),
                });
            }
        }
        return Ok(files);
    }
    if dir.join(SINGLE_WEIGHTS_FILE).is_file() {
        return Ok(vec![SINGLE_WEIGHTS_FILE.to_string()]);
    }
    // Older releases (UltraRM-13b among them) ship PyTorch pickles only, often sharded.
    let hint = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
        .iter()
        .find(|name| dir.join(name).is_file())
        .map(|name| format!(" (found {name}: convert it to safetensors first)"))
        .unwrap_or_default();
    Err(CheckpointError::NoWeights {
        dir: dir.to_path_buf(),
        hint,
    })
}

/// The `weight_map` of model.safetensors.index.json: tensor name -> shard file name.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    let index: Index = serde_json::from_slice(&text).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    for file in index.weight_map.values() {
        if file.contains('/') || file.contains("..") {
            return Err(CheckpointError::invalid(
                path,
                format!("shard name '{file}' is not a plain file name"),
            ));
        }
    }
    Ok(index.weight_map)
}

fn read_tokenizer_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, CheckpointError> {
    let mut files = BTreeMap::new();
    for name in TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
            files.insert(name.to_string(), bytes);
        }
    }
    Ok(files)
}

fn normalized_json(bytes: &[u8]) -> Option<serde_json::Value> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(map) = value.as_object_mut() {
        for key in TOKENIZER_PROVENANCE_KEYS {
            map.remove(*key);
        }
    }
    Some(value)
}
