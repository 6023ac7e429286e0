//! OpenRLHF's `--normalize_reward`: rewards standardized with the `mean` and `std` that
//! `train_rm` writes into config.json (the statistics of its eval set's rewards), as
//! `(reward - mean) / std` in f32, the way OpenRLHF's RewardModel applies its buffers.

use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointError, ModelConfig, CONFIG_FILE};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Config(#[from] CheckpointError),
    #[error("--normalize-reward: {0}: config.json has no reward statistics ('mean' and 'std', which OpenRLHF's train_rm writes; `warm fuse` leaves them out when the members' differ)")]
    Missing(PathBuf),
    #[error("--normalize-reward: {path}: config.json's '{key}' is {value}: it must be a finite number{rule}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("--normalize-reward: a process reward model's scores are probabilities (its weakest step's), which OpenRLHF's statistics do not standardize")]
    Probabilities,
    #[error("--normalize-reward: the members' reward statistics differ ({first}: mean {first_stats}; {other}: mean {other_stats}), and those of their average are unknown: serve with --combine predictions (each member standardized by its own), or set the averaged model's in a `warm fuse` output's config.json")]
    Differ {
        first: PathBuf,
        first_stats: RewardStats,
        other: PathBuf,
        other_stats: RewardStats,
    },
}

/// A reward model's reward statistics, from its config.json.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardStats {
    pub mean: f32,
    pub std: f32,
}

impl std::fmt::Display for RewardStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, std {}", self.mean, self.std)
    }
}

impl RewardStats {
    /// The statistics in `dir`/config.json; both keys are required (OpenRLHF reads `std`
    /// whenever `mean` is there).
    pub fn of(dir: &Path) -> Result<Self, StatsError> {
        let config = ModelConfig::read(&dir.join(CONFIG_FILE))?;
        let raw = config.raw();
        if raw.get("mean").is_none() && raw.get("std").is_none() {
            return Err(StatsError::Missing(dir.to_path_buf()));
        }
        let number = |key: &'static str, rule: &'static str| {
            let value = raw.get(key);
            match value.and_then(serde_json::Value::as_f64) {
                Some(v) if v.is_finite() => Ok(v as f32),
                _ => Err(StatsError::Invalid {
                    path: dir.to_path_buf(),
                    key,
                    value: value.map_or_else(|| "absent".into(), ToString::to_string),
                    rule,
                }),
            }
        };
        let stats = Self {
            mean: number("mean", "")?,
            std: number("std", " above 0")?,
        };
        if stats.std > 0.0 {
            Ok(stats)
        } else {
            Err(StatsError::Invalid {
                path: dir.to_path_buf(),
                key: "std",
                value: stats.std.to_string(),
                rule: " above 0",
            })
        }
    }

    /// The statistics of one fused model: every member's, which must agree.
    pub fn of_fused(dirs: &[PathBuf]) -> Result<Self, StatsError> {
        let mut all = dirs.iter().map(|dir| Self::of(dir).map(|s| (dir, s)));
        let Some(first) = all.next() else {
            return Err(StatsError::Missing(PathBuf::new()));
        };
        let (first_dir, first_stats) = first?;
        for next in all {
            let (dir, stats) = next?;
            if stats != first_stats {
                return Err(StatsError::Differ {
                    first: first_dir.clone(),
                    first_stats,
                    other: dir.clone(),
                    other_stats: stats,
                });
            }
        }
        Ok(first_stats)
    }

    pub fn standardize(&self, value: f32) -> f32 {
        (value - self.mean) / self.std
    }

    /// The statistics OpenRLHF's train_rm records after each evaluation: the mean and the
    /// sample standard deviation (n - 1) of every chosen and rejected reward, the standard
    /// deviation at least 1e-8, rounded to f32 as its tensors hold them. None for fewer
    /// than two rewards.
    pub fn measure(rewards: &[f64]) -> Option<Self> {
        let n = rewards.len();
        if n < 2 {
            return None;
        }
        let mean = rewards.iter().sum::<f64>() / n as f64;
        let variance = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        Some(Self {
            mean: mean as f32,
            std: (variance.sqrt() as f32).max(1e-8),
        })
    }

