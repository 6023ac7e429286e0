//! WARM: averaging the weights of M reward models fine-tuned from one init.
//!
//! `plan` checks the members and lays out the work, `kernel` averages one tensor, `run`
//! streams all tensors through the kernel into a sink (candle tensors for serving, or the
//! safetensors `writer` for `warm fuse`).

#[cfg(feature = "cuda")]
mod device;
mod error;
mod gram;
mod interrupt;
pub mod kernel;
mod plan;
mod problem;
mod progress;
mod run;
mod sink;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use error::FuseError;
pub use interrupt::stop_on_signals;
pub use plan::{normalize_weights, plan, FusionPlan, PlannedTensor};
pub use problem::{describe, MemberRef, Problem};
pub use progress::FuseProgress;
pub use run::{execute, FusionReport, MemberReport, RunOptions, MIN_SHARED_INIT_COSINE};
pub use sink::{CandleSink, DiscardSink, FusedData, TensorSink};
pub use writer::SafetensorsWriter;

use crate::checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE};
use crate::config::{FuseConfig, MembersConfig};
use crate::dtype::FloatDType;

/// Opens every member folder, reporting all that fail, not just the first.
pub fn open_members(dirs: &[PathBuf]) -> Result<Vec<Checkpoint>, FuseError> {
    if dirs.is_empty() {
        return Err(FuseError::NoMembers);
    }
    let mut members = Vec::with_capacity(dirs.len());
    let mut problems = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        match Checkpoint::open(dir) {
            Ok(c) => members.push(c),
            Err(e) => problems.push(Problem::Unreadable {
                member: MemberRef {
                    index,
                    dir: dir.clone(),
                },
                reason: e.to_string(),
            }),
        }
    }
    if problems.is_empty() {
        Ok(members)
    } else {
        Err(FuseError::Incompatible(problems))
    }
}

fn run_options(members: &MembersConfig) -> RunOptions {
    RunOptions {
        min_cosine: (!members.allow_unrelated_members).then_some(MIN_SHARED_INIT_COSINE),
    }
}

/// `warm inspect`: one full pass that checks the members and measures how close they are.
/// The report lists every problem; it is fusable when the list is empty.
pub fn inspect(config: &MembersConfig) -> Result<FusionReport, FuseError> {
    let members = open_members(&config.dirs)?;
    let plan = plan(&members, config.weights.as_deref(), None);
    let total = plan_input_bytes(&members, &plan);
    execute(
        &members,
        &plan,
        &mut DiscardSink::default(),
        &mut FuseProgress::for_stderr(total),
        &run_options(config),
    )
}

/// Fuses the members into candle tensors of `dtype` on `device`, ready for
/// `VarBuilder::from_tensors`. Refuses with every problem found.
pub fn fuse_to_tensors(
    config: &MembersConfig,
    dtype: FloatDType,
    device: &candle_core::Device,
) -> Result<(HashMap<String, candle_core::Tensor>, FusionReport), FuseError> {
    let members = open_members(&config.dirs)?;
    let mut plan = checked_plan(&members, config, Some(dtype))?;
    drop_unread_lm_head(&mut plan, &members);
    let total = plan_input_bytes(&members, &plan);
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        let (tensors, report) = device::execute_on_device(
            &members,
            &plan,
            cuda,
            &mut FuseProgress::for_stderr(total),
            &run_options(config),
            device::DeviceOutput::Keep,
        )?;
        return Ok((tensors, report.into_result()?));
    }
    let mut sink = CandleSink::new(device.clone());
    let report = execute(
        &members,
        &plan,
        &mut sink,
        &mut FuseProgress::for_stderr(total),
        &run_options(config),
    )?
    .into_result()?;
    Ok((sink.into_tensors(), report))
}

/// `warm fuse`: writes the averaged model as a Hugging Face checkpoint.
pub fn fuse_to_directory(config: &FuseConfig) -> Result<FusionReport, FuseError> {
    let members = open_members(&config.members.dirs)?;
    refuse_member_as_output(&members, &config.output)?;
    let plan = checked_plan(&members, &config.members, config.dtype)?;
    let device = crate::device::select(config.device).map_err(FuseError::Device)?;
    let metadata = provenance(&members, &plan);
    let mut writer = SafetensorsWriter::create(
        &config.output,
        &plan.tensors,
        config.max_shard_size,
        members[0].value_head_tensors(),
        &metadata,
    )?;
    let total = plan_input_bytes(&members, &plan);
    let report = execute_on(
        &device,
        &members,
        &plan,
        &mut writer,
        &mut FuseProgress::for_stderr(total),
        &run_options(&config.members),
    )?
    .into_result()?;
    writer.finish()?;
    write_companion_files(&members, &config.output, config.dtype, &report)?;
    Ok(report)
}

/// The streaming pass on the CPU, or on a CUDA device with each fused tensor copied back
/// to `sink`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn execute_on(
    device: &candle_core::Device,
    members: &[Checkpoint],
    plan: &FusionPlan,
    sink: &mut dyn TensorSink,
    progress: &mut FuseProgress,
    options: &RunOptions,
) -> Result<FusionReport, FuseError> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        let output = device::DeviceOutput::Sink(sink);
        return Ok(device::execute_on_device(members, plan, cuda, progress, options, output)?.1);
    }
    execute(members, plan, sink, progress, options)
}

