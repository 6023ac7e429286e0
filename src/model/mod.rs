//! Reward models: one trait, one file per architecture family, built from config.json and
//! a map of (fused) tensors.

mod bert;
mod deberta;
mod decoder;
mod dense;
mod gated;
mod gating_head;
mod gelu;
mod gpt2;
mod internlm2;
mod layers;
mod neox;
mod openrlhf;
mod packed_attention;
mod regression_head;
mod relative_position;
mod score_head;
mod segments;
mod shared_padding;
mod step_head;

pub use internlm2::reward_token;
pub use step_head::{
    reads_lm_head, SeparatedLayout, StepClasses, StepMarker, StepSpec,
    CONFIG_KEY as PROCESS_REWARD_KEY,
};
#[cfg(test)]
mod testing;
mod value_head;
mod vexp;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}' (warm serves: {list}; OpenRLHF's RewardModel; and the causal LMs of these families with a value head, as LLaMA-Factory trains them)", list = SUPPORTED.join(", "))]
    Unsupported(String),
    #[error("an OpenRLHF RewardModel over model_type '{0}': warm serves it over {list}", list = decoder::FAMILIES.iter().map(|family| family.model_type).collect::<Vec<_>>().join(", "))]
    UnsupportedBackbone(String),
    #[error("{0} is a language model: warm serves it as a reward model with a value head (v_head.summary.weight, in {file} as LLaMA-Factory saves reward models), and it has none; or as a process reward model that predicts a good or a bad token after each step tag, which config.json's '{key}' describes: {{\"step_tag\": T, \"reward_tokens\": [GOOD, BAD]}}", file = crate::checkpoint::VALUE_HEAD_FILE, key = step_head::CONFIG_KEY)]
    NoRewardHead(String),
    #[error("config.json: {0}")]
    Config(String),
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    #[error("loading the weights: {0}")]
    Load(String),
    #[error("forward pass: {0}")]
    Forward(#[from] candle_core::Error),
}

pub const SUPPORTED: &[&str] = &[
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "DebertaV2ForSequenceClassification",
    "DistilBertForSequenceClassification",
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
    "Qwen3ForSequenceClassification",
    "GemmaForSequenceClassification",
    "Gemma2ForSequenceClassification",
    "GPTNeoXForSequenceClassification",
    "GPT2ForSequenceClassification",
    "Qwen2ForRewardModel",
    "INFORMForSequenceClassification",
    "LlamaForRewardModelWithGating",
    "Qwen2ForProcessRewardModel",
    "LlamaForTokenClassification",
    "MistralForTokenClassification",
    "Qwen2ForTokenClassification",
    "Qwen3ForTokenClassification",
    "GemmaForTokenClassification",
    "Gemma2ForTokenClassification",
    "Qwen2ForPrmModel",
    internlm2::ARCHITECTURE,
    "LlamaRewardModel",
    "EurusRewardModel",
    "GPTNeoXRewardModel",
];

/// Which token's hidden state the score head reads, as transformers does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token ([CLS] / <s>): encoders.
    First,
    /// The last real token of each sequence: decoders.
    Last,
}

/// Token ids of one input, as the text encoder produced them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Where a process reward model reads its steps' rewards, when the text encoder put
    /// them there (steps tokenized apart, TRL's); None: the head finds its own places.
    pub read_at: Option<Vec<usize>>,
}

impl Sequence {
    /// `ids` with zero token types and no positions of their own to read.
    pub fn plain(ids: Vec<u32>) -> Self {
        Self {
            type_ids: vec![0; ids.len()],
            ids,
            read_at: None,
        }
    }

    /// `batch` sequences of `len` seeded pseudo-random ids drawn from `ids`, the same for
    /// every call: inputs for benchmarks and throughput checks.
    pub fn synthetic_batch(batch: usize, len: usize, ids: std::ops::Range<u32>) -> Vec<Self> {
        let span = u64::from(ids.end - ids.start).max(1);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..batch)
            .map(|_| Self {
                ids: (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        ids.start + (state % span) as u32
                    })
                    .collect(),
                type_ids: vec![0; len],
                read_at: None,
            })
            .collect()
    }
}

