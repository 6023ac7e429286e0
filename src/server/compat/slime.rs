//! slime's remote reward model (`--rm-type remote_rm --rm-url URL`;
//! slime/rollout/rm_hub/__init__.py::remote_rm): every sample is posted alone as
//! `{"prompt", "response", "label"}` and the JSON answer is the reward, used as it is (a
//! number). `prompt` is the sample's: the dataset's text or message list, or, with
//! slime's `--apply-chat-template`, the policy's chat template already applied (with the
//! generation prompt); `response` is the generated text; `label` the dataset's answer,
//! which a reward model does not read.
//!
//! The body does not say whether the prompt is templated, so the URL does:
//! `POST /remote_rm` takes the prompt as the user's turn (a message list as the
//! conversation) and formats it with the response as native pairs are (the chat
//! template); `POST /remote_rm?prompt=templated` scores prompt + response as text already
//! formatted, without special tokens added, as `/get_reward` does. An input over the
//! limit is truncated (the end, where a decoder's reward is read, is kept): slime retries
//! a failed request ten times and then stops the rollout.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::server::error::ApiError;
use crate::server::pipeline::{self, ApiJson, ScoringRequest};
use crate::server::AppState;
use crate::text::{Input, Message};

/// The query string: how to read `prompt`.
#[derive(Deserialize)]
pub struct RemoteRmParams {
    #[serde(default)]
    prompt: Option<String>,
}

#[utoipa::path(post, path = "/remote_rm", tag = "slime", request_body = crate::server::compat::schema::RemoteRmRequest,
    params(("prompt" = Option<crate::server::compat::schema::RemoteRmPrompt>, Query, description = "`raw` (default) or `templated`")),
    responses((status = 200, body = f32, content_type = "application/json", description = "the reward"), crate::server::compat::schema::WarmErrors))]
/// `POST /remote_rm`.
pub async fn remote_rm(
    State(state): State<Arc<AppState>>,
    params: Result<Query<RemoteRmParams>, QueryRejection>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    // axum's own rejection is plain text: answered in JSON like every other error.
    let Query(params) = params
        .map_err(|e| ApiError::bad_request(format!("the query string: {}", e.body_text())))?;
    let templated = match params.prompt.as_deref() {
        None | Some("raw") => false,
        Some("templated") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "?prompt={other}: expected 'raw' (the default: the prompt is the user's turn) \
                 or 'templated' (the policy's chat template is applied already)"
            )))
        }
    };
    let response = match body.get("response") {
        Some(Value::String(response)) => response.clone(),
        _ => return Err(ApiError::bad_request("give 'response': the generated text")),
    };
    let input = match (body.get("prompt"), templated) {
        (Some(Value::String(prompt)), true) => Input::Text(format!("{prompt}{response}")),
        (Some(Value::String(prompt)), false) => Input::Pair {
            prompt: prompt.clone(),
            response,
        },
        (Some(Value::Array(_)), true) => {
            return Err(ApiError::bad_request(
                "?prompt=templated takes the prompt as text; a message list is sent without it",
            ))
        }
        (Some(messages @ Value::Array(_)), false) => {
            let mut messages: Vec<Message> =
                serde_json::from_value(messages.clone()).map_err(|e| {
                    ApiError::bad_request(format!(
                        "'prompt' as a list must hold {{\"role\", \"content\"}} messages: {e}"
                    ))
                })?;
            messages.push(Message {
                role: "assistant".into(),
                content: response,
            });
            Input::Messages(messages)
        }
        _ => {
            return Err(ApiError::bad_request(
                "give 'prompt': a string or a list of {\"role\", \"content\"} messages",
            ))
        }
    };
    let request = ScoringRequest {
        truncate: Some(true),
        add_special_tokens: !templated,
        ..ScoringRequest::new(vec![input])
    };
    let outcome = pipeline::run(&state, "remote_rm", request).await?;
    // One input in, one score out (the pipeline answers every input or fails).
    let reward = outcome.scores.first().map(|score| score.value);
    Ok(outcome.respond(json!(reward)))
}
