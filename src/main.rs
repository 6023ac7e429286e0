//! The `warm` command line: parses flags (each also read from a WARM_* environment
//! variable) into the library's typed configuration and runs the command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use warm::config::{parse_size, DeviceChoice, FuseConfig, MembersConfig, ServeConfig};
use warm::dtype::FloatDType;
use warm::fuse::{self, FusionReport};
use warm::scorer::Combine;

#[derive(Parser)]
#[command(
    name = "warm",
    version,
    about = "Serve weight-averaged reward models (WARM)"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "WARM_JSON_LOGS")]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve rewards over HTTP from the fused members (or an ensemble of them).
    Serve(Box<ServeArgs>),
    /// Average the members' weights and write a Hugging Face checkpoint.
    Fuse(FuseArgs),
    /// Check that the members can be fused and how close they are to each other.
    Inspect(MemberArgs),
    /// Pairwise accuracy of each member, WARM and ENS on preference pairs (JSON lines).
    Eval(EvalArgs),
    /// Check a GPU: the averaging kernel, its bandwidth, fusion on the device, parity with
    /// the CPU and scoring throughput; one table (builds with the cuda feature only).
    #[cfg(feature = "cuda")]
    GpuCheck(GpuCheckArgs),
}

#[cfg(feature = "cuda")]
#[derive(Args)]
struct GpuCheckArgs {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// tests/fixtures of the source tree: score every fixture on the GPU and the CPU.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Members to fuse on the device (repeat), timed against reading them and PCIe.
    #[arg(long = "members")]
    members: Vec<PathBuf>,
    /// A model (repeat for a WARM set) to time scoring with on the GPU.
    #[arg(long = "model")]
    model: Vec<PathBuf>,
}

#[derive(Args)]
struct MemberArgs {
    /// A member checkpoint folder (repeat the flag, or comma-separate in WARM_MODEL).
    /// Default: the demo WARM set, models/minilm-sentiment-warm/member-*.
    #[arg(long = "model", env = "WARM_MODEL", value_delimiter = ',')]
    models: Vec<PathBuf>,
    /// Member weights, e.g. 0.5,0.25,0.25 (normalized to sum to one; default uniform).
    #[arg(long, env = "WARM_WEIGHTS", value_delimiter = ',', num_args = 1..)]
    weights: Option<Vec<f64>>,
    /// Accept members whose weights are not close to each other's (cosine < 0.9).
    #[arg(long, env = "WARM_ALLOW_UNRELATED_MEMBERS")]
    allow_unrelated_members: bool,
}

