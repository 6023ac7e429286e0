//! A loaded WARM set ready to score: the text encoder, and either one fused model (WARM,
//! `--combine weights`) or every member kept apart (ENS, `--combine predictions`: the
//! score is the weighted mean of the members' scores and `uncertainty` their weighted
//! standard deviation).

use candle_core::{DType, Device};

use crate::checkpoint::ModelConfig;
use crate::config::MembersConfig;
use crate::dtype::FloatDType;
use crate::fuse::{self, FuseError, FusionReport};
use crate::model::{self, ModelError, Pooling, RewardModel, Sequence, Work};
use crate::reward_stats::{RewardStats, StatsError};
use crate::text::{self, Direction, EncodeOptions, Input, TextEncoder, TextError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Combine {
    /// Average the weights into one model (WARM).
    #[default]
    Weights,
    /// Keep the members and average their predictions (ENS).
    Predictions,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error("{dir}: {source}")]
    Model {
        dir: String,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// Why `--reward-label` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum RewardLabelError {
    #[error("--reward-label '{given}' names no label of the model: its labels are {labels} (a name from config.json's id2label, or an index)")]
    Unknown { given: String, labels: String },
    #[error("--reward-label: a process reward model's reward is its weakest step's, not a label's logit")]
    Steps,
}

/// One input's score: the reward (the first logit, or `--reward-label`'s), with ENS the
/// spread of the members' rewards, and every label's logit (the members' weighted mean with ENS). A process
/// reward model's reward is its weakest step's, and `steps` holds every step's; ArmoRM's
/// `objectives` its objectives' rewards (both the members' weighted mean with ENS).
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub value: f32,
    pub uncertainty: Option<f32>,
    pub logits: Vec<f32>,
    pub steps: Option<Vec<f32>>,
    pub objectives: Option<Vec<f32>>,
}

pub struct Scorer {
    encoder: TextEncoder,
    labels: Vec<String>,
    problem_type: Option<String>,
    models: Vec<Box<dyn RewardModel>>,
    /// Normalized member weights (ENS); a single 1.0 for WARM.
    weights: Vec<f32>,
    max_length: usize,
    /// config.json's `vocab_size` (the embedding's rows, checked at load), when given.
    embedding_rows: Option<usize>,
    pooling: Pooling,
    report: FusionReport,
    /// Per model, the statistics its logits are standardized with (`--normalize-reward`).
    stats: Option<Vec<RewardStats>>,
    /// Which logit is the reward: the first unless `--reward-label` names another.
    reward_index: usize,
}