/// A batch padded on the right to its longest sequence.
pub struct PaddedBatch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    /// Real tokens per sequence (the rest of each row is padding).
    pub lengths: Vec<usize>,
    pub seq_len: usize,
}

impl PaddedBatch {
    pub fn new(sequences: &[&Sequence], pad_id: u32, device: &Device) -> candle_core::Result<Self> {
        let seq_len = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq_len);
        let mut type_ids = Vec::with_capacity(sequences.len() * seq_len);
        for s in sequences {
            ids.extend_from_slice(&s.ids);
            ids.resize(ids.len() + seq_len - s.ids.len(), pad_id);
            type_ids.extend(
                s.type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(0))
                    .take(seq_len),
            );
        }
        let shape = (sequences.len(), seq_len);
        Ok(Self {
            ids: Tensor::from_vec(ids, shape, device)?,
            type_ids: Tensor::from_vec(type_ids, shape, device)?,
            lengths: sequences.iter().map(|s| s.ids.len()).collect(),
            seq_len,
        })
    }
}

/// How a model lays out a batch: what a forward pass costs, and which inputs are best
/// computed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchLayout {
    /// Padded on the right to the longest sequence: costs sequences x longest.
    Padded,
    /// Real tokens only (packed rows): costs their sum.
    Packed,
    /// Packed rows, and inputs that begin with at least `min_shared` common tokens compute
    /// them once: costs the packed rows.
    PackedSharing { min_shared: usize },
    /// Padded, and inputs that begin with at least `min_shared` common tokens compute them
    /// once: costs the rows its padded attention blocks gather (src/model/shared_padding.rs),
    /// a prompt's once.
    PaddedSharing { min_shared: usize },
}

impl BatchLayout {
    /// Whether the layout pads a batch to its longest sequence.
    pub fn pads(self) -> bool {
        matches!(self, Self::Padded | Self::PaddedSharing { .. })
    }

    /// Whether inputs that begin alike compute their shared start once.
    pub fn shares(self) -> bool {
        matches!(
            self,
            Self::PackedSharing { .. } | Self::PaddedSharing { .. }
        )
    }
}

/// The cost of a batch forming one sequence at a time, in tokens as its layout counts
/// them: the rows of its largest per-token tensors. Sharing layouts take sequences in
/// token order, as the batcher queues them.
#[derive(Debug, Clone, Copy)]
pub struct BatchCost<'a> {
    layout: BatchLayout,
    sequences: usize,
    longest: usize,
    tokens: usize,
    shared: segments::SharedCount<'a>,
}

impl<'a> BatchCost<'a> {
    pub fn new(layout: BatchLayout) -> Self {
        let min_shared = match layout {
            BatchLayout::PackedSharing { min_shared }
            | BatchLayout::PaddedSharing { min_shared } => min_shared,
            BatchLayout::Padded | BatchLayout::Packed => 0,
        };
        Self {
            layout,
            sequences: 0,
            longest: 0,
            tokens: 0,
            shared: segments::SharedCount::new(min_shared),
        }
    }

    /// The cost so far.
    pub fn tokens(&self) -> usize {
        match self.layout {
            BatchLayout::Padded => self.sequences * self.longest,
            BatchLayout::Packed => self.tokens,
            BatchLayout::PackedSharing { .. } => self.shared.tally().rows,
            BatchLayout::PaddedSharing { .. } => self.shared.tally().gathered_rows(),
        }
    }

    /// The cost once `ids` joins, without adding it.
    pub fn tokens_with(&self, ids: &'a [u32]) -> usize {
        let mut next = *self;
        next.push(ids);
        next.tokens()
    }

    pub fn push(&mut self, ids: &'a [u32]) {
        self.sequences += 1;
        self.longest = self.longest.max(ids.len());
        self.tokens += ids.len();
        if self.layout.shares() {
            self.shared.push(ids);
        }
    }
}

/// What a forward pass computed: `tokens` (padding included, a shared start once), and
/// the inputs' tokens it did not compute again because they began alike (`shared`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub tokens: usize,
    pub shared: usize,
}

