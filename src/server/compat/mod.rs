//! Routes in the shapes existing clients send and parse (docs/compat-sources.md has the
//! upstream file and function behind every shape): TEI, Hugging Face's InferenceClient,
//! vLLM's pooling API (which verl calls), SGLang's native /classify (which POLAR's client
//! calls), OpenRLHF's remote reward model, LLaMA-Factory's reward API, slime's remote
//! reward model. Routes that two
//! APIs share tell the bodies apart by their fields.

pub mod activation;
mod error_shape;
mod llamafactory;
mod openrlhf;
pub mod schema;
mod sglang;
mod slime;
mod tei;
mod vllm;

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::Value;

use super::error::ApiError;
use super::native;
use super::pipeline::ApiJson;
use super::AppState;
use crate::text::Input;

pub use llamafactory::score_evaluation;
pub use openrlhf::get_reward;
pub use sglang::embeddings;
pub use slime::remote_rm;
pub use tei::predict;
pub use vllm::{classify as vllm_classify, pooling, score as vllm_score};

/// The compat routes' part of the OpenAPI document (merged into warm's own in
/// `api::document`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    v1_score,
    v1_rerank,
    root,
    tei::predict,
    rerank,
    classify,
    vllm::classify,
    vllm::pooling,
    vllm::score,
    v2_rerank,
    sglang::embeddings,
    openrlhf::get_reward,
    llamafactory::score_evaluation,
    slime::remote_rm
), components(schemas(
    // Those of error responses and query parameters, which paths do not collect.
    schema::VllmError,
    schema::OpenAiFlatError,
    schema::SglangError,
    schema::FastApiError,
    schema::WarmOrVllmError,
    schema::VllmOrSglangError,
    schema::RemoteRmPrompt
)))]
pub struct CompatDoc;

/// Whether the scores are probabilities already (a process reward model's weakest step):
/// the routes then apply no activation unless a request asks for one.
fn scores_are_probabilities(state: &AppState) -> bool {
    state
        .ready
        .get()
        .is_some_and(|r| r.scorer.step_spec().is_some())
}

fn has(body: &Value, key: &str) -> bool {
    body.get(key).is_some()
}

#[utoipa::path(post, path = "/", tag = "TEI", request_body = crate::server::compat::schema::RootRequest,
    responses((status = 200, body = crate::server::compat::schema::RootResponse), crate::server::compat::schema::WarmErrors))]
/// `POST /`: TEI answers it as /predict for classifiers and as /rerank for one-label
/// models; Hugging Face's InferenceClient posts `{"inputs", "parameters"}` here and
/// expects the Inference API's nested list. All three are told apart by their fields.
pub async fn root(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    if has(&body, "query") && has(&body, "texts") {
        tei::rerank_body(&state, body).await
    } else if has(&body, "parameters") {
        tei::text_classification_body(&state, body).await
    } else if has(&body, "inputs") {
        tei::predict_body(&state, body).await
    } else {
        Err(ApiError::bad_request(
            "POST / takes TEI's {\"inputs\"} (predict), {\"query\", \"texts\"} (rerank) or {\"inputs\", \"parameters\"} (text classification)",
        ))
    }
}

#[utoipa::path(post, path = "/classify", tag = "vLLM", request_body = crate::server::compat::schema::SharedClassifyRequest,
    responses((status = 200, body = crate::server::compat::schema::SharedClassifyResponse), crate::server::compat::schema::VllmOrSglangErrors))]
/// `POST /classify`: vLLM's `{"input"}` or `{"messages"}`, or SGLang's native `{"text"}`.
pub async fn classify(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    match body {
        Ok(ApiJson(body)) if sglang::is_native_body(&body) => {
            sglang::classify_body(&state, body).await
        }
        body => vllm::classify(State(state), body).await,
    }
}

#[utoipa::path(post, path = "/rerank", tag = "TEI", request_body = crate::server::compat::schema::SharedRerankRequest,
    responses((status = 200, body = crate::server::compat::schema::SharedRerankResponse), crate::server::compat::schema::WarmOrVllmErrors))]
