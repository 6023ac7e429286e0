//! InternLM2's reward models (`InternLM2ForRewardModel`, the remote code of
//! internlm2-{1_8b,7b,20b}-reward): a Llama-shaped decoder under names of its own, with the
//! query, key and value projections packed into one `wqkv` per layer, and a bias-free
//! `v_head` read at the last token, which is always the reward token the model's
//! `get_score` appends (config.json's `reward_token_id`; the text encoder appends it here).
//!
//! Loading renames the tensors to the Llama names and cuts each `wqkv` in three, so that
//! the decoder computes it as it computes a Llama. Fusion averages the checkpoint's own
//! tensors first: averaging commutes with the cut.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::decoder;
use super::score_head::{HeadShape, HeadSpec};
use super::{load_err, parse_config, ModelError, RewardModel};
use crate::checkpoint::ModelConfig;

pub const ARCHITECTURE: &str = "InternLM2ForRewardModel";

/// The keys that say how the tensors are laid out.
#[derive(serde::Deserialize)]
struct Shape {
    hidden_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    /// Biases of `wqkv` and `wo` (InternLM2Config's default is true).
    #[serde(default = "default_bias")]
    bias: bool,
}

fn default_bias() -> bool {
    true
}

/// The reward model under the Llama decoder.
pub fn load(
    raw: &serde_json::Value,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn RewardModel>, ModelError> {
    let shape: Shape = parse_config(raw)?;
    if let Some(name) = expected_names(&shape).find(|name| !tensors.contains_key(name)) {
        return Err(ModelError::Load(format!(
            "{ARCHITECTURE}: tensor {name} not found"
        )));
    }
    let tensors = to_llama_names(tensors, &shape)?;
    let mut llama = raw.clone();
    if let Some(map) = llama.as_object_mut() {
        map.insert("attention_bias".into(), shape.bias.into());
    }
    let head = HeadSpec {
        name: "v_head".into(),
        labels: 1,
        shape: HeadShape::Linear { bias: false },
    };
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    decoder::load("LlamaForSequenceClassification", &llama, vb, &head)
}

/// The token appended to every input (the score is read there), for an InternLM2 reward
/// model; None for every other architecture.
pub fn reward_token(config: &ModelConfig) -> Result<Option<u32>, ModelError> {
    reward_token_of(config.architecture(), config.raw())
}

fn reward_token_of(
    architecture: Option<&str>,
    raw: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<u32>, ModelError> {
    if architecture != Some(ARCHITECTURE) {
        return Ok(None);
    }
    let id = raw
        .get("reward_token_id")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            ModelError::Config(format!(
                "{ARCHITECTURE} reads its score at the reward token it appends to every \
                 input, and 'reward_token_id' names none"
            ))
        })?;
    let rows = raw.get("vocab_size").and_then(serde_json::Value::as_u64);
    match (u32::try_from(id), rows) {
        (Ok(id), Some(rows)) if u64::from(id) < rows => Ok(Some(id)),
        _ => Err(ModelError::Config(format!(
            "reward_token_id {id} is not a token of the model's vocabulary (vocab_size {})",
            rows.map_or_else(|| "absent".to_string(), |r| r.to_string())
        ))),
    }
}

/// The tensors an InternLM2 reward model of `shape` has, under its own names (checked
/// before renaming, so that a missing one is named as the checkpoint would name it).
fn expected_names(shape: &Shape) -> impl Iterator<Item = String> + '_ {
    let fixed = [
        "model.tok_embeddings.weight",
        "model.norm.weight",
        "v_head.weight",
    ];
    let mut per_layer = vec![
        "attention.wqkv.weight",
        "attention.wo.weight",
        "attention_norm.weight",
        "ffn_norm.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
    ];
    if shape.bias {
        per_layer.extend(["attention.wqkv.bias", "attention.wo.bias"]);
    }
    fixed
        .into_iter()
        .map(str::to_string)
        .chain((0..shape.num_hidden_layers).flat_map(move |i| {
            per_layer
                .clone()
                .into_iter()
                .map(move |rest| format!("model.layers.{i}.{rest}"))
        }))
}

