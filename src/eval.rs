//! `warm eval`: pairwise accuracy of each member, of the weight average (WARM) and of the
//! ensemble of predictions (ENS) on preference pairs `{"prompt", "chosen", "rejected"}`
//! (the shape of RewardBench and TRL preference sets), through the same loading, formatting
//! and forward code as `warm serve`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use serde_json::Value;

use crate::config::MembersConfig;
use crate::dtype::FloatDType;
use crate::engine::{plan_batches, BatchLimits, Item};
use crate::model::Sequence;
use crate::reward_stats::RewardStats;
use crate::scorer::{weighted_mean_std, Combine, LoadError, Scorer};
use crate::text::{Input, Message};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Pair {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0}: no preference pairs")]
    Empty(PathBuf),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    RewardLabel(#[from] crate::scorer::RewardLabelError),
    #[error("pair {index}: {reason}")]
    Score { index: usize, reason: String },
    #[error("{0}")]
    Stats(String),
}

/// One preference pair as two inputs to score.
pub struct Pair {
    pub chosen: Input,
    pub rejected: Input,
}

/// One model's results on the pairs.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEval {
    pub name: String,
    pub accuracy: f64,
    /// Pairs where the chosen response scored strictly higher.
    pub correct: usize,
    /// The mean and sample standard deviation of every chosen and rejected reward: what
    /// OpenRLHF's train_rm records as config.json's `mean` and `std`.
    pub reward_mean: Option<f32>,
    pub reward_std: Option<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub pairs: usize,
    pub members: Vec<ModelEval>,
    pub warm: ModelEval,
    pub ens: ModelEval,
}

/// Reads JSON lines of `{"prompt", "chosen", "rejected"}`: strings (a prompt/response
/// pair each), or message lists (TRL's conversational form: the prompt's messages followed
/// by the chosen or rejected ones).
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |reason: String| EvalError::Pair {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let side = |key: &str| -> Result<Input, EvalError> {
            match (&v["prompt"], &v[key]) {
                (Value::String(p), Value::String(r)) => Ok(Input::Pair {
                    prompt: p.clone(),
                    response: r.clone(),
                }),
                (prompt, Value::Array(_)) => {
                    let mut messages: Vec<Message> = match prompt {
                        Value::Array(_) => serde_json::from_value(prompt.clone())
                            .map_err(|e| bad(format!("'prompt' messages: {e}")))?,
                        Value::String(p) => vec![Message {
                            role: "user".into(),
                            content: p.clone(),
                        }],
                        _ => Vec::new(),
                    };
                    let reply: Vec<Message> = serde_json::from_value(v[key].clone())
                        .map_err(|e| bad(format!("'{key}' messages: {e}")))?;
                    messages.extend(reply);
                    Ok(Input::Messages(messages))
                }
                _ => Err(bad(format!(
                    "needs string (or message list) fields 'prompt' and '{key}'"
                ))),
            }
        };
        pairs.push(Pair {
            chosen: side("chosen")?,
            rejected: side("rejected")?,
        });
    }
    if pairs.is_empty() {
        return Err(EvalError::Empty(path.to_path_buf()));
    }
    Ok(pairs)
}

