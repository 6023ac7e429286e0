//! Reward models as OpenRLHF's `train_rm` saves them: config.json names the class
//! `RewardModel` (`LLMForSequenceRegression` before mid-2024) over a transformers decoder
//! (`model_type`), the backbone's tensors are those of the decoder (`model.*`) and the head
//! is `<value_head_prefix>.weight`, `[1, hidden]` (`score` by default since December 2024,
//! `value_head` before; a bias only in early 2024). The reward is the head's value at the
//! last real token: what transformers' *ForSequenceClassification reads too.

use candle_nn::VarBuilder;

use super::decoder;
use super::score_head::HeadSpec;
use super::{ModelError, RewardModel};

/// config.json `architectures` entries of OpenRLHF reward models.
pub const ARCHITECTURES: &[&str] = &["RewardModel", "LLMForSequenceRegression"];

/// Head names OpenRLHF has used, tried in order when config.json does not say.
const HEAD_NAMES: &[&str] = &["score", "value_head"];

pub fn load(raw: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn RewardModel>, ModelError> {
    let model_type = raw
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| {
            ModelError::Config("an OpenRLHF RewardModel needs 'model_type' (its backbone)".into())
        })?;
    let architecture = decoder::FAMILIES
        .iter()
        .find(|family| family.model_type == model_type)
        .map(|family| family.classification)
        .ok_or_else(|| ModelError::UnsupportedBackbone(model_type.to_string()))?;
    let head = HeadSpec::value(&head_name(raw, &vb)?, &vb);
    decoder::load(architecture, raw, vb, &head)
}

/// `value_head_prefix` from config.json (written since December 2024), else the first
/// of OpenRLHF's names whose weight the checkpoint holds.
fn head_name(raw: &serde_json::Value, vb: &VarBuilder) -> Result<String, ModelError> {
    match raw.get("value_head_prefix") {
        Some(serde_json::Value::String(prefix)) => return Ok(prefix.clone()),
        Some(other) => {
            return Err(ModelError::Config(format!(
                "value_head_prefix must be a string, not {other}"
            )))
        }
        None => {}
    }
    HEAD_NAMES
        .iter()
        .find(|name| vb.contains_tensor(&format!("{name}.weight")))
        .map(|name| name.to_string())
        .ok_or_else(|| {
            ModelError::Load(format!(
                "no value head: config.json has no value_head_prefix and the checkpoint holds none of {}",
                HEAD_NAMES
                    .iter()
                    .map(|name| format!("{name}.weight"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}
