//! The decoders' score head: what maps the last real token's hidden state to logits.
//! transformers' *ForSequenceClassification has one bias-free linear layer `score`; reward
//! models saved by their own classes name or shape it otherwise (OpenRLHF's value head;
//! the two-layer MLP of Qwen2ForRewardModel and INFORMForSequenceClassification).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::layers::linear;

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
}

pub enum ScoreHead {
    Linear(Dense),
    ReluMlp { hidden: Dense, out: Dense },
}

impl ScoreHead {
    pub fn load(vb: VarBuilder, hidden: usize, spec: &HeadSpec) -> Result<Self> {
        let vb = vb.pp(&spec.name);
        Ok(match spec.shape {
            HeadShape::Linear { bias } => Self::Linear(linear(vb, hidden, spec.labels, bias)?),
            HeadShape::ReluMlp => Self::ReluMlp {
                hidden: linear(vb.pp("0"), hidden, hidden, true)?,
                out: linear(vb.pp("2"), hidden, spec.labels, true)?,
            },
        })
    }
}

impl Module for ScoreHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(layer) => layer.forward(x),
            Self::ReluMlp { hidden, out } => out.forward(&hidden.forward(x)?.relu()?),
        }
    }
}