/// Scores every input with one loaded model: truncated to the model's limit as
/// `--auto-truncate` does, in length-sorted batches of `batch_tokens` padded tokens.
fn score_all(
    scorer: &Scorer,
    inputs: &[&Input],
    batch_tokens: usize,
) -> Result<Vec<f64>, EvalError> {
    let sequences: Vec<Sequence> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            scorer
                .encode(input, true, None, true)
                .map_err(|e| EvalError::Score {
                    index: i / 2,
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let items: Vec<Item> = sequences
        .iter()
        .enumerate()
        .map(|(index, s)| Item {
            job: 0,
            index,
            ids: &s.ids,
        })
        .collect();
    let limits = BatchLimits {
        max_batch_tokens: batch_tokens,
        max_batch_requests: 256,
        layout: scorer.batch_layout(),
    };
    let mut scores = vec![f64::NAN; sequences.len()];
    for batch in plan_batches(&items, &limits) {
        let refs: Vec<&Sequence> = batch.iter().map(|&(_, i, _)| &sequences[i]).collect();
        let out = scorer.score(&refs).map_err(|e| EvalError::Score {
            index: batch[0].1 / 2,
            reason: e.to_string(),
        })?;
        for (&(_, i, _), s) in batch.iter().zip(out) {
            scores[i] = f64::from(s.value);
        }
    }
    Ok(scores)
}

fn model_eval(name: String, chosen_rejected: &[f64]) -> ModelEval {
    let pairs = chosen_rejected.len() / 2;
    let correct = chosen_rejected
        .chunks_exact(2)
        .filter(|c| c[0] > c[1])
        .count();
    let stats = RewardStats::measure(chosen_rejected);
    ModelEval {
        name,
        accuracy: correct as f64 / pairs.max(1) as f64,
        correct,
        reward_mean: stats.map(|s| s.mean),
        reward_std: stats.map(|s| s.std),
    }
}

/// The checkpoint `--write-reward-stats` writes into: the one evaluated.
pub fn reward_stats_target(members: &MembersConfig) -> Result<&Path, EvalError> {
    match members.dirs.as_slice() {
        [dir] => Ok(dir),
        dirs => Err(EvalError::Stats(format!(
            "--write-reward-stats writes into one checkpoint's config.json, and {} models \
             were given: fuse them with `warm fuse` and evaluate the output",
            dirs.len()
        ))),
    }
}

/// Records the reward statistics of `report`'s weight-averaged model in the config.json of
/// the one checkpoint evaluated (a `warm fuse` output, or one model), for
/// `--normalize-reward` and OpenRLHF's `--normalize_reward`.
pub fn record_reward_stats(
    members: &MembersConfig,
    report: &EvalReport,
) -> Result<RewardStats, EvalError> {
    let dir = reward_stats_target(members)?;
    let (Some(mean), Some(std)) = (report.warm.reward_mean, report.warm.reward_std) else {
        return Err(EvalError::Stats(
            "--write-reward-stats needs at least one preference pair".into(),
        ));
    };
    let stats = RewardStats { mean, std };
    stats
        .write(dir)
        .map_err(|e| EvalError::Stats(e.to_string()))?;
    Ok(stats)
}

/// Scores the pairs with each member alone, with the fused model (WARM), and with the
/// weighted mean of the members' scores (ENS, what `--combine predictions` serves).
pub fn evaluate(
    members: &MembersConfig,
    pairs: &[Pair],
    dtype: FloatDType,
    batch_tokens: usize,
    reward_label: Option<&str>,
) -> Result<EvalReport, EvalError> {
    let load = |members: &MembersConfig| -> Result<Scorer, EvalError> {
        let mut scorer = Scorer::load(members, Combine::Weights, dtype, &Device::Cpu, None)?;
        if let Some(label) = reward_label {
            scorer.reward_from_label(label)?;
        }
        Ok(scorer)
    };
    let inputs: Vec<&Input> = pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect();
    let mut member_scores = Vec::with_capacity(members.dirs.len());
    let mut member_acc = Vec::with_capacity(members.dirs.len());
    for dir in &members.dirs {
        let single = MembersConfig::single(dir);
        let scorer = load(&single)?;
        let scores = score_all(&scorer, &inputs, batch_tokens)?;
        member_acc.push(model_eval(dir.display().to_string(), &scores));
        member_scores.push(scores);
    }
    let fused = load(members)?;
    let warm = model_eval(
        "WARM (weight average)".into(),
        &score_all(&fused, &inputs, batch_tokens)?,
    );
    let weights = crate::fuse::normalize_weights(members.weights.as_deref(), members.dirs.len())
        .map_err(|e| {
            LoadError::Fuse(crate::fuse::FuseError::Incompatible(vec![
                crate::fuse::Problem::Weights(e),
            ]))
        })?;
    let ens_scores: Vec<f64> = (0..inputs.len())
        .map(|i| {
            let s: Vec<f64> = member_scores.iter().map(|m| m[i]).collect();
            weighted_mean_std(&s, &weights).0
        })
        .collect();
    Ok(EvalReport {
        pairs: pairs.len(),
        members: member_acc,
        warm,
        ens: model_eval("ENS (mean of predictions)".into(), &ens_scores),
    })
}
