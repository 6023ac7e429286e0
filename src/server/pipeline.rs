//! What every scoring route shares: readiness and admission, the client batch limit,
//! formatting and tokenizing on the tokenizer pool (one bad input fails the request alone,
//! before anything is queued), the engine with a timeout, metrics and timing headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::model::StepMarker;
use crate::scorer::Score;
use crate::text::{join_steps, Direction, Input, Message, StepsError};

/// A JSON body read whatever the Content-Type (curl -d sends a form type), with errors in
/// warm's JSON shape: 413 over the payload limit, 408 when the whole body has not arrived
/// within `--read-timeout`, 400 for malformed JSON.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let deadline = state.config.read_timeout;
        let read = tokio::time::timeout(deadline, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s (--read-timeout)",
                        deadline.as_secs()
                    ),
                )
            })?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(
                        "the request body is larger than the payload limit (--payload-limit)",
                    )
                } else {
                    ApiError::bad_request(format!("cannot read the request body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// The inputs of one request, ready to tokenize.
pub struct ScoringRequest {
    pub inputs: Vec<Input>,
    pub truncate: Option<bool>,
    pub direction: Option<Direction>,
    /// False on the OpenRLHF route, whose text is already templated.
    pub add_special_tokens: bool,
    /// A request's own token limit (vLLM's `truncate_prompt_tokens`), below the server's.
    pub max_length: Option<usize>,
    /// Whether `--max-client-batch-size` applies (not to OpenRLHF's batches of thousands,
    /// which the payload limit still bounds).
    pub client_batch_limit: bool,
}

impl ScoringRequest {
    /// A request with the defaults of the native routes.
    pub fn new(inputs: Vec<Input>) -> Self {
        Self {
            inputs,
            truncate: None,
            direction: None,
            add_special_tokens: true,
            max_length: None,
            client_batch_limit: true,
        }
    }
}

pub struct ScoringOutcome {
    pub scores: Vec<Score>,
    /// Each input's tokens, in order.
    pub input_tokens: Vec<usize>,
    pub timings: Timings,
}

impl ScoringOutcome {
    /// The request's tokens, all inputs together.
    pub fn prompt_tokens(&self) -> usize {
        self.input_tokens.iter().sum()
    }

    /// A 200 with `body` and the timing headers of this request.
    pub fn respond(&self, body: impl serde::Serialize) -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            self.timings
                .headers(self.scores.len(), self.prompt_tokens()),
            axum::Json(body),
        )
            .into_response()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub tokenization: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub total: Duration,
}

impl Timings {
    /// Response headers with the timings in milliseconds, as TEI sends them.
    pub fn headers(&self, inputs: usize, tokens: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        let ms =
            |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0)).ok();
        for (name, value) in [
            ("x-tokenization-time", ms(self.tokenization)),
            ("x-queue-time", ms(self.queue)),
            ("x-inference-time", ms(self.inference)),
            ("x-total-time", ms(self.total)),
            ("x-inputs", HeaderValue::from_str(&inputs.to_string()).ok()),
            (
                "x-prompt-tokens",
                HeaderValue::from_str(&tokens.to_string()).ok(),
            ),
        ] {
            if let Some(v) = value {
                h.insert(name, v);
            }
        }
        h
    }
}

