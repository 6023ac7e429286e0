//! config.json of a Hugging Face checkpoint: the raw map plus what warm needs from it.

use std::path::Path;

use serde_json::{Map, Value};

use super::CheckpointError;

/// Keys whose values define the network's structure: members that differ in any of them
/// cannot be averaged. Other keys (dropout rates, names, versions) may legitimately differ
/// between fine-tuning runs and only produce a warning.
pub const STRUCTURAL_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "hidden_activation",
    "layer_norm_eps",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "position_embedding_type",
    "pad_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "relative_attention",
    "max_relative_positions",
    "position_buckets",
    "pos_att_type",
    "position_biased_input",
    "share_att_key",
    "norm_rel_ebd",
    "pooler_hidden_size",
    "pooler_hidden_act",
    "problem_type",
    "num_objectives",
    "gating_temperature",
    "gating_hidden_dim",
    "gating_n_hidden",
    "bias",
    "reward_token_id",
    crate::model::PROCESS_REWARD_KEY,
];

/// Keys that say nothing about the weights and are not reported when they differ.
const IGNORED_KEYS: &[&str] = &["_name_or_path", "transformers_version", "torch_dtype"];

#[derive(Debug, Clone)]
pub struct ModelConfig {
    raw: Map<String, Value>,
}

impl ModelConfig {
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let text = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
        let value: Value =
            serde_json::from_slice(&text).map_err(|source| CheckpointError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        match value {
            Value::Object(raw) => Ok(Self { raw }),
            _ => Err(CheckpointError::invalid(
                path,
                "config.json is not a JSON object",
            )),
        }
    }

    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// The first entry of `architectures`, e.g. `LlamaForSequenceClassification`.
    pub fn architecture(&self) -> Option<&str> {
        self.raw.get("architectures")?.as_array()?.first()?.as_str()
    }

    /// The number of labels (outputs of the score head) as transformers derives it.
    pub fn num_labels(&self) -> usize {
        if let Some(n) = self.raw.get("num_labels").and_then(Value::as_u64) {
            return n as usize;
        }
        match self.raw.get("id2label").and_then(Value::as_object) {
            Some(map) => map.len(),
            None => 2,
        }
    }

    /// Structural differences (key, this value, other value) that forbid averaging, and
    /// other differing keys that are worth a warning.
    pub fn compare(&self, other: &ModelConfig) -> ConfigDiff {
        let mut diff = ConfigDiff::default();
        let mut keys: Vec<&String> = self.raw.keys().chain(other.raw.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let a = self.raw.get(key.as_str());
            let b = other.raw.get(key.as_str());
            if a == b || IGNORED_KEYS.contains(&key.as_str()) {
                continue;
            }
            let show = |v: Option<&Value>| v.map_or_else(|| "absent".to_string(), Value::to_string);
            let entry = (key.clone(), show(a), show(b));
            if STRUCTURAL_KEYS.contains(&key.as_str()) {
                diff.structural.push(entry);
            } else if key == "id2label" || key == "label2id" || key == "num_labels" {
                if self.num_labels() != other.num_labels() {
                    diff.structural.push(entry);
                }
            } else {
                diff.cosmetic.push(entry);
            }
        }
        diff
    }
}

#[derive(Debug, Default)]
pub struct ConfigDiff {
    pub structural: Vec<(String, String, String)>,
    pub cosmetic: Vec<(String, String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> ModelConfig {
        ModelConfig {
            raw: v.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn dims_are_structural_and_dropout_is_cosmetic() {
        let a = cfg(
            serde_json::json!({"architectures": ["X"], "hidden_size": 8, "hidden_dropout_prob": 0.1, "_name_or_path": "a"}),
        );
        let b = cfg(
            serde_json::json!({"architectures": ["X"], "hidden_size": 16, "hidden_dropout_prob": 0.2, "_name_or_path": "b"}),
        );
        let d = a.compare(&b);
        assert_eq!(
            d.structural,
            vec![("hidden_size".into(), "8".into(), "16".into())]
        );
        assert_eq!(d.cosmetic.len(), 1);
        assert_eq!(d.cosmetic[0].0, "hidden_dropout_prob");
    }

    #[test]
    fn label_maps_matter_only_through_their_count() {
        let a = cfg(serde_json::json!({"id2label": {"0": "LABEL_0"}}));
        let b = cfg(serde_json::json!({"id2label": {"0": "reward"}}));
        let c = cfg(serde_json::json!({"id2label": {"0": "a", "1": "b"}}));
        assert!(a.compare(&b).structural.is_empty());
        assert_eq!(a.compare(&c).structural.len(), 1);
        assert_eq!(a.num_labels(), 1);
    }
}
