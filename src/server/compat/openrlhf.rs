//! OpenRLHF's remote reward model: `POST /get_reward` with `{"query": [...], "prompts"?,
//! "labels"?}` answered `{"rewards", "scores", "extra_logs"}` with raw rewards. The queries
//! carry the actor's chat template already, so they are tokenized without special tokens,
//! and too-long ones are truncated (as OpenRLHF's own serve_rm does) rather than refused.
//! Trainers send batches of thousands: the client batch limit does not apply here (the
//! payload limit does).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};

use crate::server::error::ApiError;
use crate::server::pipeline::{self, ApiJson, ScoringRequest};
use crate::server::AppState;
use crate::text::Input;

#[utoipa::path(post, path = "/get_reward", tag = "OpenRLHF", request_body = crate::server::compat::schema::GetRewardRequest,
    responses((status = 200, body = crate::server::compat::schema::GetRewardResponse), crate::server::compat::schema::WarmErrors))]
pub async fn get_reward(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let queries: Vec<Input> = match body.get("query") {
        Some(Value::String(s)) => vec![Input::Text(s.clone())],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(|s| Input::Text(s.to_string()))
                    .ok_or_else(|| ApiError::bad_request(format!("query[{i}]: expected a string")))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::bad_request("`query` must be a list of strings")),
    };
    let request = ScoringRequest {
        truncate: Some(true),
        add_special_tokens: false,
        client_batch_limit: false,
        ..ScoringRequest::new(queries)
    };
    let outcome = pipeline::run(&state, "get_reward", request).await?;
    let rewards: Vec<f32> = outcome.scores.iter().map(|s| s.value).collect();
    let body = json!({"rewards": rewards, "scores": rewards, "extra_logs": {}});
    Ok(outcome.respond(body))
}