/// One native input: a string, `{"prompt", "response"}`, `{"messages"}` or
/// `{"input_ids"}` (token ids, scored as given); for a process reward model the response
/// may be given as its `steps` instead (after `messages`, the assistant's last turn).
pub fn parse_input(
    state: &AppState,
    value: &serde_json::Value,
    index: usize,
) -> Result<Input, ApiError> {
    let at = format!("inputs[{index}]");
    let bad = |what: &str| ApiError::bad_request(format!("{at}: {what}"));
    let serde_json::Value::Object(fields) = value else {
        return match value {
            serde_json::Value::String(s) => Ok(Input::Text(s.clone())),
            _ => Err(bad(
                "expected a string, {\"prompt\", \"response\"}, {\"messages\": [...]} or {\"input_ids\": [...]}",
            )),
        };
    };
    // A field set to null is one left out, as serde reads the optional fields elsewhere.
    let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
    if let Some(ids) = field("input_ids") {
        let ids: Vec<u32> = ids
            .as_array()
            .and_then(|ids| ids.iter().map(token_id).collect())
            .ok_or_else(|| {
                bad("'input_ids' must be a list of token ids (integers from 0 to 4294967295)")
            })?;
        if fields.values().filter(|v| !v.is_null()).count() > 1 {
            return Err(bad(
                "'input_ids' is an input on its own: give no other field",
            ));
        }
        return Ok(Input::Ids(ids));
    }
    let steps = match field("steps") {
        Some(steps) => {
            let steps: Vec<String> = serde_json::from_value(steps.clone())
                .map_err(|e| bad(&format!("'steps' must be a list of strings: {e}")))?;
            Some(steps_response(state, steps, &at)?)
        }
        None => None,
    };
    if let Some(messages) = field("messages") {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
            bad(&format!(
                "'messages' must be a list of {{\"role\", \"content\"}}: {e}"
            ))
        })?;
        return match steps {
            Some(response) => response.after_messages(messages, &at),
            None => Ok(Input::Messages(messages)),
        };
    }
    match (field("prompt"), field("response"), steps) {
        (Some(serde_json::Value::String(p)), Some(serde_json::Value::String(r)), None) => {
            Ok(Input::Pair {
                prompt: p.clone(),
                response: r.clone(),
            })
        }
        (Some(serde_json::Value::String(p)), None, Some(response)) => {
            Ok(response.after_prompt(p.clone()))
        }
        (_, Some(_), Some(_)) => Err(bad("give 'response' or 'steps', not both")),
        _ => Err(bad(
            "an object input needs string fields 'prompt' and 'response' (or 'steps'), or 'messages'",
        )),
    }
}

/// A token id as JSON gives it: an integer from 0 to 2^32 - 1, written `7` or `7.0` (both
/// integers to JSON Schema, and to the Python servers whose clients send them).
pub fn token_id(v: &serde_json::Value) -> Option<u32> {
    if let Some(n) = v.as_u64() {
        return u32::try_from(n).ok();
    }
    v.as_f64()
        .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
        .map(|f| f as u32)
}

/// A response as a process reward model takes it: its text, or (steps tokenized apart,
/// TRL's layout) its steps.
pub enum StepsResponse {
    Text(String),
    Steps(Vec<String>),
}

impl StepsResponse {
    /// The input of `prompt` answered by this response.
    pub fn after_prompt(self, prompt: String) -> Input {
        match self {
            Self::Text(response) => Input::Pair { prompt, response },
            Self::Steps(steps) => Input::Steps { prompt, steps },
        }
    }

    /// The conversation `messages` answered by this response (an assistant turn); `at`
    /// names the input in errors.
    pub fn after_messages(self, mut messages: Vec<Message>, at: &str) -> Result<Input, ApiError> {
        match self {
            Self::Text(content) => {
                messages.push(Message {
                    role: "assistant".into(),
                    content,
                });
                Ok(Input::Messages(messages))
            }
            Self::Steps(_) => Err(ApiError::unprocessable(format!(
                "{at}: this process reward model reads a plain prompt and its steps (TRL's \
                 layout), not a conversation: give 'prompt' and 'steps'"
            ))),
        }
    }
}

/// A process reward model's `steps` as its response: joined and ended by its step tag, or
/// kept apart for a model that tokenizes them apart; `at` names them in errors.
pub fn steps_response(
    state: &AppState,
    steps: Vec<String>,
    at: &str,
) -> Result<StepsResponse, ApiError> {
    let ready = state.ready.get().ok_or_else(ApiError::not_ready)?;
    let joined = match ready.scorer.step_spec().map(|spec| &spec.marker) {
        None => Err(StepsError::NotProcessReward),
        Some(StepMarker::Separator { .. }) if steps.is_empty() => Err(StepsError::Empty),
        Some(StepMarker::Separator { .. }) => return Ok(StepsResponse::Steps(steps)),
        Some(StepMarker::Tag { text, .. }) => text
            .as_deref()
            .ok_or(StepsError::TagHasNoText)
            .and_then(|tag| join_steps(&steps, tag)),
    };
    joined.map(StepsResponse::Text).map_err(|e| match e {
        StepsError::NotProcessReward | StepsError::TagHasNoText => {
            ApiError::unprocessable(format!("{at}: {e}"))
        }
        StepsError::Empty | StepsError::HoldsTag { .. } => {
            ApiError::bad_request(format!("{at}: {e}"))
        }
    })
}

