//! SGLang's routes for a reward model, whose "embedding" is the head's raw output:
//! - native `POST /classify` with `text` (SGLang's `EmbeddingReqInput`): for one string one
//!   object, for a list an array in input order, each `{"embedding", "meta_info"}`; errors
//!   `{"error": {"message"}}`. POLAR's `RewardModelClient` (server_type "sglang", its
//!   default) posts `{"model", "text": [...]}` and reads `embedding[0]`.
//! - OpenAI-compatible `POST /v1/embeddings` (`{"model", "input"}`): verl's reward loop with
//!   the sglang engine posts one templated sample and reads `data[-1].embedding[-1]`;
//!   errors in SGLang's OpenAI shape `{"object": "error", "message", "type", "param", "code"}`.
//!
//! Text is encoded as it is, with the tokenizer's special tokens, as SGLang does: no chat
//! template.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error_shape::ErrorShape;
use super::{base64_requested, float_array, id_inputs, input_list, request_id, string_list};
use crate::server::error::ApiError;
use crate::server::pipeline::{self, ApiJson, ScoringRequest};
use crate::server::AppState;
use crate::text::Input;

/// Whether a /classify body is SGLang's native one rather than vLLM's (`input`, `messages`).
pub fn is_native_body(body: &Value) -> bool {
    let has = |key| body.get(key).is_some();
    (has("text") || has("input_ids")) && !has("input") && !has("messages")
}

/// The fields of `EmbeddingReqInput` warm reads; the others (`model`, `sampling_params`,
/// ...) are ignored, as SGLang ignores what its request type does not declare.
#[derive(Deserialize)]
struct NativeRequest {
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    input_ids: Option<Value>,
    #[serde(default)]
    rid: Option<Value>,
}

/// The texts, and whether the request was one string (answered with one object).
fn texts(text: &Value) -> Result<(Vec<String>, bool), ApiError> {
    if let Value::Array(items) = text {
        if items.iter().any(Value::is_array) {
            return Err(ApiError::bad_request(
                "`text`: pairs of texts (a cross-encoder's) are not taken on /classify: send \
                 each input as one string, or use /rerank",
            ));
        }
    }
    Ok((string_list(text, "text")?, text.is_string()))
}

/// `meta_info.id` of each input: the request's `rid` (a string for one text, a list of as
/// many for a list), else one made up.
fn request_ids(rid: Option<&Value>, count: usize, single: bool) -> Result<Vec<String>, ApiError> {
    match rid {
        None | Some(Value::Null) => Ok((0..count).map(|_| request_id("classify")).collect()),
        Some(Value::String(id)) if single => Ok(vec![id.clone()]),
        Some(Value::Array(ids))
            if !single && ids.len() == count && ids.iter().all(Value::is_string) =>
        {
            Ok(ids
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect())
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "`rid` must be a string for one text and a list of {count} strings for {count} texts"
        ))),
    }
}

/// `POST /classify` with SGLang's native body.
pub async fn classify_body(state: &Arc<AppState>, body: Value) -> Response {
    classify_inner(state, body)
        .await
        .unwrap_or_else(|e| ErrorShape::Sglang.respond(e))
}

