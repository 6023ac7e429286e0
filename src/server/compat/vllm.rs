//! vLLM's pooling API: `POST /classify` (and `/v1/classify`, as SGLang names it), `/score`
//! and `/v1/score`, `/rerank` and `/v1/rerank` with `documents`, and `/pooling` (vLLM's
//! answer for a process reward model, lmdeploy's for one that scores whole inputs); errors
//! in vLLM's shape.
//! verl's reward loop posts `{"model", "input", "use_activation": false}` to /classify and
//! reads `data[-1].probs[-1]`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::activation::Activation;
use super::error_shape::ErrorShape;
use super::{base64_requested, float_array, input_list, request_id, string_list, unix_time};
use crate::server::error::ApiError;
use crate::server::pipeline::{self, parse_direction, ApiJson, ScoringOutcome, ScoringRequest};
use crate::server::AppState;
use crate::text::{Input, Message};

/// The activation switches: `softmax` over `activation` over `use_activation` (vLLM up
/// to 0.14 accepted all three; verl sent `activation` before `use_activation`).
#[derive(Deserialize, Default)]
struct ActivationFlags {
    #[serde(default)]
    use_activation: Option<bool>,
    #[serde(default)]
    activation: Option<bool>,
    #[serde(default)]
    softmax: Option<bool>,
}

impl ActivationFlags {
    fn requested(&self) -> Option<bool> {
        self.softmax.or(self.activation).or(self.use_activation)
    }
}

#[derive(Deserialize)]
struct ClassifyRequest {
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default, deserialize_with = "crate::server::api::integer")]
    truncate_prompt_tokens: Option<i64>,
    #[serde(default)]
    truncation_side: Option<String>,
    #[serde(flatten)]
    flags: ActivationFlags,
}

impl ClassifyRequest {
    /// The inputs (`input` texts, or one `messages` conversation) and how to encode them:
    /// special tokens added to texts, not to templated chats (vLLM's defaults), and
    /// `truncate_prompt_tokens`.
    fn scoring_request(&self) -> Result<ScoringRequest, ApiError> {
        let (inputs, default_special) = match (&self.input, &self.messages) {
            (Some(input), None) => (input_list(input, "input")?.0, true),
            (None, Some(messages)) => (vec![Input::Messages(messages.clone())], false),
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of `input` or `messages`",
                ))
            }
        };
        let (truncate, max_length) = truncation(self.truncate_prompt_tokens)?;
        Ok(ScoringRequest {
            truncate,
            max_length,
            direction: parse_direction(self.truncation_side.as_deref())?,
            add_special_tokens: self.add_special_tokens.unwrap_or(default_special),
            ..ScoringRequest::new(inputs)
        })
    }
}

/// `POST /pooling`: the body of /classify, and `encoding_format` (`float` or `base64`).
#[derive(Deserialize)]
struct PoolingRequest {
    #[serde(flatten)]
    classify: ClassifyRequest,
    #[serde(default)]
    encoding_format: Option<String>,
}

#[utoipa::path(post, path = "/pooling", tag = "vLLM", request_body = crate::server::compat::schema::PoolingRequest,
    responses((status = 200, body = crate::server::compat::schema::PoolingResponse), crate::server::compat::schema::VllmErrors))]
pub async fn pooling(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    pooling_inner(&state, body.map(|ApiJson(b)| b))
        .await
        .unwrap_or_else(|e| ErrorShape::Vllm.respond(e))
}

/// A process reward model's pooled output as vLLM's STEP pooler gives it: per input, one
/// pair of class probabilities per step tag (softmax over the two), in order: Qwen's
/// `[p_negative, p_positive]`, a causal LM's in `reward_tokens` order, `[p_good, p_bad]`
/// (vLLM's `returned_token_ids`). warm keeps the step's reward p, the other is 1 - p.
async fn pooling_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: PoolingRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /pooling body: {e}")))?;
    if state.ready.get().is_none() {
        return Err(ApiError::not_ready());
    }
    if !super::scores_are_probabilities(state) {
        return whole_input_pooling(state, req).await;
    }
    if req.classify.flags.requested() == Some(false) {
        return Err(ApiError::unprocessable(
            "a process reward model's steps are served as probabilities: raw logits \
             (`use_activation: false`) are not available",
        ));
    }
    let base64 = base64_requested(req.encoding_format.as_deref())?;
    let positive = state
        .ready
        .get()
        .and_then(|r| r.scorer.step_spec().map(|s| s.positive()))
        .unwrap_or(1);
    let request = req.classify.scoring_request()?;
    let outcome = pipeline::run(state, "vllm_pooling", request).await?;
    let data: Vec<Value> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let pair = |p: f32| {
                let mut pair = [1.0 - p; 2];
                pair[positive] = p;
                pair
            };
            let pairs: Vec<[f32; 2]> = s.steps.iter().flatten().map(|&p| pair(p)).collect();
            let data = if base64 {
                float_array(pairs.as_flattened(), true)
            } else {
                json!(pairs)
            };
            json!({"index": index, "object": "pooling", "data": data})
        })
        .collect();
    Ok(list_response(state, "pool", &outcome, data))
}