/// A forward pass's result: logits [batch][num_labels], each input's step rewards (a
/// process reward model) or objectives' rewards (ArmoRM), and what it computed.
pub struct Forward {
    pub logits: Vec<Vec<f32>>,
    pub steps: Option<Vec<Vec<f32>>>,
    pub objectives: Option<Vec<Vec<f32>>>,
    pub work: Work,
}

/// A sequence-classification model whose first logit is the reward.
pub trait RewardModel: Send + Sync {
    /// The forward pass of a batch of sequences (laid out as `batch_layout` says).
    fn logits(&self, sequences: &[&Sequence]) -> Result<Forward, ModelError>;
    /// Inputs longer than this cannot be scored (position table size).
    fn max_input_length(&self) -> usize;
    /// Which side truncation cuts by default: the start for decoders (the end of the
    /// response is kept), the end for encoders.
    fn pooling(&self) -> Pooling;
    fn num_labels(&self) -> usize;
    /// Rows of the token-type embedding when the model reads token type ids (None: it
    /// ignores them), so that an id past them is refused per input.
    fn token_type_rows(&self) -> Option<usize> {
        None
    }
    /// Why the model cannot score `ids`, if it cannot (ArmoRM needs the prompt's end in
    /// them), so that such an input is refused on its own.
    fn input_error(&self, _ids: &[u32]) -> Option<String> {
        None
    }
    /// The step tag and classes when the model is a process reward model: it scores every
    /// step so tagged (its reward is its weakest step's).
    fn step_spec(&self) -> Option<&StepSpec> {
        None
    }
    /// Inputs of one batch that begin with at least `tokens` equal tokens compute those
    /// once (0: never). Only causal models can; the others ignore it.
    fn share_prefixes_from(&mut self, _tokens: usize) {}
    fn batch_layout(&self) -> BatchLayout {
        BatchLayout::Padded
    }
}

/// The work of `sequences` on `layout` with nothing shared: sequences x longest tokens
/// when padded, else their sum.
pub fn unshared_work(layout: BatchLayout, sequences: &[&Sequence]) -> Work {
    let lengths = sequences.iter().map(|s| s.ids.len());
    let tokens = if layout.pads() {
        sequences.len() * lengths.max().unwrap_or(0)
    } else {
        lengths.sum()
    };
    Work { tokens, shared: 0 }
}

/// Shared starts shorter than this are not worth a segment of their own.
pub const DEFAULT_MIN_SHARED_PREFIX: usize = 16;