async fn classify_inner(state: &Arc<AppState>, body: Value) -> Result<Response, ApiError> {
    let req: NativeRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid /classify body: {e}")))?;
    let (inputs, single) = match (&req.text, &req.input_ids) {
        (Some(text), None) => {
            let (texts, single) = texts(text)?;
            (texts.into_iter().map(Input::Text).collect(), single)
        }
        (None, Some(ids)) => id_inputs(ids, "input_ids").unwrap_or_else(|| {
            Err(ApiError::bad_request(
                "`input_ids` must be a list of token ids or a list of such lists",
            ))
        })?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "text and input_ids cannot be provided at the same time",
            ))
        }
        (None, None) => return Err(ApiError::bad_request("give `text` or `input_ids`")),
    };
    let ids = request_ids(req.rid.as_ref(), inputs.len(), single)?;
    // POLAR's verl recipe sends a whole training batch (1,024 samples) in one request: exempt
    // from --max-client-batch-size, as /get_reward is (the payload limit still applies).
    let request = ScoringRequest {
        client_batch_limit: false,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "sglang_classify", request).await?;
    let latency = outcome.timings.total.as_secs_f64();
    let mut items: Vec<Value> = outcome
        .scores
        .iter()
        .zip(&outcome.input_tokens)
        .zip(ids)
        .map(|((score, &tokens), id)| {
            json!({
                "embedding": score.logits,
                "meta_info": {"id": id, "prompt_tokens": tokens, "e2e_latency": latency},
            })
        })
        .collect();
    let body = match (single, items.len()) {
        (true, 1) => items.remove(0),
        _ => Value::Array(items),
    };
    Ok(outcome.respond(body))
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<Value>,
}

#[utoipa::path(post, path = "/v1/embeddings", tag = "SGLang", request_body = crate::server::compat::schema::EmbeddingsRequest,
    responses((status = 200, body = crate::server::compat::schema::EmbeddingsResponse), crate::server::compat::schema::OpenAiFlatErrors))]
/// `POST /v1/embeddings`: each input's logits as its embedding, OpenAI's envelope.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    embeddings_inner(&state, body.map(|ApiJson(b)| b))
        .await
        .unwrap_or_else(|e| ErrorShape::OpenAiFlat.respond(e))
}

async fn embeddings_inner(
    state: &Arc<AppState>,
    body: Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let req: EmbeddingsRequest = serde_json::from_value(body?)
        .map_err(|e| ApiError::bad_request(format!("invalid /v1/embeddings body: {e}")))?;
    let input = req
        .input
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("give `input`: a string or a list of strings"))?;
    let (inputs, _) = input_list(input, "input")?;
    if req.dimensions.as_ref().is_some_and(|d| !d.is_null()) {
        return Err(ApiError::bad_request(
            "`dimensions`: a reward model's embedding is its head's output, which has a fixed size",
        ));
    }
    let base64 = base64_requested(req.encoding_format.as_deref())?;
    let request = ScoringRequest::new(inputs);
    let outcome = pipeline::run(state, "sglang_embeddings", request).await?;
    let data: Vec<Value> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, score)| {
            json!({"object": "embedding", "embedding": float_array(&score.logits, base64),
                   "index": index})
        })
        .collect();
    Ok(outcome.respond(json!({
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": outcome.prompt_tokens(), "total_tokens": outcome.prompt_tokens()},
    })))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn tells_sglang_bodies_from_vllm_ones() {
        assert!(is_native_body(&json!({"model": "m", "text": ["a"]})));
        assert!(is_native_body(&json!({"input_ids": [[1, 2]]})));
        assert!(!is_native_body(&json!({"model": "m", "input": ["a"]})));
        assert!(!is_native_body(&json!({"messages": [], "text": "a"})));
    }

    #[test]
    fn one_string_is_one_input_and_a_list_keeps_its_order() {
        assert_eq!(texts(&json!("a")).unwrap(), (vec!["a".to_string()], true));
        let (list, single) = texts(&json!(["a", "b"])).unwrap();
        assert_eq!((list, single), (vec!["a".into(), "b".into()], false));
        for bad in [json!([]), json!(5), json!([["q", "d"]]), json!(["a", 1])] {
            let e = texts(&bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn request_ids_follow_rid() {
        assert_eq!(
            request_ids(Some(&json!("r")), 1, true).unwrap(),
            vec!["r".to_string()]
        );
        assert_eq!(
            request_ids(Some(&json!(["a", "b"])), 2, false).unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(request_ids(None, 3, false).unwrap().len(), 3);
        assert!(request_ids(Some(&json!("r")), 2, false).is_err());
        assert!(request_ids(Some(&json!(["a"])), 2, false).is_err());
    }
}