fn model_name(state: &AppState) -> String {
    state.model_name.clone()
}

/// vLLM's list envelope around `data` (classify, score).
fn list_response(
    state: &AppState,
    prefix: &str,
    outcome: &ScoringOutcome,
    data: Vec<Value>,
) -> Response {
    outcome.respond(json!({
        "id": request_id(prefix),
        "object": "list",
        "created": unix_time(),
        "model": model_name(state),
        "data": data,
        "usage": usage(outcome),
    }))
}

fn usage(outcome: &ScoringOutcome) -> Value {
    json!({
        "prompt_tokens": outcome.prompt_tokens(),
        "total_tokens": outcome.prompt_tokens(),
        "completion_tokens": 0,
        "prompt_tokens_details": null,
    })
}

/// `truncate_prompt_tokens`: absent = no truncation (too long is an error), -1 = the
/// model's maximum, k = the last (or first, with `truncation_side`) k tokens.
fn truncation(tokens: Option<i64>) -> Result<(Option<bool>, Option<usize>), ApiError> {
    match tokens {
        None => Ok((None, None)),
        Some(-1) => Ok((Some(true), None)),
        Some(k) if k >= 1 => Ok((Some(true), Some(k as usize))),
        Some(k) => Err(ApiError::bad_request(format!(
            "truncate_prompt_tokens {k}: expected -1 or a positive number"
        ))),
    }
}

#[utoipa::path(post, path = "/v1/classify", tag = "vLLM", request_body = crate::server::compat::schema::VllmClassifyRequest,
    responses((status = 200, body = crate::server::compat::schema::VllmClassifyResponse), crate::server::compat::schema::VllmErrors))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    classify_inner(&state, body.map(|ApiJson(b)| b))
        .await
        .unwrap_or_else(|e| ErrorShape::Vllm.respond(e))
}

async fn classify_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: ClassifyRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /classify body: {e}")))?;
    let outcome = pipeline::run(state, "vllm_classify", req.scoring_request()?).await?;
    let (num_labels, problem_type, labels) = match state.ready.get() {
        Some(r) => (
            r.scorer.num_labels(),
            r.scorer.problem_type().map(str::to_string),
            r.scorer.labels().to_vec(),
        ),
        None => (1, None, Vec::new()),
    };
    // vLLM: on by default, except for regression models (and probabilities, here).
    let on = req.flags.requested().unwrap_or(
        problem_type.as_deref() != Some("regression") && !super::scores_are_probabilities(state),
    );
    let activation = match (on, problem_type.as_deref()) {
        (false, _) => Activation::None,
        (true, Some("multi_label_classification")) => Activation::Sigmoid,
        (true, _) => Activation::for_labels(num_labels),
    };
    let data: Vec<Value> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let probs = activation.apply(&s.logits);
            let best = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            json!({"index": index, "label": labels.get(best), "probs": probs, "num_classes": probs.len()})
        })
        .collect();
    Ok(list_response(state, "classify", &outcome, data))
}

/// `/pooling` for a model that scores whole inputs, as lmdeploy answers it for its reward
/// models (InternLM2's, POLAR, Qwen2.5-Math-RM; POLAR's client reads `data[i].data`): each
/// item's `data` is the raw score at the last token, a number (the logits, a list, for a
/// model with several labels). vLLM's per-token rewards for these classes (`[[s0], [s1],
/// ...]`, ALL pooling) are not computed: the head runs at the last token only.
async fn whole_input_pooling(
    state: &Arc<AppState>,
    req: PoolingRequest,
) -> Result<Response, ApiError> {
    if req.classify.flags.requested() == Some(true) {
        return Err(ApiError::unprocessable(
            "/pooling answers this model's raw scores, as lmdeploy does: for an activation \
             use /classify",
        ));
    }
    let base64 = base64_requested(req.encoding_format.as_deref())?;
    let request = req.classify.scoring_request()?;
    let outcome = pipeline::run(state, "lmdeploy_pooling", request).await?;
    let data: Vec<Value> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let data = match (base64, s.logits.as_slice()) {
                (false, [score]) => json!(score),
                (_, logits) => float_array(logits, base64),
            };
            json!({"index": index, "object": "pooling", "data": data})
        })
        .collect();
    Ok(list_response(state, "pool", &outcome, data))
}

/// The fields that mark a body as vLLM's /score request: `ScoreRequest`'s fields and aliases
/// (kept as a list: deserializing to test would copy a native body through the flatten).
pub const SCORE_FIELDS: [&str; 7] = [
    "queries",
    "text_1",
    "data_1",
    "documents",
    "text_2",
    "data_2",
    "items",
];

