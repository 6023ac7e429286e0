//! The HTTP server: listens at once, loads and fuses the members in the background (503
//! until ready), serves the native routes, and drains in-flight requests on SIGTERM/SIGINT.

pub mod api;
mod auth;
mod compat;
pub mod error;
mod listen;
mod memory;
mod metrics;
mod native;
mod pipeline;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::ServeConfig;
use crate::dtype::FloatDType;
use crate::engine::{BatchLimits, Engine};
use crate::scorer::{Combine, Scorer};
pub use metrics::Metrics;

/// What the server knows once the model is loaded.
pub struct Ready {
    pub engine: Engine,
    pub scorer: Arc<Scorer>,
    pub info: serde_json::Value,
}

pub struct AppState {
    pub config: ServeConfig,
    pub model_name: String,
    pub metrics: Arc<Metrics>,
    pub ready: OnceLock<Ready>,
    /// Requests being handled; full means 429.
    pub admission: Arc<Semaphore>,
    /// Requests being tokenized at once.
    pub tokenizers: Arc<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Load(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs `warm serve` until SIGTERM/SIGINT (then drains and returns) or a start-up failure.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "listening (not ready until the model is loaded)");
    let state = Arc::new(AppState {
        model_name: model_name(&config),
        metrics: Arc::new(Metrics::new()?),
        ready: OnceLock::new(),
        admission: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        tokenizers: Arc::new(Semaphore::new(config.tokenization_workers.max(1))),
        config,
    });
    let app = router(state.clone());
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<String>();
    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        // A panic in a library while loading (a CUDA library that cannot be found, say)
        // must end the server like any load error, not leave it answering 503 forever.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&loader)))
            .unwrap_or_else(|panic| {
                let message = panic_message(&*panic).unwrap_or("no message");
                Err(format!("loading panicked: {message}"))
            });
        if let Err(e) = loaded {
            let _ = failed_tx.send(e);
        }
    });
    let server = listen::serve(listener, app, state.config.read_timeout, shutdown_signal());
    tokio::select! {
        () = server => {
            if state.ready.get().is_none() {
                tracing::info!("stopped before the model was loaded: loading abandoned");
            }
            tracing::info!("stopped accepting; in-flight requests are done");
            Ok(())
        }
        Ok(message) = &mut failed_rx => Err(ServeError::Load(message)),
    }
}

fn model_name(config: &ServeConfig) -> String {
    config.served_model_name.clone().unwrap_or_else(|| {
        let names: Vec<String> = config
            .members
            .dirs
            .iter()
            .map(|d| {
                d.file_name().map_or_else(
                    || d.display().to_string(),
                    |n| n.to_string_lossy().to_string(),
                )
            })
            .collect();
        if names.len() == 1 {
            names[0].clone()
        } else {
            format!("warm({})", names.join(","))
        }
    })
}

/// `--dtype auto`: f32 on the CPU (candle's half-precision CPU kernels are slow), bf16 on
/// a GPU.
fn auto_dtype(on_gpu: bool) -> FloatDType {
    if on_gpu {
        FloatDType::BF16
    } else {
        FloatDType::F32
    }
}

/// The text a panic carries (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

/// A prompt and response where the model can format one (ArmoRM scores nothing else), else
/// plain text; one step for a process reward model (its tag's ids alone where the tag has
/// no text of its own; a response of one step where steps are tokenized apart).
fn warm_up_input(scorer: &Scorer) -> Result<crate::model::Sequence, String> {
    use crate::model::StepMarker;
    let step_end = match scorer.step_spec().map(|spec| &spec.marker) {
        Some(StepMarker::Tag {
            text: Some(text), ..
        }) => text.clone(),
        Some(StepMarker::Tag { ids, text: None }) => {
            return Ok(crate::model::Sequence {
                type_ids: vec![0; ids.len()],
                ids: ids.clone(),
                read_at: None,
            })
        }
        Some(StepMarker::Separator { .. }) | None => String::new(),
    };
    let pair = crate::text::Input::Pair {
        prompt: "warm-up".into(),
        response: format!("ready{step_end}"),
    };
    scorer
        .encode(&pair, true, None, true)
        .or_else(|_| {
            scorer.encode(
                &crate::text::Input::Text(format!("warm-up{step_end}")),
                true,
                None,
                true,
            )
        })
        .map_err(|e| format!("warm-up input: {e}"))
}