impl MemberArgs {
    /// The members named, or the demo set when none is.
    fn into_config(self) -> Result<MembersConfig, warm::demo::DemoSetError> {
        let dirs = if self.models.iter().all(|m| m.as_os_str().is_empty()) {
            let dirs = warm::demo::demo_members()?;
            tracing::info!(members = ?dirs, "no --model given: using the demo WARM set");
            dirs
        } else {
            self.models
        };
        Ok(MembersConfig {
            dirs,
            weights: self.weights,
            allow_unrelated_members: self.allow_unrelated_members,
        })
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    members: MemberArgs,
    /// weights: average the members into one model (WARM); predictions: keep them and average their scores (ENS).
    #[arg(long, env = "WARM_COMBINE", default_value = "weights")]
    combine: Combine,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "WARM_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Compute dtype: auto (f32 on the CPU), f32, f16 or bf16.
    #[arg(long, env = "WARM_DTYPE", default_value = "auto")]
    dtype: String,
    #[arg(long, env = "WARM_HOST", default_value = "0.0.0.0")]
    host: String,
    #[arg(long, env = "WARM_PORT", default_value_t = 8080)]
    port: u16,
    /// The model name in responses (default: the member folder names).
    #[arg(long, env = "WARM_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Tokens per forward pass: sequences x longest when padded, the real tokens on packed
    /// rows (decoders and encoders on the CPU in f32); a prompt shared by a batch's inputs
    /// counts once.
    #[arg(long, env = "WARM_MAX_BATCH_TOKENS", default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Sequences per forward pass.
    #[arg(long, env = "WARM_MAX_BATCH_REQUESTS", default_value_t = 256)]
    max_batch_requests: usize,
    /// Inputs in one request (more is a 413).
    #[arg(long, env = "WARM_MAX_CLIENT_BATCH_SIZE", default_value_t = 256)]
    max_client_batch_size: usize,
    /// Requests handled at once (more is a 429).
    #[arg(long, env = "WARM_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    max_concurrent_requests: usize,
    /// Longest input in tokens (default: the model's maximum).
    #[arg(long, env = "WARM_MAX_INPUT_LENGTH")]
    max_input_length: Option<usize>,
    /// Truncate long inputs instead of refusing them (422).
    #[arg(long, env = "WARM_AUTO_TRUNCATE")]
    auto_truncate: bool,
    /// Standardize rewards with the `mean` and `std` in config.json, as OpenRLHF's
    /// serve_rm --normalize_reward does: (reward - mean) / std.
    #[arg(long, env = "WARM_NORMALIZE_REWARD")]
    normalize_reward: bool,
    /// The label whose logit is the reward, for a classifier of several labels (a name
    /// from config.json's id2label, e.g. POSITIVE, or an index; default: the first).
    #[arg(long, env = "WARM_REWARD_LABEL")]
    reward_label: Option<String>,
    /// Inputs of one batch that begin with at least this many equal tokens (one prompt,
    /// several responses) compute them once: decoder models, on any device. 0: never.
    #[arg(long, env = "WARM_MIN_SHARED_PREFIX", default_value_t = warm::model::DEFAULT_MIN_SHARED_PREFIX)]
    min_shared_prefix: usize,
    /// Requests tokenized in parallel (default: the number of CPUs).
    #[arg(long, env = "WARM_TOKENIZATION_WORKERS")]
    tokenization_workers: Option<usize>,
    /// Largest request body (bytes or e.g. 8MB).
    #[arg(long, env = "WARM_PAYLOAD_LIMIT", default_value = "8MB", value_parser = parse_size)]
    payload_limit: u64,
    /// Require `Authorization: Bearer KEY` (all routes but /health, /live, /metrics).
    #[arg(long, env = "WARM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds a request may take before a 504.
    #[arg(long, env = "WARM_REQUEST_TIMEOUT", default_value_t = 300)]
    request_timeout: u64,
    /// Seconds a client may take to send a request's headers, and then its body: slower
    /// or stalled clients are cut off (408 for a body) instead of holding a connection.
    #[arg(long, env = "WARM_READ_TIMEOUT", default_value_t = 75)]
    read_timeout: u64,
    /// Origins allowed by CORS (comma-separated; CORS is off without it).
    #[arg(long, env = "WARM_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    members: MemberArgs,
    /// JSON lines of {"prompt", "chosen", "rejected"} (strings, or message lists).
    #[arg(long, env = "WARM_PAIRS")]
    pairs: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write the mean and standard deviation of the rewards into the config.json of the
    /// one model evaluated (a `warm fuse` output), as OpenRLHF's train_rm does after
    /// evaluating: what --normalize-reward standardizes with.
    #[arg(long)]
    write_reward_stats: bool,
    /// Tokens per forward pass: sequences x longest when padded, the real tokens on packed
    /// rows (decoders and encoders on the CPU in f32); a prompt shared by a batch's inputs
    /// counts once.
    #[arg(long, env = "WARM_MAX_BATCH_TOKENS", default_value_t = 16384)]
    max_batch_tokens: usize,
    /// The label whose logit is the reward (a name from config.json's id2label, or an
    /// index; default: the first).
    #[arg(long, env = "WARM_REWARD_LABEL")]
    reward_label: Option<String>,
}

#[derive(Args)]
struct FuseArgs {
    #[command(flatten)]
    members: MemberArgs,
    /// Folder for the fused checkpoint (created if missing).
    #[arg(long, env = "WARM_OUTPUT")]
    output: PathBuf,
    /// Output dtype of the float tensors: f32, f16 or bf16 (default: as stored).
    #[arg(long, env = "WARM_DTYPE")]
    dtype: Option<FloatDType>,
    /// Split the weights into shards above this size (bytes or e.g. 5GB, 512MiB).
    #[arg(long, env = "WARM_MAX_SHARD_SIZE", default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Where to average: cpu (default), cuda, cuda:N or auto (a GPU when there is one).
    #[arg(long, env = "WARM_DEVICE", default_value = "cpu")]
    device: DeviceChoice,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.json_logs);
    let result = match cli.command {
        Command::Serve(args) => {
            warm::alloc::keep_freed_memory_for_reuse();
            run_serve(*args)
        }
        Command::Fuse(args) => run_fuse(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Eval(args) => {
            warm::alloc::keep_freed_memory_for_reuse();
            run_eval(args)
        }
        #[cfg(feature = "cuda")]
        Command::GpuCheck(args) => run_gpu_check(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "cuda")]
fn run_gpu_check(args: GpuCheckArgs) -> anyhow::Result<ExitCode> {
    let passed = warm::cuda::check::run(&warm::cuda::check::CheckArgs {
        ordinal: args.gpu,
        fixtures: args.fixtures,
        members: args.members,
        model: args.model,
    })
    .map_err(|e| anyhow::anyhow!("gpu-check: {e}"))?;
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        other => Some(other.parse::<FloatDType>().map_err(anyhow::Error::msg)?),
    };
    let workers = args
        .tokenization_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = ServeConfig {
        members: args.members.into_config()?,
        combine: args.combine,
        device: args.device,
        dtype,
        host: args.host,
        port: args.port,
        served_model_name: args.served_model_name,
        max_batch_tokens: args.max_batch_tokens,
        max_batch_requests: args.max_batch_requests,
        max_client_batch_size: args.max_client_batch_size,
        max_concurrent_requests: args.max_concurrent_requests,
        max_input_length: args.max_input_length,
        auto_truncate: args.auto_truncate,
        normalize_reward: args.normalize_reward,
        reward_label: args.reward_label,
        min_shared_prefix: args.min_shared_prefix,
        tokenization_workers: workers,
        payload_limit: usize::try_from(args.payload_limit)?,
        api_key: args.api_key,
        request_timeout: std::time::Duration::from_secs(args.request_timeout),
        read_timeout: std::time::Duration::from_secs(args.read_timeout.max(1)),
        cors_allow_origins: args.cors_allow_origin,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(warm::server::serve(config));
    // Every accepted request has been answered by now. What may still run is the loading
    // of a model that never became ready (a stop during a minutes-long fusion): dropping
    // the runtime would wait for it to finish, so leave it to the process exit instead.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    served?;
    Ok(ExitCode::SUCCESS)
}

fn run_fuse(args: FuseArgs) -> anyhow::Result<ExitCode> {
    let config = FuseConfig {
        members: args.members.into_config()?,
        output: args.output,
        dtype: args.dtype,
        max_shard_size: args.max_shard_size,
        device: args.device,
    };
    fuse::stop_on_signals()?;
    let report = match fuse::fuse_to_directory(&config) {
        Err(e @ fuse::FuseError::Interrupted) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(130));
        }
        other => other?,
    };
    println!(
        "fused {} members into {}: {} tensors, {} parameters; read {:.2} GB in {:.2} s ({:.2} GB/s), wrote {:.2} GB",
        report.members.len(),
        config.output.display(),
        report.tensors,
        report.parameters,
        report.bytes_read as f64 / 1e9,
        report.seconds,
        report.read_gb_per_s(),
        report.bytes_out as f64 / 1e9,
    );
    Ok(ExitCode::SUCCESS)
}