/// A plan, or every problem that stops fusion before any data is read.
fn checked_plan(
    members: &[Checkpoint],
    config: &MembersConfig,
    dtype: Option<FloatDType>,
) -> Result<FusionPlan, FuseError> {
    let plan = plan(members, config.weights.as_deref(), dtype);
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    if plan.problems.is_empty() {
        Ok(plan)
    } else {
        Err(FuseError::Incompatible(plan.problems))
    }
}

/// Causal LMs saved as reward models (LLaMA-Factory's) keep a language-model head that
/// scoring does not read: `lm_head.weight` (GPT-NeoX's `embed_out.weight`) is left out of
/// a fusion for serving, with its read and its average (about 7% of a 7-8B model's
/// weights), unless it is the only token table stored (tied weights saved under that
/// name) or the model reads it (a causal-LM process reward model; the members agree on
/// that, so the first one tells).
fn drop_unread_lm_head(plan: &mut FusionPlan, members: &[Checkpoint]) {
    /// An LM head's name and the input table's whose presence shows it is not tied.
    const HEADS: &[(&str, &str)] = &[
        ("lm_head.weight", "embed_tokens.weight"),
        ("embed_out.weight", "gpt_neox.embed_in.weight"),
        ("lm_head.weight", "transformer.wte.weight"),
    ];
    let reads_head = members
        .first()
        .is_some_and(|m| crate::model::reads_lm_head(m.config()));
    if reads_head {
        return;
    }
    for (head, table) in HEADS {
        if plan.tensors.iter().any(|t| t.name.ends_with(table)) {
            plan.tensors.retain(|t| t.name != *head);
        }
    }
}

fn plan_input_bytes(members: &[Checkpoint], plan: &FusionPlan) -> u64 {
    let per_member: u64 = plan
        .tensors
        .iter()
        .map(|t| (t.numel() * t.stored.size_in_bytes()) as u64)
        .sum();
    per_member * members.len() as u64
}

fn refuse_member_as_output(members: &[Checkpoint], output: &Path) -> Result<(), FuseError> {
    let Ok(out) = output.canonicalize() else {
        return Ok(());
    };
    for m in members {
        if m.dir().canonicalize().ok().as_deref() == Some(out.as_path()) {
            return Err(FuseError::output(
                output,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the output folder is one of the members: choose another",
                ),
            ));
        }
    }
    Ok(())
}

/// Written into each safetensors header so that a fused checkpoint says what it is.
fn provenance(members: &[Checkpoint], plan: &FusionPlan) -> BTreeMap<String, String> {
    let dirs: Vec<String> = members
        .iter()
        .map(|m| m.dir().display().to_string())
        .collect();
    BTreeMap::from([
        (
            "warm.members".to_string(),
            serde_json::json!(dirs).to_string(),
        ),
        (
            "warm.weights".to_string(),
            serde_json::json!(plan.weights).to_string(),
        ),
        (
            "warm.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ])
}

/// Files that are weights (never copied from a member into the output).
fn is_weight_file(name: &str) -> bool {
    const WEIGHT_SUFFIXES: &[&str] = &[
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".h5",
        ".msgpack",
        ".ckpt",
        ".gguf",
        ".onnx",
    ];
    name == INDEX_FILE
        || name.ends_with(".index.json")
        || WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// config.json keys that hold statistics of one member's rewards, not of its weights:
/// OpenRLHF's train_rm records the mean and standard deviation of the rewards on its
/// evaluation set, which its `--normalize_reward` subtracts and divides by.
const REWARD_STATISTICS_KEYS: &[&str] = &["mean", "std"];

/// config.json (the first member's, with `torch_dtype` set to the output type and without
/// reward statistics the members disagree on), the tokenizer and other small files of the
/// first member, and `warm_fusion.json` recording how the model was made.
fn write_companion_files(
    members: &[Checkpoint],
    output: &Path,
    dtype: Option<FloatDType>,
    report: &FusionReport,
) -> Result<(), FuseError> {
    let first = &members[0];
    let mut config = first.config().raw().clone();
    let torch_dtype = dtype
        .or_else(|| first.main_dtype().and_then(|d| d.as_fusable()))
        .map(FloatDType::torch_name);
    if let Some(name) = torch_dtype {
        config.insert("torch_dtype".into(), name.into());
    }
    for key in REWARD_STATISTICS_KEYS {
        let value = config.get(*key);
        if members.iter().any(|m| m.config().raw().get(*key) != value) {
            // The averaged model's rewards have statistics of their own; any member's
            // would normalize them wrongly.
            config.remove(*key);
            tracing::warn!(
                "config.json '{key}' differs between the members (each one's reward statistics): left out of the output"
            );
        }
    }
    writer::write_json(
        &output.join(CONFIG_FILE),
        &serde_json::Value::Object(config),
    )?;
    let entries = std::fs::read_dir(first.dir()).map_err(|e| FuseError::output(first.dir(), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let skip = name.starts_with('.')
            || name == CONFIG_FILE
            || name == "README.md"
            || is_weight_file(&name)
            || !entry.path().is_file();
        if !skip {
            let target = output.join(&name);
            std::fs::copy(entry.path(), &target).map_err(|e| FuseError::output(&target, e))?;
        }
    }
    let record = serde_json::json!({
        "members": report.members,
        "parameters": report.parameters,
        "tensors": report.tensors,
        "warm_version": env!("CARGO_PKG_VERSION"),
    });
    writer::write_json(&output.join("warm_fusion.json"), &record)
}
