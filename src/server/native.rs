//! The native routes: /v1/score, /v1/rerank, /health, /live, /info, /metrics,
//! /openapi.json.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::api::{
    Candidate, RerankRequest, RerankResponse, RerankResult, ScoreRequest, ScoreResponse, Usage,
};
use super::error::ApiError;
use super::pipeline::{self, parse_direction, parse_input, ScoringRequest};
use super::AppState;
use crate::text::{Input, Message};
use serde_json::Value;

/// The native score on a parsed body (shared with the route that vLLM also uses).
pub async fn score_value(state: &Arc<AppState>, body: Value) -> Result<Response, ApiError> {
    let body: ScoreRequest = parse_body(body)?;
    let inputs = body
        .inputs
        .iter()
        .enumerate()
        .map(|(i, v)| parse_input(state, v, i))
        .collect::<Result<Vec<_>, _>>()?;
    let request = ScoringRequest {
        truncate: body.truncate,
        direction: parse_direction(body.truncation_direction.as_deref())?,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "score", request).await?;
    let with_uncertainty = outcome.scores.iter().any(|s| s.uncertainty.is_some());
    let response = ScoreResponse {
        scores: outcome.scores.iter().map(|s| s.value).collect(),
        uncertainty: with_uncertainty.then(|| {
            outcome
                .scores
                .iter()
                .map(|s| s.uncertainty.unwrap_or(0.0))
                .collect()
        }),
        step_scores: outcome
            .scores
            .iter()
            .map(|s| s.steps.clone())
            .collect::<Option<Vec<_>>>(),
        objective_scores: outcome
            .scores
            .iter()
            .map(|s| s.objectives.clone())
            .collect::<Option<Vec<_>>>(),
        model: state.model_name.clone(),
        usage: Usage {
            prompt_tokens: outcome.prompt_tokens(),
        },
    };
    Ok(outcome.respond(response))
}

/// The native rerank on a parsed body (shared with the route that vLLM also uses).
pub async fn rerank_value(state: &Arc<AppState>, body: Value) -> Result<Response, ApiError> {
    // Named here: serde's own message for an untagged enum names neither item nor shape.
    let malformed = body["responses"].as_array().and_then(|items| {
        items.iter().position(|item| {
            !(item.is_string()
                || item
                    .as_array()
                    .is_some_and(|s| s.iter().all(Value::is_string)))
        })
    });
    if let Some(i) = malformed {
        return Err(ApiError::bad_request(format!(
            "responses[{i}]: expected a string, or a list of the response's steps (strings)"
        )));
    }
    let body: RerankRequest = parse_body(body)?;
    let responses = body
        .responses
        .iter()
        .enumerate()
        .map(|(i, candidate)| match candidate {
            Candidate::Text(text) => Ok(pipeline::StepsResponse::Text(text.clone())),
            Candidate::Steps(steps) => {
                pipeline::steps_response(state, steps.clone(), &format!("responses[{i}]"))
            }
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let inputs: Vec<Input> = match (&body.prompt, &body.messages) {
        (Some(prompt), None) => responses
            .into_iter()
            .map(|r| r.after_prompt(prompt.clone()))
            .collect(),
        (None, Some(messages)) => responses
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let conversation: Vec<Message> = messages
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                r.after_messages(conversation, &format!("responses[{i}]"))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of 'prompt' or 'messages'",
            ))
        }
    };
    let request = ScoringRequest {
        truncate: body.truncate,
        direction: parse_direction(body.truncation_direction.as_deref())?,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "rerank", request).await?;
    let mut results: Vec<RerankResult> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| RerankResult {
            index,
            score: s.value,
            uncertainty: s.uncertainty,
            step_scores: s.steps.clone(),
            objective_scores: s.objectives.clone(),
        })
        .collect();
    results.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    let best_index = results.first().map_or(0, |r| r.index);
    if let Some(top) = body.top_n {
        results.truncate(top);
    }
    let response = RerankResponse {
        results,
        best_index,
        model: state.model_name.clone(),
        usage: Usage {
            prompt_tokens: outcome.prompt_tokens(),
        },
    };
    Ok(outcome.respond(response))
}

/// A body of the expected shape, or a 400 that says what is wrong with it.
fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "ready", body = super::api::Status),
        (status = 503, description = "loading", body = super::api::ErrorResponse)))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.get().is_some() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
    } else {
        ApiError::not_ready().into_response()
    }
}

/// `GET /`: /health, as TEI answers it.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "ready", body = super::api::Status),
        (status = 503, description = "loading", body = super::api::ErrorResponse)))]
pub async fn root_health(state: State<Arc<AppState>>) -> Response {
    health(state).await
}

#[utoipa::path(get, path = "/live", tag = "operations",
    responses((status = 200, description = "the process runs", body = super::api::Status)))]
pub async fn live() -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "alive"}))).into_response()
}

#[utoipa::path(get, path = "/info", tag = "operations",
    responses((status = 200, description = "model, members, limits", body = Object),
        (status = 401, description = "a missing or wrong API key", body = super::api::ErrorResponse),
        (status = 503, description = "loading", body = super::api::ErrorResponse)))]
pub async fn info(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let ready = state.ready.get().ok_or_else(ApiError::not_ready)?;
    Ok(Json(ready.info.clone()).into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(ready) = state.ready.get() {
        state
            .metrics
            .queue_depth
            .set(ready.engine.queued_inputs() as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "this document", body = Object),
        (status = 401, description = "a missing or wrong API key", body = super::api::ErrorResponse)))]
pub async fn openapi() -> Response {
    Json(super::api::document()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route: see GET /openapi.json",
    )
}

pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not served on this route: see GET /openapi.json"),
    )
}
