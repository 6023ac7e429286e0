//! ArmoRM's head (RLHFlow's `LlamaForRewardModelWithGating`, remote code). A bias-free
//! regression layer maps the last token's hidden state to `num_objectives` rewards; a
//! gating MLP reads the hidden state where the prompt ends and weighs them:
//!
//! score = sum_k logit_scale * softmax(gate(prompt) / temperature)_k * (rewards @ R)_k
//!
//! with R the checkpoint's `reward_transform_matrix`. The prompt ends at the first token
//! of the last occurrence of the ids of [`PROMPT_END`], which the remote code hard-codes
//! for the Llama 3 tokenizer (`[128009, 128006, 78191, 128007, 271]`); warm tokenizes the
//! text with the model's own tokenizer, which gives those ids there.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::layers::linear;
use super::{parse_config, plain_ids, ModelError};

/// The text whose tokens mark the end of the prompt: the user turn's end and the
/// assistant's header.
pub const PROMPT_END: &str = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
/// The special tokens of [`PROMPT_END`], which the tokenizer must know as single tokens.
const PROMPT_END_SPECIALS: [&str; 3] = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"];

/// config.json's keys for the head, with the remote code's defaults.
#[derive(serde::Deserialize)]
struct GatingConfig {
    #[serde(default = "default_objectives")]
    num_objectives: usize,
    #[serde(default = "default_temperature")]
    gating_temperature: f64,
    #[serde(default = "default_hidden_dim")]
    gating_hidden_dim: usize,
    #[serde(default = "default_hidden_layers")]
    gating_n_hidden: usize,
}

fn default_objectives() -> usize {
    19
}

fn default_temperature() -> f64 {
    10.0
}

fn default_hidden_dim() -> usize {
    1024
}

fn default_hidden_layers() -> usize {
    3
}

/// The head's dimensions and the ids that mark the prompt's end.
#[derive(Debug, Clone, PartialEq)]
pub struct GatingSpec {
    pub objectives: usize,
    pub temperature: f64,
    pub hidden_dim: usize,
    pub hidden_layers: usize,
    pub prompt_end: Vec<u32>,
}

impl GatingSpec {
    /// Reads config.json's gating keys and tokenizes [`PROMPT_END`].
    pub fn new(
        raw: &serde_json::Value,
        tokenizer: &tokenizers::Tokenizer,
    ) -> std::result::Result<Self, ModelError> {
        let cfg: GatingConfig = parse_config(raw)?;
        if cfg.num_objectives == 0 {
            return Err(ModelError::Config("num_objectives is 0".into()));
        }
        if !(cfg.gating_temperature.is_finite() && cfg.gating_temperature > 0.0) {
            return Err(ModelError::Config(format!(
                "gating_temperature must be a positive number, not {}",
                cfg.gating_temperature
            )));
        }
        if let Some(missing) = PROMPT_END_SPECIALS
            .iter()
            .find(|token| tokenizer.token_to_id(token).is_none())
        {
            return Err(ModelError::Tokenizer(format!(
                "LlamaForRewardModelWithGating finds the prompt's end by the Llama 3 chat \
                 format, and the tokenizer has no {missing} token"
            )));
        }
        let prompt_end = plain_ids(tokenizer, PROMPT_END)?;
        if prompt_end.is_empty() {
            return Err(ModelError::Tokenizer(format!(
                "{PROMPT_END:?} tokenizes to nothing"
            )));
        }
        Ok(Self {
            objectives: cfg.num_objectives,
            temperature: cfg.gating_temperature,
            hidden_dim: cfg.gating_hidden_dim,
            hidden_layers: cfg.gating_n_hidden,
            prompt_end,
        })
    }
}

pub struct GatingHead {
    regression: Dense,
    /// `gating.layers.*`: ReLU between them, none after the last.
    gate: Vec<Dense>,
    temperature: f64,
    /// `gating.logit_scale`, `[1]`.
    logit_scale: Tensor,
    /// `reward_transform_matrix`, `[objectives, objectives]`.
    transform: Tensor,
    prompt_end: Vec<u32>,
}

impl GatingHead {
    /// Loads the head from the checkpoint's root (`regression_layer`, `gating`,
    /// `reward_transform_matrix`).
    pub fn load(vb: VarBuilder, hidden: usize, spec: &GatingSpec) -> Result<Self> {
        let k = spec.objectives;
        let mut gate = Vec::with_capacity(spec.hidden_layers + 1);
        let mut width = hidden;
        for i in 0..spec.hidden_layers {
            gate.push(linear(
                vb.pp(format!("gating.layers.{i}")),
                width,
                spec.hidden_dim,
                true,
            )?);
            width = spec.hidden_dim;
        }
        gate.push(linear(
            vb.pp(format!("gating.layers.{}", spec.hidden_layers)),
            width,
            k,
            true,
        )?);
        Ok(Self {
            regression: linear(vb.pp("regression_layer"), hidden, k, false)?,
            gate,
            temperature: spec.temperature,
            logit_scale: vb.get(1, "gating.logit_scale")?,
            transform: vb.get((k, k), "reward_transform_matrix")?,
            prompt_end: spec.prompt_end.clone(),
        })
    }

    /// The position of the prompt's end in `ids`: the first token of the last occurrence
    /// of the prompt-end ids.
    pub fn prompt_end(&self, ids: &[u32]) -> Option<usize> {
        ids.windows(self.prompt_end.len())
            .rposition(|window| window == self.prompt_end.as_slice())
    }

    /// Why `ids` cannot be scored, if they cannot.
    pub fn input_error(&self, ids: &[u32]) -> Option<String> {
        self.prompt_end(ids).is_none().then(|| {
            format!(
                "this model (ArmoRM's LlamaForRewardModelWithGating) weighs its rewards by \
                 where the prompt ends, the last {PROMPT_END:?}, and the input has none: \
                 send a conversation ending in an assistant turn (messages, or text in the \
                 Llama 3 chat format), and keep that point when truncating"
            )
        })
    }

    /// Scores `[b, 1]` and the objectives' rewards `[b, objectives]` (the regression
    /// layer's outputs, the remote code's `rewards`) from the normed hidden states at the
    /// last tokens and at the prompts' ends, both `[b, h]`.
    pub fn forward(&self, last: &Tensor, prompt: &Tensor) -> Result<(Tensor, Tensor)> {
        let objectives = self.regression.forward(last)?;
        let rewards = objectives.matmul(&self.transform)?;
        let mut g = prompt.clone();
        let layers = self.gate.len();
        for (i, layer) in self.gate.iter().enumerate() {
            g = layer.forward(&g)?;
            if i + 1 < layers {
                g = g.relu()?;
            }
        }
        let weights = candle_nn::ops::softmax_last_dim(&(g / self.temperature)?)?
            .broadcast_mul(&self.logit_scale)?;
        Ok(((weights * rewards)?.sum_keepdim(D::Minus1)?, objectives))
    }
}
