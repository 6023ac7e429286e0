//! The decoders' score head: what maps the last real token's hidden state to logits.
//! transformers' *ForSequenceClassification has one bias-free linear layer `score`; reward
//! models saved by their own classes name or shape it otherwise (OpenRLHF's value head;
//! the two-layer MLP of Qwen2ForRewardModel and INFORMForSequenceClassification; ArmoRM's
//! gated objectives, which also read where the prompt ends; a process reward model's
//! per-step head, which reads every step's end).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::gating_head::{GatingHead, GatingSpec};
use super::layers::linear;
use super::step_head::{StepHead, StepSpec};
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
    /// A process reward model's head, read at every step tag (src/model/step_head.rs),
    /// from the checkpoint's root whatever `name` says.
    Steps(StepSpec),
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

    /// One reward from a linear layer named `name`, with a bias where the checkpoint holds
    /// one (the value heads of OpenRLHF, TRL/LLaMA-Factory and OpenBMB's classes).
    pub fn value(name: &str, vb: &candle_nn::VarBuilder) -> Self {
        Self {
            name: name.into(),
            labels: 1,
            shape: HeadShape::Linear {
                bias: vb.contains_tensor(&format!("{name}.bias")),
            },
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

    /// A process reward model's per-step head; one score per input (its weakest step).
    pub fn steps(spec: StepSpec) -> Self {
        Self {
            name: String::new(),
            labels: 1,
            shape: HeadShape::Steps(spec),
        }
    }
}

/// What the head computed: logits `[b, labels]`, each input's step rewards for a process
/// reward model, and its objectives' rewards `[b, objectives]` for ArmoRM.
pub struct HeadOutput {
    pub logits: Tensor,
    pub steps: Option<Vec<Vec<f32>>>,
    pub objectives: Option<Tensor>,
}

pub enum ScoreHead {
    Linear(Dense),
    ReluMlp { hidden: Dense, out: Dense },
    Gating(GatingHead),
    Steps(StepHead),
}

impl ScoreHead {
    /// The head of `spec` over hidden states of `hidden`, in a model of `vocab` tokens.
    pub fn load(vb: VarBuilder, hidden: usize, vocab: usize, spec: &HeadSpec) -> Result<Self> {
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
            HeadShape::Steps(steps) => Self::Steps(StepHead::load(vb, hidden, vocab, steps)?),
        })
    }

    /// Why `ids` cannot be scored by this head, if they cannot.
    pub fn input_error(&self, ids: &[u32]) -> Option<String> {
        match self {
            Self::Gating(head) => head.input_error(ids),
            Self::Steps(head) => head.input_error(ids),
            Self::Linear(_) | Self::ReluMlp { .. } => None,
        }
    }

    /// The positions of each input that the head reads besides its last token: where the
    /// prompt ends (ArmoRM), every step's end (a process reward model). None: the last
    /// token alone.
    pub fn read_positions(&self, sequences: &[&Sequence]) -> Result<Option<Vec<Vec<usize>>>> {
        type Find<'a> = &'a dyn Fn(&Sequence) -> std::result::Result<Vec<usize>, String>;
        let find: Find = match self {
            Self::Gating(head) => &|s| {
                head.prompt_end(&s.ids)
                    .map(|p| vec![p])
                    .ok_or_else(|| head.input_error(&s.ids).unwrap_or_default())
            },
            Self::Steps(head) => &|s| head.positions(s).ok_or_else(|| head.missing_positions(s)),
            Self::Linear(_) | Self::ReluMlp { .. } => return Ok(None),
        };
        sequences
            .iter()
            .enumerate()
            .map(|(i, s)| {
                find(s).map_err(|why| candle_core::Error::Msg(format!("input {i}: {why}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The head on the normed hidden states at the last tokens `last` `[b, h]` and, for a
    /// head that reads them, at the positions `read_positions` gave (`read` `[n, h]`, in
    /// input order, `counts[i]` of input i).
    pub fn forward(&self, last: &Tensor, read: Option<(&Tensor, &[usize])>) -> Result<HeadOutput> {
        let logits = match (self, read) {
            (Self::Linear(layer), _) => layer.forward(last)?,
            (Self::ReluMlp { hidden, out }, _) => out.forward(&hidden.forward(last)?.relu()?)?,
            (Self::Gating(head), Some((prompt, _))) => {
                let (logits, objectives) = head.forward(last, prompt)?;
                return Ok(HeadOutput {
                    logits,
                    steps: None,
                    objectives: Some(objectives),
                });
            }
            (Self::Steps(head), Some((tags, counts))) => {
                let (logits, steps) = head.forward(tags, counts)?;
                return Ok(HeadOutput {
                    logits,
                    steps: Some(steps),
                    objectives: None,
                });
            }
            (Self::Gating(_) | Self::Steps(_), None) => {
                return Err(candle_core::Error::Msg(
                    "the score head needs the hidden states at the positions it reads".into(),
                ))
            }
        };
        Ok(HeadOutput {
            logits,
            steps: None,
            objectives: None,
        })
    }

    /// A process reward model's step tag and classes.
    pub fn step_spec(&self) -> Option<&StepSpec> {
        match self {
            Self::Steps(head) => Some(head.spec()),
            _ => None,
        }
    }
}