/// `tensors` under the Llama names `decoder` loads, each `wqkv` cut into q, k and v.
fn to_llama_names(
    tensors: HashMap<String, Tensor>,
    shape: &Shape,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut renamed = HashMap::with_capacity(tensors.len() + tensors.len() / 2);
    for (name, tensor) in tensors {
        let Some((prefix, rest)) = split_layer(&name) else {
            let name = match name.as_str() {
                "model.tok_embeddings.weight" => "model.embed_tokens.weight".to_string(),
                _ => name,
            };
            renamed.insert(name, tensor);
            continue;
        };
        let llama = match rest {
            "attention_norm.weight" => "input_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "attention.wo.weight" => "self_attn.o_proj.weight",
            "attention.wo.bias" => "self_attn.o_proj.bias",
            "feed_forward.w1.weight" => "mlp.gate_proj.weight",
            "feed_forward.w3.weight" => "mlp.up_proj.weight",
            "feed_forward.w2.weight" => "mlp.down_proj.weight",
            "attention.wqkv.weight" | "attention.wqkv.bias" => {
                let kind = if rest.ends_with("weight") {
                    "weight"
                } else {
                    "bias"
                };
                let [q, k, v] = unpack_qkv(&name, &tensor, shape)?;
                for (proj, part) in [("q_proj", q), ("k_proj", k), ("v_proj", v)] {
                    renamed.insert(format!("{prefix}self_attn.{proj}.{kind}"), part);
                }
                continue;
            }
            _ => {
                renamed.insert(name, tensor);
                continue;
            }
        };
        renamed.insert(format!("{prefix}{llama}"), tensor);
    }
    Ok(renamed)
}

/// `model.layers.N.rest` as (`model.layers.N.`, `rest`).
fn split_layer(name: &str) -> Option<(&str, &str)> {
    let after = name.strip_prefix("model.layers.")?;
    let dot = after.find('.')?;
    after[..dot].parse::<usize>().ok()?;
    let cut = "model.layers.".len() + dot + 1;
    Some((&name[..cut], &name[cut..]))
}

