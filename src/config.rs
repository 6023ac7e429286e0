//! Typed configuration of each command, built by the CLI (flags and environment) and
//! passed whole to the library.

use std::path::PathBuf;

use crate::dtype::FloatDType;

/// `warm fuse`.
#[derive(Debug, Clone)]
pub struct FuseConfig {
    pub members: MembersConfig,
    pub output: PathBuf,
    /// Output dtype of the float tensors; None keeps the stored one.
    pub dtype: Option<FloatDType>,
    pub max_shard_size: u64,
    /// Where the averaging runs (the output is written from the host either way).
    pub device: DeviceChoice,
}

/// The WARM set: member folders, their weights and how strict the shared-init check is.
#[derive(Debug, Clone)]
pub struct MembersConfig {
    pub dirs: Vec<PathBuf>,
    /// Raw `--weights` (normalized later); None is uniform.
    pub weights: Option<Vec<f64>>,
    pub allow_unrelated_members: bool,
}

impl MembersConfig {
    /// One checkpoint on its own (nothing to compare it with, so no shared-init check).
    pub fn single(dir: &std::path::Path) -> Self {
        Self {
            dirs: vec![dir.to_path_buf()],
            weights: None,
            allow_unrelated_members: true,
        }
    }
}

/// Parses a size: plain bytes or a number with a unit. KB/MB/GB/TB are powers of 1000,
/// KiB/MiB/GiB/TiB powers of 1024 (`5GB`, `512MiB`, `65536`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size '{text}': expected e.g. 65536, 8MB or 5GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("invalid size '{text}': unknown unit '{other}'")),
    };
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size '{text}': out of range"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("8MB"), Ok(8_000_000));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1.5 GiB"), Ok(1_610_612_736));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
    }
}

/// `warm serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub members: MembersConfig,
    pub combine: crate::scorer::Combine,
    pub device: DeviceChoice,
    /// None: f32 on the CPU, the checkpoint's half type on CUDA.
    pub dtype: Option<FloatDType>,
    pub host: String,
    pub port: u16,
    pub served_model_name: Option<String>,
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_client_batch_size: usize,
    pub max_concurrent_requests: usize,
    pub max_input_length: Option<usize>,
    pub auto_truncate: bool,
    /// Standardize rewards with config.json's `mean` and `std` (OpenRLHF's
    /// `--normalize_reward`).
    pub normalize_reward: bool,
    /// The label whose logit is the reward (None: the first).
    pub reward_label: Option<String>,
    /// Inputs of one batch sharing at least this many first tokens compute them once
    /// (decoder models; 0: never).
    pub min_shared_prefix: usize,
    pub tokenization_workers: usize,
    pub payload_limit: usize,
    pub api_key: Option<String>,
    pub request_timeout: std::time::Duration,
    /// How long a client may take to send a request's headers, and then its body.
    pub read_timeout: std::time::Duration,
    pub cors_allow_origins: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl std::str::FromStr for crate::scorer::Combine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "weights" => Ok(Self::Weights),
            "predictions" => Ok(Self::Predictions),
            other => Err(format!(
                "unknown combine mode '{other}': expected weights or predictions"
            )),
        }
    }
}
