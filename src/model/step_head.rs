//! Process reward models' heads: each step of a response ends with a tag token, and the
//! step's reward is the probability that it is right, read at the tag.
//!
//! - Qwen2.5-Math-PRM's `Qwen2ForProcessRewardModel` (remote code): `score = Sequential(
//!   Linear(h, h), ReLU, Linear(h, 2))` on every token; the reward is softmax(logits)[1] at
//!   each [`STEP_TAG`], as the model card's `make_step_rewards` reads it.
//! - A causal LM trained to predict a good or a bad token after each tag (Math-Shepherd,
//!   OpenRLHF's PRMs), described by config.json's [`CONFIG_KEY`]: the reward is the
//!   softmax over the two tokens' next-token logits at the tag, the good one's share, as
//!   Math-Shepherd's model card computes it. Only the LM head's two rows are kept. A tag
//!   may be a sequence of tokens, read at its last: RLHFlow's PRMs answer each step, a
//!   user turn, with an assistant turn "+", and the step's reward is read where the
//!   assistant's header ends (one pass over the conversation reads every step as their
//!   evaluation does a step at a time: attention is causal).
//! - A `*ForTokenClassification` with two labels, as TRL's PRMTrainer trains one: `score`
//!   = Linear(h, 2) with a bias on every token; the prompt and each step are tokenized
//!   apart, each step followed by the separator's tokens, and the reward is
//!   softmax(logits)[1] at each separator's last token. Those positions cannot be found in
//!   the ids (the separator, "\n" by default, occurs inside steps, and tokenizing the
//!   whole text merges it with what precedes it): the text encoder records them.
//! - Skywork's o1-Open-PRM (`Qwen2ForPrmModel`): steps laid out the same way after the
//!   prompt and a "\n", the separator "\n"; `v_head.summary` = Linear(h, 1) with a bias on
//!   every token, the reward sigmoid(value) at each separator.
//!
//! warm scores an input by its weakest step (the minimum), and returns every step's reward
//! beside it.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::dense::Dense;
use super::layers::linear;
use super::{plain_ids, ModelError, Sequence};

/// Qwen2.5-Math-PRM's step tag: its model card joins the steps with it and ends the
/// response with it.
pub const STEP_TAG: &str = "<extra_0>";

/// config.json's key that makes a causal LM a process reward model:
/// `{"step_tag": T, "reward_tokens": [GOOD, BAD]}`, each a token id or a vocabulary entry,
/// T also a list of them (a sequence read at its last token). On a
/// `*ForTokenClassification` it gives the step separator: `{"step_separator": S}`.
pub const CONFIG_KEY: &str = "warm_process_reward";

/// TRL's PRMConfig `step_separator` default, which its config.json does not record.
pub const DEFAULT_SEPARATOR: &str = "\n";

/// Whether a checkpoint's model reads its LM head: a causal LM served as a process reward
/// model reads the good and the bad token's rows (a token-classification model, the
/// other holder of the key, has no LM head to keep).
pub fn reads_lm_head(config: &crate::checkpoint::ModelConfig) -> bool {
    config.raw().contains_key(CONFIG_KEY)
}

/// What the head reads at the end of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepClasses {
    /// `score`'s two classes (a two-layer MLP); the second is the step's being right.
    Mlp,
    /// `score`'s two classes (one linear layer with a bias, transformers'
    /// *ForTokenClassification); the second is the step's being right.
    Linear,
    /// The next-token logits of the good and the bad token, from the LM head's rows.
    Tokens { good: u32, bad: u32 },
    /// One value (`v_head.summary`, a linear layer with a bias) whose sigmoid is the
    /// reward (Skywork's).
    Value,
}

/// How an input whose steps are tokenized apart is laid out, after the BOS token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeparatedLayout {
    /// TRL's `tokenize_row`: the prompt, then the steps (no BOS token when the tokenizer
    /// has none).
    Trl,
    /// Skywork's `prepare_input`: the prompt and "\n", then the steps (the BOS token
    /// always: it writes it as text).
    Skywork,
}

impl SeparatedLayout {
    /// Text after the prompt, tokenized with it.
    pub fn prompt_suffix(self) -> &'static str {
        match self {
            Self::Trl => "",
            Self::Skywork => "\n",
        }
    }

    /// Whether the layout cannot do without a BOS token.
    pub fn needs_bos(self) -> bool {
        self == Self::Skywork
    }
}

