//! Reward models as LLaMA-Factory trains them (`stage: rm`, TRL's
//! AutoModelForCausalLMWithValueHead): config.json is the causal LM's (`LlamaForCausalLM`,
//! ...), its weights include an `lm_head` that scoring does not use, and the reward head
//! `v_head.summary` (`Linear(hidden, 1)` with a bias) comes from value_head.safetensors.
//! TRL applies it to the last layer's normed hidden states; LLaMA-Factory reads the value
//! at the last real token: what the decoders here compute under another head.

use candle_nn::VarBuilder;

use super::decoder;
use super::score_head::HeadSpec;
use super::{ModelError, RewardModel};

const HEAD: &str = "v_head.summary";

/// The sequence-classification class of `causal`'s family, when warm serves it.
pub fn family(causal: &str) -> Option<&'static str> {
    decoder::FAMILIES
        .iter()
        .find(|family| family.causal_lm == causal)
        .map(|family| family.classification)
}

/// `causal` (config.json's architecture) under its value head, as `family` computes.
pub fn load(
    causal: &str,
    family: &str,
    raw: &serde_json::Value,
    vb: VarBuilder,
) -> Result<Box<dyn RewardModel>, ModelError> {
    if !vb.contains_tensor(&format!("{HEAD}.weight")) {
        return Err(ModelError::NoRewardHead(causal.to_string()));
    }
    let head = HeadSpec::value(HEAD, &vb);
    decoder::load(family, raw, vb, &head)
}
