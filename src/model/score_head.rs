//! The decoders' score head: what maps the last real token's hidden state to logits.
//! transformers' *ForSequenceClassification has one bias-free linear layer `score`; reward
//! models saved by their own classes name or shape it otherwise (OpenRLHF's value head;
//! the two-layer MLP of Qwen2ForRewardModel and INFORMForSequenceClassification; ArmoRM's
//! gated objectives, which also read where the prompt ends).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::gating_head::{GatingHead, GatingSpec};
use super::layers::linear;
use super::Sequence;

/// Where the head's tensors are and how they are arranged.
pub struct HeadSpec {
    /// The tensors' prefix: `score` in transformers' classes.
    pub name: String,
    pub labels: usize,
    pub shape: HeadShape,
}

pub enum HeadShape {
    /// One linear layer: `<name>.weight` (and `<name>.bias` when `bias`).
    Linear { bias: bool },
    /// `Sequential(Linear(h, h), ReLU, Linear(h, labels))`, both with biases:
    /// `<name>.0.*` and `<name>.2.*`.
    ReluMlp,
    /// ArmoRM's regression layer and gating network (src/model/gating_head.rs), from the
    /// checkpoint's root whatever `name` says.
    Gating(GatingSpec),
}

impl HeadSpec {
    /// transformers' *ForSequenceClassification head.
    pub fn classification(labels: usize) -> Self {
        Self {
            name: "score".into(),
            labels,
            shape: HeadShape::Linear { bias: false },
        }
    }

    /// `score` as a two-layer MLP with one output (one reward, whatever config.json's
    /// num_labels says: the classes that use it are loaded with num_labels 1).
    pub fn relu_mlp() -> Self {
        Self {
            name: "score".into(),
            labels: 1,
            shape: HeadShape::ReluMlp,
        }
    }

    /// ArmoRM's gated objectives, one reward.
    pub fn gating(spec: GatingSpec) -> Self {
        Self {
            name: String::new(),
            labels: 1,
            shape: HeadShape::Gating(spec),
        }
    }
}

pub enum ScoreHead {
    Linear(Dense),
    ReluMlp { hidden: Dense, out: Dense },
    Gating(GatingHead),
}

impl ScoreHead {
    pub fn load(vb: VarBuilder, hidden: usize, spec: &HeadSpec) -> Result<Self> {
        Ok(match &spec.shape {
            HeadShape::Linear { bias } => {
                Self::Linear(linear(vb.pp(&spec.name), hidden, spec.labels, *bias)?)
            }
            HeadShape::ReluMlp => {
                let vb = vb.pp(&spec.name);
                Self::ReluMlp {
                    hidden: linear(vb.pp("0"), hidden, hidden, true)?,
                    out: linear(vb.pp("2"), hidden, spec.labels, true)?,
                }
            }
            HeadShape::Gating(gating) => Self::Gating(GatingHead::load(vb, hidden, gating)?),
        })
    }

    /// Why `ids` cannot be scored by this head, if they cannot.
    pub fn input_error(&self, ids: &[u32]) -> Option<String> {
        match self {
            Self::Gating(head) => head.input_error(ids),
            Self::Linear(_) | Self::ReluMlp { .. } => None,
        }
    }

    /// Where each input's prompt ends, when the head reads it (None: it reads the last
    /// token alone).
    pub fn prompt_positions(&self, sequences: &[&Sequence]) -> Result<Option<Vec<usize>>> {
        let Self::Gating(head) = self else {
            return Ok(None);
        };
        sequences
            .iter()
            .enumerate()
            .map(|(i, s)| {
                head.prompt_end(&s.ids).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "input {i}: {}",
                        head.input_error(&s.ids).unwrap_or_default()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Logits `[b, labels]` from the normed hidden states at the last tokens, and at the
    /// prompts' ends for a head that reads them.
    pub fn forward(&self, last: &Tensor, prompt: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Self::Linear(layer) => layer.forward(last),
            Self::ReluMlp { hidden, out } => out.forward(&hidden.forward(last)?.relu()?),
            Self::Gating(head) => match prompt {
                Some(prompt) => head.forward(last, prompt),
                None => Err(candle_core::Error::Msg(
                    "the gating head needs the prompts' hidden states".into(),
                )),
            },
        }
    }
}