fn run_eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let pairs = warm::eval::read_pairs(&args.pairs)?;
    let members = args.members.into_config()?;
    if args.write_reward_stats {
        // Refused before minutes of scoring.
        warm::eval::reward_stats_target(&members)?;
    }
    let report = warm::eval::evaluate(
        &members,
        &pairs,
        FloatDType::F32,
        args.max_batch_tokens,
        args.reward_label.as_deref(),
    )?;
    if args.write_reward_stats {
        let stats = warm::eval::record_reward_stats(&members, &report)?;
        eprintln!(
            "wrote reward mean {} and std {} into {}",
            stats.mean,
            stats.std,
            members.dirs[0].join("config.json").display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} preference pairs from {}",
        report.pairs,
        args.pairs.display()
    );
    println!("| model | pairwise accuracy | correct | reward mean | reward std |");
    println!("|---|---|---|---|---|");
    let stat = |v: Option<f32>| v.map_or_else(|| "-".into(), |v| format!("{v:.4}"));
    for a in report.members.iter().chain([&report.warm, &report.ens]) {
        println!(
            "| {} | {:.4} | {} | {} | {} |",
            a.name,
            a.accuracy,
            a.correct,
            stat(a.reward_mean),
            stat(a.reward_std)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_inspect(args: MemberArgs) -> anyhow::Result<ExitCode> {
    let report = fuse::inspect(&args.into_config()?)?;
    print_inspection(&report);
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_inspection(report: &FusionReport) {
    println!(
        "{:<3} {:<44} {:<34} {:>12} {:>6} {:>7} {:>10} {:>9}",
        "#", "member", "architecture", "parameters", "dtype", "weight", "cosine", "distance"
    );
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
    };
    for (i, m) in report.members.iter().enumerate() {
        println!(
            "{:<3} {:<44} {:<34} {:>12} {:>6} {:>7.4} {:>10} {:>9}",
            i + 1,
            m.dir.display(),
            m.architecture.as_deref().unwrap_or("?"),
            m.parameters,
            m.dtype.as_deref().unwrap_or("?"),
            m.weight,
            opt(m.cosine_to_rest, 6),
            opt(m.distance_to_rest, 4),
        );
    }
    println!(
        "read {:.2} GB in {:.2} s; cosine and distance are to the mean of the other members",
        report.bytes_read as f64 / 1e9,
        report.seconds
    );
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if report.problems.is_empty() {
        println!("ok: the members can be fused");
    } else {
        println!("{}", fuse::describe(&report.problem_list));
    }
}
