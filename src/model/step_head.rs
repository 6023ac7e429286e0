//! Process reward models' head (Qwen2.5-Math-PRM's `Qwen2ForProcessRewardModel`, remote
//! code): `score = Sequential(Linear(h, h), ReLU, Linear(h, 2))` on every token's hidden
//! state. A response marks the end of each reasoning step with [`STEP_TAG`]; the step's
//! reward is the probability of the second class, softmax(logits)[1], at its tag token, as
//! the model card's `make_step_rewards` reads it. warm scores an input by its weakest step
//! (the minimum), and returns every step's reward beside it.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::layers::linear;
use super::ModelError;

/// The text that ends each step (Qwen2.5-Math-PRM's model card joins steps with it and
/// ends the response with it).
pub const STEP_TAG: &str = "<extra_0>";

/// The step tag's token id in the model's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    pub tag: u32,
}

impl StepSpec {
    /// Finds [`STEP_TAG`]'s id: it must be a single token, as the model card's
    /// `tokenizer.encode("<extra_0>")[0]` assumes.
    pub fn new(tokenizer: &tokenizers::Tokenizer) -> std::result::Result<Self, ModelError> {
        let ids = tokenizer
            .encode(STEP_TAG, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        match ids.as_slice() {
            [tag] => Ok(Self { tag: *tag }),
            _ => Err(ModelError::Tokenizer(format!(
                "Qwen2ForProcessRewardModel reads each step's reward at the step tag \
                 {STEP_TAG}, which this tokenizer makes {} tokens, not one",
                ids.len()
            ))),
        }
    }
}

pub struct StepHead {
    hidden: Dense,
    out: Dense,
    tag: u32,
}

impl StepHead {
    /// `<name>.0` (h -> h) and `<name>.2` (h -> 2), both with biases.
    pub fn load(vb: VarBuilder, hidden: usize, spec: &StepSpec) -> Result<Self> {
        Ok(Self {
            hidden: linear(vb.pp("0"), hidden, hidden, true)?,
            out: linear(vb.pp("2"), hidden, 2, true)?,
            tag: spec.tag,
        })
    }

    /// The positions of the step tags in `ids`.
    pub fn tag_positions(&self, ids: &[u32]) -> Vec<usize> {
        ids.iter()
            .enumerate()
            .filter(|(_, &id)| id == self.tag)
            .map(|(i, _)| i)
            .collect()
    }

    /// Why `ids` cannot be scored: they hold no step tag.
    pub fn input_error(&self, ids: &[u32]) -> Option<String> {
        (!ids.contains(&self.tag)).then(|| {
            format!(
                "a process reward model scores the steps of a response, each ended by \
                 {STEP_TAG}, and this input has none (after truncation, if it was truncated)"
            )
        })
    }

    /// Each step's reward from the normed hidden states at the tags `tags` `[n, h]`, in
    /// input order with `counts[i]` tags for input i; and each input's score `[b, 1]`, its
    /// weakest step.
    pub fn forward(&self, tags: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let logits = self
            .out
            .forward(&self.hidden.forward(tags)?.relu()?)?
            .to_dtype(DType::F32)?;
        let positive: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits)?
            .narrow(D::Minus1, 1, 1)?
            .flatten_all()?
            .to_vec1()?;
        let mut steps = Vec::with_capacity(counts.len());
        let mut rest = positive.as_slice();
        for &count in counts {
            if count == 0 || count > rest.len() {
                return Err(candle_core::Error::Msg(format!(
                    "{count} step tags expected, {} read",
                    rest.len()
                )));
            }
            let (these, after) = rest.split_at(count);
            steps.push(these.to_vec());
            rest = after;
        }
        let weakest: Vec<f32> = steps
            .iter()
            .map(|s| s.iter().copied().fold(f32::INFINITY, f32::min))
            .collect();
        let scores = Tensor::from_vec(weakest, (counts.len(), 1), tags.device())?;
        Ok((scores, steps))
    }
}