/// `POST /rerank`: TEI's `{"query", "texts"}` or vLLM's `{"query", "documents"}`.
pub async fn rerank(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    use axum::response::IntoResponse;
    match body {
        Ok(ApiJson(body)) if has(&body, "documents") => vllm::rerank_body(&state, Ok(body)).await,
        Ok(ApiJson(body)) => tei::rerank_body(&state, body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v1/rerank", tag = "warm", request_body = crate::server::compat::schema::SharedV1RerankRequest,
    responses((status = 200, body = crate::server::compat::schema::SharedV1RerankResponse), crate::server::compat::schema::WarmOrVllmErrors))]
/// `POST /v1/rerank`: warm's `{"prompt", "responses"}` or vLLM's `{"query", "documents"}`.
pub async fn v1_rerank(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    use axum::response::IntoResponse;
    match body {
        Ok(ApiJson(body)) if has(&body, "documents") => vllm::rerank_body(&state, Ok(body)).await,
        Ok(ApiJson(body)) => native::rerank_value(&state, body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v1/score", tag = "warm", request_body = crate::server::compat::schema::SharedScoreRequest,
    responses((status = 200, body = crate::server::compat::schema::SharedScoreResponse), crate::server::compat::schema::WarmOrVllmErrors))]
/// `POST /v1/score`: warm's `{"inputs"}` or vLLM's pairs (`queries`/`documents`,
/// `text_1`/`text_2`, ...).
pub async fn v1_score(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    use axum::response::IntoResponse;
    match body {
        Ok(ApiJson(body)) if vllm::SCORE_FIELDS.iter().any(|k| has(&body, k)) => {
            vllm::score_body(&state, Ok(body)).await
        }
        // Everything else is warm's own body, so a typo (`"input"`) is answered in warm's
        // shape, naming `inputs`.
        Ok(ApiJson(body)) => native::score_value(&state, body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        // Unreadable JSON: answered in warm's own shape, this being warm's route.
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v2/rerank", tag = "vLLM", request_body = crate::server::compat::schema::VllmRerankRequest,
    responses((status = 200, body = crate::server::compat::schema::VllmRerankResponse), crate::server::compat::schema::VllmErrors))]
/// `POST /v2/rerank`: vLLM serves its rerank here too for Cohere's v2 client
/// (`ClientV2.rerank` posts `{"model", "query", "documents", "top_n"}` and reads
/// `results[].index`, `relevance_score`).
pub async fn v2_rerank(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    vllm::rerank_body(&state, body.map(|ApiJson(b)| b)).await
}

/// A response id in the style vLLM gives (`classify-<32 hex>`).
fn request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut h = state.build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let a = h.finish();
    h.write_u64(a);
    format!("{prefix}-{a:016x}{:016x}", h.finish())
}

/// A string or a non-empty list of strings (token id inputs are refused by name).
fn string_list(v: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.iter().all(Value::is_string) && !items.is_empty() => Ok(items
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()),
        Value::Array(items)
            if items.iter().any(Value::is_number) || items.iter().any(Value::is_array) =>
        {
            Err(ApiError::bad_request(format!(
                "`{field}`: token id inputs are not supported, send text"
            )))
        }
        _ => Err(ApiError::bad_request(format!(
            "`{field}` must be a non-empty string or list of strings"
        ))),
    }
}

/// Inputs as vLLM, SGLang and OpenAI's embeddings take them: a string, a non-empty list of
/// strings, or token ids ([`id_inputs`]). Also whether one input was given bare.
fn input_list(v: &Value, field: &str) -> Result<(Vec<Input>, bool), ApiError> {
    if let Some(ids) = id_inputs(v, field) {
        return ids;
    }
    let texts = string_list(v, field).map_err(|_| {
        ApiError::bad_request(format!(
            "`{field}` must be a string, a non-empty list of strings, a list of token ids or \
             a list of such lists"
        ))
    })?;
    Ok((texts.into_iter().map(Input::Text).collect(), v.is_string()))
}

/// Token-id inputs: a list of ids (one input, given bare) or a non-empty list of such
/// lists; `None` when `v` is neither shape.
fn id_inputs(v: &Value, field: &str) -> Option<Result<(Vec<Input>, bool), ApiError>> {
    let ids = |items: &[Value], at: &str| -> Result<Input, ApiError> {
        items
            .iter()
            .map(super::pipeline::token_id)
            .collect::<Option<Vec<u32>>>()
            .map(Input::Ids)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`{at}`: token ids are integers from 0 to 4294967295"
                ))
            })
    };
    let Value::Array(items) = v else {
        return None;
    };
    if items.is_empty() {
        return None;
    }
    if items.iter().all(Value::is_number) {
        return Some(ids(items, field).map(|input| (vec![input], true)));
    }
    if !items.iter().all(Value::is_array) {
        return None;
    }
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Array(list) if !list.is_empty() => ids(list, &format!("{field}[{i}]")),
            _ => Err(ApiError::bad_request(format!(
                "`{field}[{i}]`: an empty list of token ids"
            ))),
        })
        .collect::<Result<Vec<_>, _>>();
    Some(inputs.map(|inputs| (inputs, false)))
}

/// `encoding_format`: `float` (or absent) or `base64` (OpenAI's client asks for it).
fn base64_requested(format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        None | Some("float") => Ok(false),
        Some("base64") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "encoding_format '{other}': expected 'float' or 'base64'"
        ))),
    }
}

/// Floats as a JSON array, or as base64 of their little-endian f32 bytes.
fn float_array(values: &[f32], base64: bool) -> Value {
    if base64 {
        use base64::Engine;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        serde_json::json!(values)
    }
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