impl Scorer {
    /// Loads the members as one fused model or as an ensemble.
    pub fn load(
        members: &MembersConfig,
        combine: Combine,
        dtype: FloatDType,
        device: &Device,
        max_input_length: Option<usize>,
    ) -> Result<Self, LoadError> {
        // Fusion (or the ensemble's check) first: it validates every member and names
        // what is wrong; the config and tokenizer are read from the first member after.
        let (tensor_sets, weights, report) = match combine {
            Combine::Weights => {
                let (tensors, report) = fuse::fuse_to_tensors(members, dtype, device)?;
                (vec![tensors], vec![1.0], report)
            }
            Combine::Predictions => {
                let report = fuse::inspect(members)?.into_result()?;
                let mut sets = Vec::with_capacity(members.dirs.len());
                for dir in &members.dirs {
                    let single = MembersConfig::single(dir);
                    sets.push(fuse::fuse_to_tensors(&single, dtype, device)?.0);
                }
                let weights =
                    fuse::normalize_weights(members.weights.as_deref(), members.dirs.len())
                        .map_err(|e| FuseError::Incompatible(vec![fuse::Problem::Weights(e)]))?;
                (sets, weights, report)
            }
        };
        let first = members.dirs.first().ok_or(FuseError::NoMembers)?;
        let config = ModelConfig::read(&first.join(crate::checkpoint::CONFIG_FILE))?;
        let mut encoder = text::load_text_encoder(first)?;
        let model_error = |source| LoadError::Model {
            dir: first.display().to_string(),
            source,
        };
        // Read from config.json alone: checked before the weights become a model.
        if let Some(id) = model::reward_token(&config).map_err(model_error)? {
            encoder.append_token(id);
        }
        let candle_dtype = match dtype {
            FloatDType::F32 => DType::F32,
            FloatDType::F16 => DType::F16,
            FloatDType::BF16 => DType::BF16,
        };
        let models = tensor_sets
            .into_iter()
            .map(|tensors| {
                model::load(&config, tensors, candle_dtype, device, encoder.tokenizer())
                    .map_err(model_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(model::StepMarker::Separator { text, ids, layout }) =
            models[0].step_spec().map(|spec| &spec.marker)
        {
            let suffix = layout.prompt_suffix();
            encoder.separate_steps(text, ids, suffix, layout.needs_bos())?;
        }
        let model_max = models[0].max_input_length();
        let labels = label_names(&config, models[0].num_labels());
        let problem_type = config
            .raw()
            .get("problem_type")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        Ok(Self {
            encoder,
            labels,
            problem_type,
            pooling: models[0].pooling(),
            max_length: max_input_length.map_or(model_max, |m| m.min(model_max)),
            embedding_rows: config
                .raw()
                .get("vocab_size")
                .and_then(serde_json::Value::as_u64)
                .and_then(|rows| usize::try_from(rows).ok()),
            models,
            weights,
            report,
            stats: None,
            reward_index: 0,
        })
    }

    /// Makes the logit of `label` (a name from config.json's `id2label`, or an index) the
    /// reward, as RL loops over classifiers read one (TRL's sentiment example reads
    /// POSITIVE, the second).
    pub fn reward_from_label(&mut self, label: &str) -> Result<(), RewardLabelError> {
        if self.step_spec().is_some() {
            return Err(RewardLabelError::Steps);
        }
        let by_name = self.labels.iter().position(|name| name == label);
        let by_index = label
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&i| i < self.labels.len());
        self.reward_index = by_name
            .or(by_index)
            .ok_or_else(|| RewardLabelError::Unknown {
                given: label.to_string(),
                labels: self
                    .labels
                    .iter()
                    .enumerate()
                    .map(|(i, name)| format!("{i} {name}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(())
    }

    /// The reward's label: its index and name.
    pub fn reward_label(&self) -> (usize, &str) {
        (
            self.reward_index,
            self.labels
                .get(self.reward_index)
                .map_or("", String::as_str),
        )
    }

    /// Standardizes every logit with the reward statistics in the members' config.json,
    /// as OpenRLHF's `--normalize_reward` does: the fused model's (which every member must
    /// share), or with ENS each member's own, before the members are combined.
    pub fn normalize_rewards(&mut self, members: &MembersConfig) -> Result<(), StatsError> {
        if self.step_spec().is_some() {
            return Err(StatsError::Probabilities);
        }
        let stats = if self.models.len() == 1 {
            vec![RewardStats::of_fused(&members.dirs)?]
        } else {
            members
                .dirs
                .iter()
                .map(|dir| RewardStats::of(dir))
                .collect::<Result<Vec<_>, _>>()?
        };
        self.stats = Some(stats);
        Ok(())
    }

    /// The statistics rewards are standardized with, per model (None: raw rewards).
    pub fn reward_stats(&self) -> Option<&[RewardStats]> {
        self.stats.as_deref()
    }

    /// Model `index`'s logits, standardized when `--normalize-reward` asks.
    fn standardized(&self, index: usize, mut logits: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        if let Some(stats) = self.stats.as_ref().and_then(|all| all.get(index)) {
            for value in logits.iter_mut().flatten() {
                *value = stats.standardize(*value);
            }
        }
        logits
    }

    /// Input `input`'s step (or objective) rewards, the members' weighted mean one by one
    /// (the members share the tokenizer and structure, so they read the same steps).
    fn member_mean(&self, per_member: &[Option<Vec<Vec<f32>>>], input: usize) -> Option<Vec<f32>> {
        let of_input: Vec<&Vec<f32>> = per_member
            .iter()
            .map(|steps| steps.as_ref().and_then(|s| s.get(input)))
            .collect::<Option<_>>()?;
        let count = of_input.first()?.len();
        Some(
            (0..count)
                .map(|step| {
                    let values: Vec<f64> = of_input
                        .iter()
                        .map(|s| s.get(step).map_or(f64::NAN, |&v| f64::from(v)))
                        .collect();
                    weighted_mean_std(&values, &self.weights).0 as f32
                })
                .collect(),
        )
    }

    /// One checkpoint folder as a plain single reward model, f32 on the CPU.
    pub fn load_one(dir: &std::path::Path) -> Result<Self, LoadError> {
        Self::load(
            &MembersConfig::single(dir),
            Combine::Weights,
            FloatDType::F32,
            &Device::Cpu,
            None,
        )
    }

    pub fn report(&self) -> &FusionReport {
        &self.report
    }

    pub fn max_input_length(&self) -> usize {
        self.max_length
    }

    pub fn num_labels(&self) -> usize {
        self.models[0].num_labels()
    }

    /// Label names from config.json's `id2label` (`LABEL_i` where missing).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// config.json's `problem_type` (`regression`, `single_label_classification`, ...).
    pub fn problem_type(&self) -> Option<&str> {
        self.problem_type.as_deref()
    }

    pub fn has_chat_template(&self) -> bool {
        self.encoder.has_chat_template()
    }

    /// The token put after every input (InternLM2's reward token) and its text.
    pub fn appended_token(&self) -> Option<(u32, String)> {
        let id = self.encoder.appended_token()?;
        let text = self.encoder.tokenizer().id_to_token(id).unwrap_or_default();
        Some((id, text))
    }

    /// The step tag and classes, when the model is a process reward model (its scores are
    /// then probabilities, its weakest step's).
    pub fn step_spec(&self) -> Option<&crate::model::StepSpec> {
        self.models[0].step_spec()
    }

    /// The default truncation side: keep the end of the response for decoders, the start
    /// for encoders.
    pub fn default_direction(&self) -> Direction {
        match self.pooling {
            Pooling::Last => Direction::Left,
            Pooling::First => Direction::Right,
        }
    }

    /// Encodes one input under the server's limit.
    pub fn encode(
        &self,
        input: &Input,
        truncate: bool,
        direction: Option<Direction>,
        add_special_tokens: bool,
    ) -> Result<Sequence, TextError> {
        self.encode_limited(
            input,
            self.max_length,
            truncate,
            direction,
            add_special_tokens,
        )
    }

    /// Encodes under a request's own limit (vLLM's `truncate_prompt_tokens`), capped at
    /// the server's: truncated when `truncate`, refused when too long otherwise.
    pub fn encode_limited(
        &self,
        input: &Input,
        max_length: usize,
        truncate: bool,
        direction: Option<Direction>,
        add_special_tokens: bool,
    ) -> Result<Sequence, TextError> {
        let options = EncodeOptions {
            max_length: max_length.min(self.max_length),
            truncate,
            direction: direction.unwrap_or(self.default_direction()),
            add_special_tokens,
        };
        let encoded = self.encoder.encode(input, &options)?;
        if let Some(rows) = self.embedding_rows {
            if let Some(&id) = encoded.ids.iter().find(|&&id| id as usize >= rows) {
                return Err(match input {
                    Input::Ids(_) => TextError::IdBeyondVocabulary { id, rows },
                    _ => TextError::BeyondEmbedding { id, rows },
                });
            }
        }
        if let Some(rows) = self.models[0].token_type_rows() {
            if let Some(&id) = encoded.type_ids.iter().find(|&&id| id as usize >= rows) {
                return Err(TextError::TypeBeyondEmbedding { id, rows });
            }
        }
        if let Some(problem) = self.models[0].input_error(&encoded.ids) {
            return Err(TextError::Unscorable(problem));
        }
        Ok(Sequence {
            ids: encoded.ids,
            type_ids: encoded.type_ids,
            read_at: encoded.read_at,
        })
    }

    /// Inputs of one batch that begin with at least `tokens` equal tokens compute them
    /// once, where the model can (0: never).
    pub fn share_prefixes_from(&mut self, tokens: usize) {
        for model in &mut self.models {
            model.share_prefixes_from(tokens);
        }
    }

    /// How the model lays out a batch (the members are alike).
    pub fn batch_layout(&self) -> crate::model::BatchLayout {
        self.models[0].batch_layout()
    }

    /// The reward (the first logit, or `--reward-label`'s) of each sequence, combined
    /// across members with ENS.
    pub fn score(&self, sequences: &[&Sequence]) -> Result<Vec<Score>, ModelError> {
        Ok(self.score_batch(sequences)?.0)
    }

    /// `score`, with what the forward pass computed (per member with ENS).
    pub fn score_batch(&self, sequences: &[&Sequence]) -> Result<(Vec<Score>, Work), ModelError> {
        if self.models.len() == 1 {
            let forward = self.models[0].logits(sequences)?;
            let mut steps = forward.steps.map(Vec::into_iter);
            let mut objectives = forward.objectives.map(Vec::into_iter);
            let scores = self
                .standardized(0, forward.logits)
                .into_iter()
                .map(|logits| Score {
                    value: logits.get(self.reward_index).copied().unwrap_or(f32::NAN),
                    uncertainty: None,
                    logits,
                    steps: steps.as_mut().and_then(Iterator::next),
                    objectives: objectives.as_mut().and_then(Iterator::next),
                })
                .collect();
            return Ok((scores, forward.work));
        }
        let forwards = self
            .models
            .iter()
            .map(|m| m.logits(sequences))
            .collect::<Result<Vec<_>, _>>()?;
        let work = forwards[0].work;
        let mut per_member = Vec::with_capacity(forwards.len());
        let mut member_steps = Vec::with_capacity(forwards.len());
        let mut member_objectives = Vec::with_capacity(forwards.len());
        for (i, forward) in forwards.into_iter().enumerate() {
            per_member.push(self.standardized(i, forward.logits));
            member_steps.push(forward.steps);
            member_objectives.push(forward.objectives);
        }
        let scores = (0..sequences.len())
            .map(|i| {
                let labels = per_member[0][i].len();
                let logits: Vec<f32> = (0..labels)
                    .map(|l| {
                        let values: Vec<f64> = per_member
                            .iter()
                            .map(|rows| f64::from(rows[i][l]))
                            .collect();
                        weighted_mean_std(&values, &self.weights).0 as f32
                    })
                    .collect();
                let rewards: Vec<f64> = per_member
                    .iter()
                    .map(|rows| {
                        f64::from(rows[i].get(self.reward_index).copied().unwrap_or(f32::NAN))
                    })
                    .collect();
                let (mean, std) = weighted_mean_std(&rewards, &self.weights);
                Score {
                    value: mean as f32,
                    uncertainty: Some(std as f32),
                    logits,
                    steps: self.member_mean(&member_steps, i),
                    objectives: self.member_mean(&member_objectives, i),
                }
            })
            .collect();
        Ok((scores, work))
    }
}

fn label_names(config: &ModelConfig, num_labels: usize) -> Vec<String> {
    let map = config
        .raw()
        .get("id2label")
        .and_then(serde_json::Value::as_object);
    (0..num_labels)
        .map(|i| {
            map.and_then(|m| m.get(&i.to_string()))
                .and_then(serde_json::Value::as_str)
                .map_or_else(|| format!("LABEL_{i}"), str::to_string)
        })
        .collect()
}

/// sum_i w_i s_i and sqrt(sum_i w_i (s_i - mean)^2) with weights summing to one.
pub fn weighted_mean_std(scores: &[f64], weights: &[f32]) -> (f64, f64) {
    let mean: f64 = scores
        .iter()
        .zip(weights)
        .map(|(s, &w)| s * f64::from(w))
        .sum();
    let var: f64 = scores
        .iter()
        .zip(weights)
        .map(|(s, &w)| f64::from(w) * (s - mean).powi(2))
        .sum();
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the BERT fixture whose tokenizer.json `edit` changed.
    fn bert_with_tokenizer(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert");
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        let tokenizer_path = dir.path().join("tokenizer.json");
        let mut tokenizer: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&tokenizer_path).unwrap()).unwrap();
        edit(&mut tokenizer);
        std::fs::write(&tokenizer_path, tokenizer.to_string()).unwrap();
        dir
    }

    /// A tokenizer that can give an id past the embedding (an added token beyond config.json's
    /// vocab_size) is refused per input, before any tensor is built.
    #[test]
    fn token_ids_beyond_the_embedding_are_refused() {
        let rows = 541;
        let dir = bert_with_tokenizer(|tokenizer| {
            tokenizer["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                "id": rows, "content": "[BEYOND]", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
                }));
        });
        let scorer = Scorer::load_one(dir.path()).unwrap();
        let encode = |text: &str| scorer.encode(&Input::Text(text.into()), false, None, true);
        assert!(encode("hello world").is_ok());
        match encode("hello [BEYOND] world") {
            Err(TextError::BeyondEmbedding { id, rows: r }) => {
                assert_eq!((id as usize, r), (rows, rows))
            }
            other => panic!("expected BeyondEmbedding, got {other:?}"),
        }
    }

    /// A pair template giving the second text a type the model has no row for (type 2 of
    /// type_vocab_size 2) fails pair inputs alone, per input; plain text still scores.
    #[test]
    fn token_type_ids_beyond_the_embedding_are_refused() {
        let dir = bert_with_tokenizer(|tokenizer| {
            for piece in tokenizer["post_processor"]["pair"].as_array_mut().unwrap() {
                if let Some(sequence) = piece.get_mut("Sequence") {
                    if sequence["id"] == "B" {
                        sequence["type_id"] = serde_json::json!(2);
                    }
                }
            }
        });
        let scorer = Scorer::load_one(dir.path()).unwrap();
        let text = Input::Text("hello world".into());
        assert!(scorer.encode(&text, false, None, true).is_ok());
        let pair = Input::Pair {
            prompt: "hello".into(),
            response: "world".into(),
        };
        match scorer.encode(&pair, false, None, true) {
            Err(TextError::TypeBeyondEmbedding { id, rows }) => assert_eq!((id, rows), (2, 2)),
            other => panic!("expected TypeBeyondEmbedding, got {other:?}"),
        }
    }

    #[test]
    fn uniform_weights_give_the_population_standard_deviation() {
        let (m, s) = weighted_mean_std(&[1.0, 2.0, 3.0, 4.0], &[0.25; 4]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - 1.25f64.sqrt()).abs() < 1e-12);
        let (m, s) = weighted_mean_std(&[1.0, 3.0], &[0.75, 0.25]);
        assert!((m - 1.5).abs() < 1e-12);
        assert!((s - 0.75f64.sqrt()).abs() < 1e-12);
    }
}