/// Builds the model named by config.json's `architectures` from `tensors`; `tokenizer` is
/// the checkpoint's, for a model that finds its place in the text by token ids (ArmoRM).
pub fn load(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Box<dyn RewardModel>, ModelError> {
    let architecture = config
        .architecture()
        .ok_or_else(|| ModelError::Config("no 'architectures' entry".into()))?;
    let raw = serde_json::Value::Object(config.raw().clone());
    if architecture == internlm2::ARCHITECTURE {
        // Its tensors are renamed (and wqkv cut) before a VarBuilder sees them.
        return internlm2::load(&raw, tensors, dtype, device);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    match architecture {
        "BertForSequenceClassification" => bert::load(&raw, vb, bert::Flavour::Bert),
        "RobertaForSequenceClassification" | "XLMRobertaForSequenceClassification" => {
            bert::load(&raw, vb, bert::Flavour::Roberta)
        }
        "DistilBertForSequenceClassification" => bert::load(&raw, vb, bert::Flavour::DistilBert),
        "DebertaV2ForSequenceClassification" => deberta::load(&raw, vb),
        "LlamaForSequenceClassification"
        | "MistralForSequenceClassification"
        | "Qwen2ForSequenceClassification"
        | "Qwen3ForSequenceClassification"
        | "GemmaForSequenceClassification"
        | "Gemma2ForSequenceClassification"
        | "GPTNeoXForSequenceClassification"
        | "GPT2ForSequenceClassification" => decoder::load(
            architecture,
            &raw,
            vb,
            &score_head::HeadSpec::classification(config.num_labels()),
        ),
        // Classes of their own (Qwen2.5-Math-RM's remote code, INF-ORM's model card): a
        // transformers backbone under a two-layer MLP head.
        "Qwen2ForRewardModel" => decoder::load(
            "Qwen2ForSequenceClassification",
            &raw,
            vb,
            &score_head::HeadSpec::relu_mlp(),
        ),
        "INFORMForSequenceClassification" => decoder::load(
            "LlamaForSequenceClassification",
            &raw,
            vb,
            &score_head::HeadSpec::relu_mlp(),
        ),
        // ArmoRM (RLHFlow's remote code): a Llama under gated multi-objective regression.
        "LlamaForRewardModelWithGating" => decoder::load(
            "LlamaForSequenceClassification",
            &raw,
            vb,
            &score_head::HeadSpec::gating(gating_head::GatingSpec::new(&raw, tokenizer)?),
        ),
        // Qwen2.5-Math-PRM (its remote code): a Qwen2 under a two-class MLP read at every
        // step tag.
        "Qwen2ForProcessRewardModel" => decoder::load(
            "Qwen2ForSequenceClassification",
            &raw,
            vb,
            &score_head::HeadSpec::steps(StepSpec::qwen(tokenizer)?),
        ),
        // Skywork's o1-Open-PRM: a Qwen2 under a value head read after every step.
        "Qwen2ForPrmModel" => decoder::load(
            "Qwen2ForSequenceClassification",
            &raw,
            vb,
            &score_head::HeadSpec::steps(StepSpec::skywork(tokenizer)?),
        ),
        // OpenAssistant's reward models (its model_training code): a GPT-NeoX under
        // `out_proj`, a linear head with a bias, read at the last real token.
        "GPTNeoXRewardModel" => {
            refuse_mean_pooling(&raw)?;
            let head = score_head::HeadSpec::value("out_proj", &vb);
            decoder::load("GPTNeoXForSequenceClassification", &raw, vb, &head)
        }
        name if openrlhf::ARCHITECTURES.contains(&name) => openrlhf::load(&raw, vb),
        other => {
            // OpenBMB's classes (UltraRM, Eurus-RM): a backbone under a regression head.
            if let Some(backbone) = regression_head::backbone(other) {
                return regression_head::load(other, backbone, &raw, vb);
            }
            // A decoder's token classification: a process reward model as TRL's
            // PRMTrainer trains one, read after every step.
            if let Some(family) = decoder::token_classification_family(other) {
                let labels = config.num_labels();
                let steps = StepSpec::token_classification(other, &raw, labels, tokenizer)?;
                return decoder::load(family, &raw, vb, &score_head::HeadSpec::steps(steps));
            }
            // A causal LM is a process reward model when config.json says which tokens it
            // predicts after each step (Math-Shepherd, OpenRLHF), else a value-head model.
            match value_head::family(other) {
                Some(family) => match StepSpec::from_config(&raw, tokenizer)? {
                    Some(steps) => {
                        decoder::load(family, &raw, vb, &score_head::HeadSpec::steps(steps))
                    }
                    None => value_head::load(other, family, &raw, vb),
                },
                None => Err(ModelError::Unsupported(other.to_string())),
            }
        }
    }
}

/// OpenAssistant's `pooling`: "last" (its default, and its released models') is served;
/// its "mean" averages every token's hidden state, which warm does not compute.
fn refuse_mean_pooling(raw: &serde_json::Value) -> Result<(), ModelError> {
    match raw.get("pooling").and_then(serde_json::Value::as_str) {
        None | Some("last") => Ok(()),
        Some(other) => Err(ModelError::Config(format!(
            "pooling '{other}' is not supported: warm reads the last token (pooling 'last')"
        ))),
    }
}

/// The ids of `text` alone, no special tokens added: what a head that finds its place by
/// token ids looks for.
fn plain_ids(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Reads a typed config section from config.json.
fn parse_config<T: serde::de::DeserializeOwned>(raw: &serde_json::Value) -> Result<T, ModelError> {
    serde_json::from_value(raw.clone()).map_err(|e| ModelError::Config(e.to_string()))
}

fn load_err(e: candle_core::Error) -> ModelError {
    ModelError::Load(e.to_string())
}

/// [batch, n] logits (or other per-input values) to rows of f32.
fn logits_to_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
