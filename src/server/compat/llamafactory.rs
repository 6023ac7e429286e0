//! LLaMA-Factory's reward API. PPO with `reward_model_type: api` decodes each query and
//! response with the policy's tokenizer (`skip_special_tokens=False`: the chat template's
//! tokens stay as text) and posts `{"model": "model", "messages": [text, ...]}` to the URL
//! it is given, reading `scores` (train/ppo/ppo_utils.py::get_rewards_from_server).
//! LLaMA-Factory's own API server answers it on `POST /v1/score/evaluation` (api/app.py):
//! the texts tokenized without special tokens, truncated to `max_length`, the value head
//! read at the last token (chat/hf_engine.py::_get_scores), answered
//! `{"id": "scoreval-...", "object": "score.evaluation", "model", "scores"}`; errors are
//! FastAPI's `{"detail": message}`.
//!
//! warm truncates as `/get_reward` does (from the start for decoders: the end, where the
//! reward is read, is kept; LLaMA-Factory's tokenizer keeps the start), and a PPO batch is
//! exempt from the client batch limit.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error_shape::ErrorShape;
use super::{request_id, string_list};
use crate::server::error::ApiError;
use crate::server::pipeline::{self, ApiJson, ScoringRequest};
use crate::server::AppState;
use crate::text::Input;

/// `ScoreEvaluationRequest` (api/protocol.py).
#[derive(Deserialize)]
struct ScoreEvaluationRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default, deserialize_with = "crate::server::api::integer")]
    max_length: Option<i64>,
}

#[utoipa::path(post, path = "/v1/score/evaluation", tag = "LLaMA-Factory", request_body = crate::server::compat::schema::ScoreEvaluationRequest,
    responses((status = 200, body = crate::server::compat::schema::ScoreEvaluationResponse), crate::server::compat::schema::FastApiErrors))]
/// `POST /v1/score/evaluation`.
pub async fn score_evaluation(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    score_evaluation_inner(&state, body.map(|ApiJson(b)| b))
        .await
        .unwrap_or_else(|e| ErrorShape::FastApi.respond(e))
}

async fn score_evaluation_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: ScoreEvaluationRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /v1/score/evaluation body: {e}")))?;
    let messages = req
        .messages
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("give `messages`: a list of texts"))?;
    let texts = string_list(messages, "messages")?;
    let max_length = match req.max_length {
        None => None,
        Some(n) if n > 0 => usize::try_from(n).ok(),
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "max_length {n}: expected a positive number"
            )))
        }
    };
    let request = ScoringRequest {
        truncate: Some(true),
        add_special_tokens: false,
        max_length,
        client_batch_limit: false,
        ..ScoringRequest::new(texts.into_iter().map(Input::Text).collect())
    };
    let outcome = pipeline::run(state, "score_evaluation", request).await?;
    let scores: Vec<f32> = outcome.scores.iter().map(|s| s.value).collect();
    let model = req.model.unwrap_or_else(|| state.model_name.clone());
    Ok(outcome.respond(json!({
        "id": request_id("scoreval"),
        "object": "score.evaluation",
        "model": model,
        "scores": scores,
    })))
}
