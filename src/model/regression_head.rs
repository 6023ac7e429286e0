//! OpenBMB's reward models: UltraRM (`LlamaRewardModel`, defined in its model card) and
//! Eurus-RM (`EurusRewardModel`, its remote code). Each is transformers' backbone under
//! `model` and `regression_head = Linear(hidden, 1, bias=False)`, read at the last real
//! token (`attention_mask.cumsum(1).argmax(1)`): what the decoders here compute under
//! another head's name. The class fixes the backbone, whatever config.json's model_type.

use candle_nn::VarBuilder;

use super::decoder;
use super::score_head::HeadSpec;
use super::{ModelError, RewardModel};

const HEAD: &str = "regression_head";

/// config.json `architectures` entry -> the decoder class whose backbone it holds.
pub const ARCHITECTURES: &[(&str, &str)] = &[
    ("LlamaRewardModel", "LlamaForSequenceClassification"),
    ("EurusRewardModel", "MistralForSequenceClassification"),
];

/// The decoder class under `architecture`, when it is one of OpenBMB's.
pub fn backbone(architecture: &str) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == architecture)
        .map(|(_, backbone)| *backbone)
}

pub fn load(
    architecture: &str,
    backbone: &str,
    raw: &serde_json::Value,
    vb: VarBuilder,
) -> Result<Box<dyn RewardModel>, ModelError> {
    if !vb.contains_tensor(&format!("{HEAD}.weight")) {
        return Err(ModelError::Load(format!(
            "{architecture} reads its reward from {HEAD}.weight, which the checkpoint does not hold"
        )));
    }
    // The classes have no bias; one saved by a variant is read, not dropped.
    let head = HeadSpec::value(HEAD, &vb);
    decoder::load(backbone, raw, vb, &head)
}