    /// Writes the statistics into `dir`/config.json as `mean` and `std` (where OpenRLHF
    /// reads them), keeping every other key; the file is replaced whole.
    pub fn write(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join(CONFIG_FILE);
        let mut raw = ModelConfig::read(&path)?.raw().clone();
        raw.insert("mean".into(), f64::from(self.mean).into());
        raw.insert("std".into(), f64::from(self.std).into());
        let mut text = serde_json::to_string_pretty(&raw).map_err(|e| {
            CheckpointError::invalid(&path, format!("cannot write config.json: {e}"))
        })?;
        text.push('\n');
        let staged = dir.join(".config.json.warm-tmp");
        std::fs::write(&staged, text).map_err(|e| CheckpointError::io(&staged, e))?;
        std::fs::rename(&staged, &path).map_err(|e| CheckpointError::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(root: &Path, name: &str, config: serde_json::Value) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn statistics_are_read_checked_and_applied_in_f32() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let a = member(root, "a", serde_json::json!({"mean": 0.25, "std": 1.75}));
        let stats = RewardStats::of(&a).unwrap();
        assert_eq!(stats.standardize(2.0), (2.0f32 - 0.25) / 1.75);

        let none = member(root, "none", serde_json::json!({"hidden_size": 8}));
        let message = RewardStats::of(&none).unwrap_err().to_string();
        assert!(message.contains("no reward statistics"), "{message}");

        for (name, config, key) in [
            (
                "no-std",
                serde_json::json!({"mean": 0.5}),
                "'std' is absent",
            ),
            (
                "zero",
                serde_json::json!({"mean": 0.5, "std": 0}),
                "'std' is 0",
            ),
            (
                "text",
                serde_json::json!({"mean": "x", "std": 1}),
                "'mean' is \"x\"",
            ),
        ] {
            let dir = member(root, name, config);
            let message = RewardStats::of(&dir).unwrap_err().to_string();
            assert!(message.contains(key), "{message}");
        }
    }

    #[test]
    fn measured_as_openrlhf_and_written_where_it_reads_them() {
        // torch.std of [1, 2, 3, 6] is the sample deviation: sqrt(14 / 3).
        let stats = RewardStats::measure(&[1.0, 2.0, 3.0, 6.0]).unwrap();
        assert_eq!(stats.mean, 3.0);
        assert_eq!(stats.std, (14.0f64 / 3.0).sqrt() as f32);
        assert_eq!(RewardStats::measure(&[2.0, 2.0]).unwrap().std, 1e-8);
        assert!(RewardStats::measure(&[1.0]).is_none());

        let tmp = tempfile::tempdir().unwrap();
        let dir = member(
            tmp.path(),
            "m",
            serde_json::json!({"hidden_size": 8, "mean": 9}),
        );
        stats.write(&dir).unwrap();
        assert_eq!(RewardStats::of(&dir).unwrap(), stats);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["hidden_size"], 8);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no staged file left"
        );
    }

    #[test]
    fn fused_members_must_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let a = member(root, "a", serde_json::json!({"mean": 0.25, "std": 1.75}));
        let b = member(root, "b", serde_json::json!({"mean": 0.25, "std": 1.75}));
        let c = member(root, "c", serde_json::json!({"mean": 0.5, "std": 1.75}));
        let agreed = RewardStats::of_fused(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            agreed,
            RewardStats {
                mean: 0.25,
                std: 1.75
            }
        );
        let message = RewardStats::of_fused(&[a, b, c]).unwrap_err().to_string();
        assert!(
            message.contains("differ") && message.contains("mean 0.5, std 1.75"),
            "{message}"
        );
    }
}