#[derive(Deserialize)]
struct ScoreRequest {
    #[serde(default, alias = "text_1", alias = "data_1")]
    queries: Option<Value>,
    #[serde(default, alias = "text_2", alias = "data_2", alias = "items")]
    documents: Option<Value>,
    #[serde(default, deserialize_with = "crate::server::api::integer")]
    truncate_prompt_tokens: Option<i64>,
    #[serde(flatten)]
    flags: ActivationFlags,
}

/// The (query, document) pairs of /score: 1 x N broadcasts, N x N zips.
fn score_pairs(queries: Vec<String>, documents: Vec<String>) -> Result<Vec<Input>, ApiError> {
    let pair = |q: &String, d: &String| Input::Pair {
        prompt: q.clone(),
        response: d.clone(),
    };
    match (queries.len(), documents.len()) {
        (1, _) => Ok(documents.iter().map(|d| pair(&queries[0], d)).collect()),
        (q, d) if q == d => Ok(queries
            .iter()
            .zip(&documents)
            .map(|(q, d)| pair(q, d))
            .collect()),
        (q, d) => Err(ApiError::bad_request(format!(
            "{q} queries and {d} documents: give one query, or as many queries as documents"
        ))),
    }
}

/// Sigmoid of the reward unless switched off (vLLM's score head ignores `problem_type`), or
/// unless the scores are probabilities already and no activation was asked for.
fn score_activation(state: &AppState, flags: &ActivationFlags) -> Activation {
    if flags
        .requested()
        .unwrap_or(!super::scores_are_probabilities(state))
    {
        Activation::Sigmoid
    } else {
        Activation::None
    }
}

#[utoipa::path(post, path = "/score", tag = "vLLM", request_body = crate::server::compat::schema::VllmScoreRequest,
    responses((status = 200, body = crate::server::compat::schema::VllmScoreResponse), crate::server::compat::schema::VllmErrors))]
pub async fn score(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    score_body(&state, body.map(|ApiJson(b)| b)).await
}

pub async fn score_body(state: &Arc<AppState>, body: Result<Value, ApiError>) -> Response {
    score_inner(state, body)
        .await
        .unwrap_or_else(|e| ErrorShape::Vllm.respond(e))
}

async fn score_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: ScoreRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /score body: {e}")))?;
    let (Some(q), Some(d)) = (&req.queries, &req.documents) else {
        return Err(ApiError::bad_request(
            "give `queries` and `documents` (or `text_1` and `text_2`)",
        ));
    };
    let inputs = score_pairs(string_list(q, "queries")?, string_list(d, "documents")?)?;
    let (truncate, max_length) = truncation(req.truncate_prompt_tokens)?;
    let request = ScoringRequest {
        truncate,
        max_length,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "vllm_score", request).await?;
    let activation = score_activation(state, &req.flags);
    let data: Vec<Value> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| json!({"index": index, "object": "score", "score": activation.apply(&[s.value])[0]}))
        .collect();
    Ok(list_response(state, "score", &outcome, data))
}

#[derive(Deserialize)]
struct RerankRequest {
    query: String,
    documents: Value,
    #[serde(default, deserialize_with = "crate::server::api::saturating_count")]
    top_n: Option<usize>,
    #[serde(default, deserialize_with = "crate::server::api::integer")]
    truncate_prompt_tokens: Option<i64>,
    #[serde(flatten)]
    flags: ActivationFlags,
}

pub async fn rerank_body(state: &Arc<AppState>, body: Result<Value, ApiError>) -> Response {
    rerank_inner(state, body)
        .await
        .unwrap_or_else(|e| ErrorShape::Vllm.respond(e))
}

async fn rerank_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: RerankRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /rerank body: {e}")))?;
    let documents = string_list(&req.documents, "documents")?;
    let inputs = score_pairs(vec![req.query.clone()], documents.clone())?;
    let (truncate, max_length) = truncation(req.truncate_prompt_tokens)?;
    let request = ScoringRequest {
        truncate,
        max_length,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "vllm_rerank", request).await?;
    let activation = score_activation(state, &req.flags);
    let mut ranked: Vec<(usize, f32)> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(i, s)| (i, activation.apply(&[s.value])[0]))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // vLLM: top_n 0 (the default) means all.
    if let Some(n) = req.top_n.filter(|&n| n > 0) {
        ranked.truncate(n);
    }
    let results: Vec<Value> = ranked
        .iter()
        .map(|&(index, score)| {
            json!({"index": index, "document": {"text": documents[index], "multi_modal": null}, "relevance_score": score})
        })
        .collect();
    let body = json!({
        "id": request_id("rerank"),
        "model": model_name(state),
        "usage": {"prompt_tokens": outcome.prompt_tokens(), "total_tokens": outcome.prompt_tokens()},
        "results": results,
    });
    Ok((
        outcome
            .timings
            .headers(outcome.scores.len(), outcome.prompt_tokens()),
        Json(body),
    )
        .into_response())
}