/// How the end of each step is marked, and so where its reward is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepMarker {
    /// Tokens in the text that end each step (one, or a sequence read at its last token).
    /// `text` joins a response given as steps; None when the tag is an ordinary token,
    /// whose text does not tokenize to it wherever it stands.
    Tag { ids: Vec<u32>, text: Option<String> },
    /// Text that follows each step, the prompt and every step tokenized apart (TRL's
    /// PRMTrainer, Skywork's PRMs): read at the last of `ids`, where the text encoder put
    /// them.
    Separator {
        text: String,
        ids: Vec<u32>,
        layout: SeparatedLayout,
    },
}

/// Where steps end and how a step's reward is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    pub marker: StepMarker,
    pub classes: StepClasses,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenPrmConfig {
    step_tag: TagRef,
    reward_tokens: [TokenRef; 2],
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TagRef {
    One(TokenRef),
    Sequence(Vec<TokenRef>),
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TokenRef {
    Id(u32),
    Entry(String),
}

impl StepSpec {
    /// Qwen2ForProcessRewardModel's: [`STEP_TAG`] must be one token, as the model card's
    /// `tokenizer.encode("<extra_0>")[0]` assumes.
    pub fn qwen(tokenizer: &tokenizers::Tokenizer) -> std::result::Result<Self, ModelError> {
        let ids = plain_ids(tokenizer, STEP_TAG)?;
        match ids.as_slice() {
            [tag] => Ok(Self {
                marker: StepMarker::Tag {
                    ids: vec![*tag],
                    text: Some(STEP_TAG.into()),
                },
                classes: StepClasses::Mlp,
            }),
            _ => Err(ModelError::Tokenizer(format!(
                "Qwen2ForProcessRewardModel reads each step's reward at the step tag \
                 {STEP_TAG}, which this tokenizer makes {} tokens, not one",
                ids.len()
            ))),
        }
    }

    /// A causal LM's, from config.json's [`CONFIG_KEY`] (None without it). Tokens are
    /// vocabulary entries (`token_to_id`, not tokenized: "▁+" and "+" differ) or ids below
    /// `vocab_size`.
    pub fn from_config(
        raw: &serde_json::Value,
        tokenizer: &tokenizers::Tokenizer,
    ) -> std::result::Result<Option<Self>, ModelError> {
        let Some(section) = raw.get(CONFIG_KEY) else {
            return Ok(None);
        };
        let cfg: TokenPrmConfig = serde_json::from_value(section.clone()).map_err(|e| {
            ModelError::Config(format!(
                "{CONFIG_KEY}: {e} (expected {{\"step_tag\": T, \"reward_tokens\": [GOOD, BAD]}}, \
                 each a token id or a vocabulary entry)"
            ))
        })?;
        let rows = raw
            .get("vocab_size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| ModelError::Config("no vocab_size".into()))?;
        let resolve = |token: &TokenRef, what: &str| -> std::result::Result<u32, ModelError> {
            let id = match token {
                TokenRef::Id(id) => *id,
                TokenRef::Entry(entry) => tokenizer.token_to_id(entry).ok_or_else(|| {
                    ModelError::Tokenizer(format!(
                        "{CONFIG_KEY}.{what}: {entry:?} is not an entry of the vocabulary \
                         (give the token as the vocabulary spells it, e.g. \"▁+\", or its id)"
                    ))
                })?,
            };
            if u64::from(id) >= rows {
                return Err(ModelError::Config(format!(
                    "{CONFIG_KEY}.{what}: token id {id} is beyond vocab_size {rows}"
                )));
            }
            Ok(id)
        };
        let tag = match &cfg.step_tag {
            TagRef::One(token) => vec![resolve(token, "step_tag")?],
            TagRef::Sequence(tokens) if tokens.is_empty() => {
                return Err(ModelError::Config(format!(
                    "{CONFIG_KEY}.step_tag is empty"
                )))
            }
            TagRef::Sequence(tokens) => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| resolve(t, &format!("step_tag[{i}]")))
                .collect::<std::result::Result<_, _>>()?,
        };
        let good = resolve(&cfg.reward_tokens[0], "reward_tokens[0]")?;
        let bad = resolve(&cfg.reward_tokens[1], "reward_tokens[1]")?;
        if good == bad {
            return Err(ModelError::Config(format!(
                "{CONFIG_KEY}.reward_tokens: the good and the bad token are both id {good}"
            )));
        }
        // An added token is split out of any text as it stands: its text joins steps.
        let tag_text = match (&cfg.step_tag, tag.as_slice()) {
            (TagRef::One(TokenRef::Entry(entry)), [id])
                if tokenizer.get_added_tokens_decoder().contains_key(id) =>
            {
                Some(entry.clone())
            }
            _ => None,
        };
        Ok(Some(Self {
            marker: StepMarker::Tag {
                ids: tag,
                text: tag_text,
            },
            classes: StepClasses::Tokens { good, bad },
        }))
    }

    /// A `*ForTokenClassification` of `labels` labels trained by TRL's PRMTrainer: two
    /// labels (a step wrong or right), steps followed by config.json's
    /// [`CONFIG_KEY`]`.step_separator`, else TRL's default [`DEFAULT_SEPARATOR`].
    pub fn token_classification(
        architecture: &str,
        raw: &serde_json::Value,
        labels: usize,
        tokenizer: &tokenizers::Tokenizer,
    ) -> std::result::Result<Self, ModelError> {
        if labels != 2 {
            return Err(ModelError::Config(format!(
                "{architecture} is served as a process reward model as TRL's PRMTrainer \
                 trains one, with two labels (a step wrong or right); this one has {labels}"
            )));
        }
        let text = match raw.get(CONFIG_KEY) {
            None => DEFAULT_SEPARATOR.to_string(),
            Some(section) => {
                let cfg: SeparatorConfig =
                    serde_json::from_value(section.clone()).map_err(|e| {
                        ModelError::Config(format!(
                            "{CONFIG_KEY}: {e} (a token-classification model takes \
                             {{\"step_separator\": S}}, the text after each step)"
                        ))
                    })?;
                cfg.step_separator
            }
        };
        let ids = plain_ids(tokenizer, &text)?;
        if ids.is_empty() {
            return Err(ModelError::Tokenizer(format!(
                "the step separator {text:?} tokenizes to no token, so no step's end can \
                 be read (set {CONFIG_KEY}.step_separator in config.json)"
            )));
        }
        Ok(Self {
            marker: StepMarker::Separator {
                text,
                ids,
                layout: SeparatedLayout::Trl,
            },
            classes: StepClasses::Linear,
        })
    }

    /// Skywork's `Qwen2ForPrmModel`: steps followed by "\n", read at `encode("\n")[-1]`
    /// as its `prepare_input` does.
    pub fn skywork(tokenizer: &tokenizers::Tokenizer) -> std::result::Result<Self, ModelError> {
        let text = "\n".to_string();
        let ids = plain_ids(tokenizer, &text)?;
        let Some(&last) = ids.last() else {
            return Err(ModelError::Tokenizer(
                "Qwen2ForPrmModel reads each step after \"\\n\", which this tokenizer makes \
                 no token"
                    .into(),
            ));
        };
        Ok(Self {
            marker: StepMarker::Separator {
                text,
                ids: vec![last],
                layout: SeparatedLayout::Skywork,
            },
            classes: StepClasses::Value,
        })
    }

    /// The class whose probability is the step's reward.
    pub fn positive(&self) -> usize {
        match self.classes {
            StepClasses::Mlp | StepClasses::Linear => 1,
            StepClasses::Tokens { .. } | StepClasses::Value => 0,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SeparatorConfig {
    step_separator: String,
}

pub struct StepHead {
    hidden: Option<Dense>,
    out: Dense,
    spec: StepSpec,
}

impl StepHead {
    /// From the checkpoint's root: `score.0` (h -> h) and `score.2` (h -> 2) with biases,
    /// `score` (h -> 2) with a bias, `v_head.summary` (h -> 1) with a bias, or the good and
    /// bad tokens' rows of `lm_head.weight` (GPT-NeoX's `embed_out.weight`; the input
    /// embedding when the checkpoint ties them and saves no LM head).
    pub fn load(vb: VarBuilder, hidden: usize, vocab: usize, spec: &StepSpec) -> Result<Self> {
        let (hidden_layer, out) = match spec.classes {
            StepClasses::Mlp => {
                let vb = vb.pp("score");
                (
                    Some(linear(vb.pp("0"), hidden, hidden, true)?),
                    linear(vb.pp("2"), hidden, 2, true)?,
                )
            }
            StepClasses::Linear => (None, linear(vb.pp("score"), hidden, 2, true)?),
            StepClasses::Value => (None, linear(vb.pp("v_head.summary"), hidden, 1, true)?),
            StepClasses::Tokens { good, bad } => {
                const TABLES: [&str; 5] = [
                    "lm_head.weight",
                    "embed_out.weight",
                    "model.embed_tokens.weight",
                    "gpt_neox.embed_in.weight",
                    "transformer.wte.weight",
                ];
                let name = TABLES
                    .into_iter()
                    .find(|name| vb.contains_tensor(name))
                    .unwrap_or(TABLES[0]);
                let weight = vb.get((vocab, hidden), name)?;
                let rows = Tensor::new(&[good, bad], weight.device())?;
                (None, Dense::new(weight.index_select(&rows, 0)?, None))
            }
        };
        Ok(Self {
            hidden: hidden_layer,
            out,
            spec: spec.clone(),
        })
    }

    pub fn spec(&self) -> &StepSpec {
        &self.spec
    }

    /// The positions the step rewards are read at in `sequence`: its step tags, or where
    /// the encoder put the separators; None when it has none.
    pub fn positions(&self, sequence: &Sequence) -> Option<Vec<usize>> {
        let positions = match &self.spec.marker {
            StepMarker::Tag { ids, .. } => tag_ends(ids, &sequence.ids),
            StepMarker::Separator { .. } => sequence.read_at.clone().unwrap_or_default(),
        };
        let within = |p: &Vec<usize>| p.iter().all(|&at| at < sequence.ids.len());
        Some(positions).filter(|p| !p.is_empty() && within(p))
    }

    /// Why `ids` cannot be scored: they hold no step tag. (Separated steps are checked
    /// where they are encoded.)
    pub fn input_error(&self, ids: &[u32]) -> Option<String> {
        let StepMarker::Tag { ids: tag, text } = &self.spec.marker else {
            return None;
        };
        tag_ends(tag, ids).is_empty().then(|| {
            let tag = match text {
                Some(text) => text.clone(),
                None => format!("(token ids {tag:?})"),
            };
            format!(
                "a process reward model scores the steps of a response, each ended by the \
                 step tag {tag}, and this input has none (after truncation, if it was truncated)"
            )
        })
    }

    /// Why `sequence` has no position to read, for an error.
    pub fn missing_positions(&self, sequence: &Sequence) -> String {
        match &self.spec.marker {
            StepMarker::Tag { .. } => self.input_error(&sequence.ids).unwrap_or_default(),
            StepMarker::Separator { .. } => "this process reward model reads each step where \
                the text encoder put its separator, within the input: encode a prompt and its \
                steps"
                .into(),
        }
    }

    /// Each step's reward from the normed hidden states at the tags `tags` `[n, h]`, in
    /// input order with `counts[i]` tags for input i; and each input's score `[b, 1]`, its
    /// weakest step.
    pub fn forward(&self, tags: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let x = match &self.hidden {
            Some(hidden) => hidden.forward(tags)?.relu()?,
            None => tags.clone(),
        };
        let logits = self.out.forward(&x)?.to_dtype(DType::F32)?;
        let probabilities = match self.spec.classes {
            StepClasses::Value => candle_nn::ops::sigmoid(&logits)?,
            _ => candle_nn::ops::softmax_last_dim(&logits)?,
        };
        let positive: Vec<f32> = probabilities
            .narrow(D::Minus1, self.spec.positive(), 1)?
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

/// The position of the last token of each occurrence of `tag` in `ids`, occurrences taken
/// from the start without overlapping.
fn tag_ends(tag: &[u32], ids: &[u32]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    while !tag.is_empty() && at + tag.len() <= ids.len() {
        if ids[at..at + tag.len()] == *tag {
            at += tag.len();
            ends.push(at - 1);
        } else {
            at += 1;
        }
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::tag_ends;

    #[test]
    fn tags_are_read_at_their_last_token() {
        assert_eq!(tag_ends(&[7], &[7, 1, 7, 7]), vec![0, 2, 3]);
        assert_eq!(
            tag_ends(&[4, 5, 6], &[4, 5, 6, 1, 4, 5, 4, 5, 6]),
            vec![2, 8]
        );
        // Occurrences do not overlap: [1, 1] in five 1s ends at 1 and 3.
        assert_eq!(tag_ends(&[1, 1], &[1; 5]), vec![1, 3]);
        assert!(tag_ends(&[4, 5], &[4]).is_empty());
        assert!(tag_ends(&[], &[1, 2]).is_empty());
    }
}