/// Loads and fuses the members, runs a warm-up batch, and marks the server ready.
fn load(state: &AppState) -> Result<(), String> {
    let started = Instant::now();
    let config = &state.config;
    let device = crate::device::select(config.device)?;
    let dtype = config.dtype.unwrap_or_else(|| auto_dtype(device.is_cuda()));
    tracing::info!(members = config.members.dirs.len(), combine = ?config.combine, %dtype, "loading");
    let mut scorer = Scorer::load(
        &config.members,
        config.combine,
        dtype,
        &device,
        config.max_input_length,
    )
    .map_err(|e| e.to_string())?;
    scorer.share_prefixes_from(config.min_shared_prefix);
    if config.normalize_reward {
        scorer
            .normalize_rewards(&config.members)
            .map_err(|e| e.to_string())?;
    }
    match &config.reward_label {
        Some(label) => scorer.reward_from_label(label).map_err(|e| e.to_string())?,
        None if scorer.num_labels() > 1 && scorer.step_spec().is_none() => {
            let (index, name) = scorer.reward_label();
            tracing::warn!(
                labels = scorer.num_labels(),
                "the reward is label {index} ({name}), the first: --reward-label picks another"
            );
        }
        None => {}
    }
    let report = scorer.report().clone();
    let warmup = warm_up_input(&scorer)?;
    scorer
        .score(&[&warmup])
        .map_err(|e| format!("warm-up batch: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let m = &state.metrics;
    m.fusion_seconds.set(report.seconds);
    m.fusion_bytes.set(report.bytes_read as f64);
    let architecture = report.members[0].architecture.clone().unwrap_or_default();
    let combine = match config.combine {
        Combine::Weights => "weights",
        Combine::Predictions => "predictions",
    };
    m.model_info
        .with_label_values(&[
            state.model_name.as_str(),
            architecture.as_str(),
            combine,
            &report.members.len().to_string(),
            &dtype.to_string(),
            &crate::device::label(&device),
        ])
        .set(1.0);
    // A process reward model's step ends: a tag in the text, or a separator after steps
    // tokenized apart.
    let (step_tag, step_separator) = match scorer.step_spec().map(|s| &s.marker) {
        Some(crate::model::StepMarker::Tag { ids, text }) => {
            (Some(serde_json::json!({"ids": ids, "text": text})), None)
        }
        Some(crate::model::StepMarker::Separator { ids, text, .. }) => {
            (None, Some(serde_json::json!({"ids": ids, "text": text})))
        }
        None => (None, None),
    };
    let info = serde_json::json!({
        "model": state.model_name,
        "architecture": architecture,
        "combine": combine,
        "dtype": dtype.to_string(),
        "device": crate::device::label(&device),
        "members": report.members.iter().map(|m| serde_json::json!({
            "path": m.dir,
            "weight": m.weight,
            "cosine_to_rest": m.cosine_to_rest,
            "distance_to_rest": m.distance_to_rest,
            "parameters": m.parameters,
        })).collect::<Vec<_>>(),
        "has_chat_template": scorer.has_chat_template(),
        "num_labels": scorer.num_labels(),
        "reward_label": {"index": scorer.reward_label().0, "name": scorer.reward_label().1},
        "step_tag": step_tag,
        "step_separator": step_separator,
        "reward_token": scorer
            .appended_token()
            .map(|(id, text)| serde_json::json!({"id": id, "text": text})),
        "reward_statistics": scorer.reward_stats().map(|all| all.iter().map(|s| serde_json::json!({
            "mean": s.mean,
            "std": s.std,
        })).collect::<Vec<_>>()),
        "limits": {
            "max_input_length": scorer.max_input_length(),
            "max_batch_tokens": config.max_batch_tokens,
            "max_batch_requests": config.max_batch_requests,
            "max_client_batch_size": config.max_client_batch_size,
            "max_concurrent_requests": config.max_concurrent_requests,
            "payload_limit": config.payload_limit,
            "auto_truncate": config.auto_truncate,
            "min_shared_prefix": config.min_shared_prefix,
        },
        "fusion": {"seconds": report.seconds, "bytes_read": report.bytes_read},
        "load_seconds": seconds,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let scorer = Arc::new(scorer);
    let limits = BatchLimits {
        max_batch_tokens: config.max_batch_tokens,
        max_batch_requests: config.max_batch_requests,
        layout: scorer.batch_layout(),
    };
    let engine = Engine::start(scorer.clone(), limits, state.metrics.clone());
    let _ = state.ready.set(Ready {
        engine,
        scorer,
        info,
    });
    tracing::info!(
        seconds,
        fusion_seconds = report.seconds,
        bytes_read = report.bytes_read,
        "ready"
    );
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.payload_limit;
    let cors = (!state.config.cors_allow_origins.is_empty()).then(|| {
        let origins: Vec<axum::http::HeaderValue> = state
            .config
            .cors_allow_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([
                axum::http::header::CONTENT_TYPE,
                axum::http::header::AUTHORIZATION,
            ])
    });
    let protected = Router::new()
        .route("/v1/score", post(compat::v1_score))
        .route("/v1/rerank", post(compat::v1_rerank))
        .route("/v2/rerank", post(compat::v2_rerank))
        .route("/", post(compat::root))
        .route("/predict", post(compat::predict))
        .route("/rerank", post(compat::rerank))
        .route("/classify", post(compat::classify))
        .route("/v1/classify", post(compat::vllm_classify))
        .route("/pooling", post(compat::pooling))
        .route("/v1/embeddings", post(compat::embeddings))
        .route("/score", post(compat::vllm_score))
        .route("/get_reward", post(compat::get_reward))
        .route("/v1/score/evaluation", post(compat::score_evaluation))
        .route("/remote_rm", post(compat::remote_rm))
        .route("/info", get(native::info))
        .route("/openapi.json", get(native::openapi))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let open = Router::new()
        .route("/health", get(native::health))
        .route("/", get(native::root_health))
        .route("/live", get(native::live))
        .route("/metrics", get(native::metrics));
    let mut app = protected
        .merge(open)
        .fallback(native::not_found)
        .method_not_allowed_fallback(native::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state);
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal: finishing queued and in-flight requests");
}