/// A packed `wqkv` weight `[(kv * (g + 2)) * d, h]` (or bias) as q `[kv * g * d, ..]`,
/// k and v `[kv * d, ..]`. The remote code views its output as `(kv, g + 2, d)`: per key/
/// value head, its g query heads, then its key, then its value, so query head `i` belongs
/// to key/value head `i / g`, the grouping the decoder's attention uses.
fn unpack_qkv(name: &str, packed: &Tensor, shape: &Shape) -> Result<[Tensor; 3], ModelError> {
    let heads = shape.num_attention_heads;
    let kv = shape.num_key_value_heads.unwrap_or(heads);
    if heads == 0
        || kv == 0
        || !heads.is_multiple_of(kv)
        || !shape.hidden_size.is_multiple_of(heads)
    {
        return Err(ModelError::Config(format!(
            "num_attention_heads {heads} must be a multiple of num_key_value_heads {kv} \
             and divide hidden_size {}",
            shape.hidden_size
        )));
    }
    let groups = heads / kv;
    let head_dim = shape.hidden_size / heads;
    let rows = kv * (groups + 2) * head_dim;
    let dims = packed.dims().to_vec();
    let trailing: Vec<usize> = match dims.as_slice() {
        [r, h] if *r == rows && *h == shape.hidden_size => vec![*h],
        [r] if *r == rows => vec![],
        _ => {
            return Err(ModelError::Load(format!(
                "tensor {name} has shape {dims:?}; config.json's {heads} query and {kv} \
                 key/value heads of {head_dim} make [{rows}, {}] ([{rows}] for the bias)",
                shape.hidden_size
            )))
        }
    };
    let mut grouped = vec![kv, groups + 2, head_dim];
    grouped.extend(&trailing);
    let grouped = packed.reshape(grouped).map_err(load_err)?;
    let part = |start: usize, len: usize| -> Result<Tensor, ModelError> {
        let mut flat = vec![kv * len * head_dim];
        flat.extend(&trailing);
        grouped
            .narrow(1, start, len)
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape(flat))
            .map_err(load_err)
    };
    Ok([part(0, groups)?, part(groups, 1)?, part(groups + 1, 1)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: usize, kv: usize, hidden: usize) -> Shape {
        Shape {
            hidden_size: hidden,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            num_hidden_layers: 1,
            bias: false,
        }
    }

    #[test]
    fn wqkv_is_cut_per_key_value_group() {
        // 4 query heads over 2 key/value heads of 2: per group q q k v, 2 rows each.
        let (heads, kv, head_dim, hidden) = (4, 2, 2, 8);
        let rows = kv * (heads / kv + 2) * head_dim;
        let values: Vec<f32> = (0..rows * hidden).map(|i| i as f32).collect();
        let packed = Tensor::from_vec(values, (rows, hidden), &Device::Cpu).unwrap();
        let [q, k, v] = unpack_qkv("w", &packed, &shape(heads, kv, hidden)).unwrap();
        let first_col = |t: &Tensor| -> Vec<f32> {
            t.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // Packed row r starts at r * hidden; group 0 is rows 0..8, group 1 rows 8..16.
        let starts =
            |rows: &[usize]| -> Vec<f32> { rows.iter().map(|r| (r * hidden) as f32).collect() };
        assert_eq!(first_col(&q), starts(&[0, 1, 2, 3, 8, 9, 10, 11]));
        assert_eq!(first_col(&k), starts(&[4, 5, 12, 13]));
        assert_eq!(first_col(&v), starts(&[6, 7, 14, 15]));
        let bias = Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap();
        let [qb, kb, vb] = unpack_qkv("b", &bias, &shape(heads, kv, hidden)).unwrap();
        assert_eq!(
            qb.to_vec1::<f32>().unwrap(),
            [0., 1., 2., 3., 8., 9., 10., 11.]
        );
        assert_eq!(kb.to_vec1::<f32>().unwrap(), [4., 5., 12., 13.]);
        assert_eq!(vb.to_vec1::<f32>().unwrap(), [6., 7., 14., 15.]);
    }

    #[test]
    fn a_wqkv_of_another_shape_is_named() {
        let packed = Tensor::zeros((10, 8), DType::F32, &Device::Cpu).unwrap();
        let err = unpack_qkv(
            "model.layers.3.attention.wqkv.weight",
            &packed,
            &shape(4, 2, 8),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("model.layers.3.attention.wqkv.weight"),
            "{err}"
        );
        assert!(err.contains("[16, 8]"), "{err}");
    }

    #[test]
    fn layer_names_are_split_after_the_index() {
        assert_eq!(
            split_layer("model.layers.12.attention.wo.weight"),
            Some(("model.layers.12.", "attention.wo.weight"))
        );
        assert_eq!(split_layer("model.norm.weight"), None);
        assert_eq!(split_layer("model.layers.x.y"), None);
    }

    #[test]
    fn the_reward_token_is_required_and_in_the_vocabulary() {
        let of = |architecture: &str, extra: serde_json::Value| {
            let mut raw = serde_json::json!({"vocab_size": 10});
            raw.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            reward_token_of(Some(architecture), raw.as_object().unwrap())
        };
        let id = |n: u64| serde_json::json!({ "reward_token_id": n });
        assert_eq!(of(ARCHITECTURE, id(9)).unwrap(), Some(9));
        let beyond = of(ARCHITECTURE, id(10)).unwrap_err().to_string();
        assert!(beyond.contains("vocab_size 10"), "{beyond}");
        let none = of(ARCHITECTURE, serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(none.contains("reward_token_id"), "{none}");
        assert_eq!(of("LlamaForSequenceClassification", id(9)).unwrap(), None);
    }
}