pub fn parse_direction(value: Option<&str>) -> Result<Option<Direction>, ApiError> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(None),
        Some("left") => Ok(Some(Direction::Left)),
        Some("right") => Ok(Some(Direction::Right)),
        Some(other) => Err(ApiError::bad_request(format!(
            "truncation_direction '{other}': expected 'left' or 'right'"
        ))),
    }
}

/// Scores one request end to end; records its metrics under `route`.
pub async fn run(
    state: &Arc<AppState>,
    route: &'static str,
    request: ScoringRequest,
) -> Result<ScoringOutcome, ApiError> {
    use tracing::Instrument;
    let started = Instant::now();
    let span = tracing::info_span!("request", route, inputs = request.inputs.len());
    let result = run_inner(state, request, started)
        .instrument(span.clone())
        .await;
    span.in_scope(|| match &result {
        Ok(o) => tracing::debug!(
            tokens = o.prompt_tokens(),
            total_ms = o.timings.total.as_secs_f64() * 1000.0,
            "scored"
        ),
        Err(e) => tracing::info!(status = e.status.as_u16(), error = %e.message, "refused"),
    });
    let m = &state.metrics;
    let outcome = match &result {
        Ok(o) => {
            m.inputs
                .with_label_values(&[route])
                .inc_by(o.scores.len() as u64);
            m.tokenization.observe(o.timings.tokenization.as_secs_f64());
            m.queue.observe(o.timings.queue.as_secs_f64());
            m.inference.observe(o.timings.inference.as_secs_f64());
            "success".to_string()
        }
        Err(e) => e.status.as_u16().to_string(),
    };
    m.requests
        .with_label_values(&[route, outcome.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn run_inner(
    state: &Arc<AppState>,
    request: ScoringRequest,
    started: Instant,
) -> Result<ScoringOutcome, ApiError> {
    let ready = state.ready.get().ok_or_else(ApiError::not_ready)?;
    let _permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded())?;
    let config = &state.config;
    if request.inputs.is_empty() {
        return Err(ApiError::bad_request("the input list is empty"));
    }
    if request.client_batch_limit && request.inputs.len() > config.max_client_batch_size {
        return Err(ApiError::too_large(format!(
            "{} inputs in one request, more than the limit of {} (--max-client-batch-size)",
            request.inputs.len(),
            config.max_client_batch_size
        )));
    }
    let truncate = request.truncate.unwrap_or(config.auto_truncate);
    let tokenizing = Instant::now();
    let permit = state
        .tokenizers
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let scorer = ready.scorer.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let encode = |(i, input): (usize, &Input)| {
            // The server's own limit applies either way (encode_limited caps at it).
            let max_length = request.max_length.unwrap_or(usize::MAX);
            scorer
                .encode_limited(
                    input,
                    max_length,
                    truncate,
                    request.direction,
                    request.add_special_tokens,
                )
                .map_err(|e| ApiError::unprocessable(format!("inputs[{i}]: {e}")))
        };
        if request.inputs.len() > 64 {
            use rayon::prelude::*;
            request
                .inputs
                .par_iter()
                .enumerate()
                .map(encode)
                .collect::<Result<Vec<_>, _>>()
        } else {
            request
                .inputs
                .iter()
                .enumerate()
                .map(encode)
                .collect::<Result<Vec<_>, _>>()
        }
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenization task failed: {e}"),
        )
    })??;
    let tokenization = tokenizing.elapsed();
    let input_tokens: Vec<usize> = encoded.iter().map(|s| s.ids.len()).collect();
    let scored = tokio::time::timeout(config.request_timeout, ready.engine.score(encoded))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the request took longer than {} s (--request-timeout)",
                    config.request_timeout.as_secs()
                ),
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(ScoringOutcome {
        scores: scored.scores,
        input_tokens,
        timings: Timings {
            tokenization,
            queue: scored.queue_time,
            inference: scored.inference_time,
            total: started.elapsed(),
        },
    })
}
