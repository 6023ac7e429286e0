//! Text Embeddings Inference: `POST /predict`, `POST /rerank` (`{"query", "texts"}`), and
//! Hugging Face InferenceClient's text classification on `POST /`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::activation::Activation;
use crate::server::error::ApiError;
use crate::server::pipeline::{self, parse_direction, ApiJson, ScoringRequest};
use crate::server::AppState;
use crate::text::Input;

#[derive(Deserialize)]
struct PredictRequest {
    inputs: Value,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<String>,
}

#[derive(Serialize)]
struct LabelScore {
    score: f32,
    label: String,
}

fn text_pair(items: &[Value], what: &str) -> Result<Input, ApiError> {
    let s = |v: &Value| v.as_str().map(str::to_string);
    match items {
        [a] => s(a).map(Input::Text),
        [a, b] => s(a)
            .zip(s(b))
            .map(|(prompt, response)| Input::Pair { prompt, response }),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::unprocessable(format!(
            "{what}: expected a text or a [text, text_pair] of strings"
        ))
    })
}

/// TEI's `inputs`: a text, a `[text, text_pair]`, or a batch of those (a list whose first
/// element is a list). Returns the inputs and whether it was a batch.
fn predict_inputs(inputs: &Value) -> Result<(Vec<Input>, bool), ApiError> {
    match inputs {
        Value::String(s) => Ok((vec![Input::Text(s.clone())], false)),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::bad_request("`inputs` cannot be empty"))
        }
        Value::Array(items) if items[0].is_array() => {
            let batch = items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Array(inner) => text_pair(inner, &format!("inputs[{i}]")),
                    Value::String(s) => Ok(Input::Text(s.clone())),
                    _ => Err(ApiError::unprocessable(format!(
                        "inputs[{i}]: expected a text or a pair"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((batch, true))
        }
        Value::Array(items) => Ok((vec![text_pair(items, "inputs")?], false)),
        _ => Err(ApiError::unprocessable(
            "`inputs` must be a text, a [text, text_pair] or a list of those",
        )),
    }
}

fn labelled(state: &AppState, logits: &[f32], activation: Activation) -> Vec<LabelScore> {
    let labels = state
        .ready
        .get()
        .map(|r| r.scorer.labels().to_vec())
        .unwrap_or_default();
    let mut out: Vec<LabelScore> = activation
        .apply(logits)
        .into_iter()
        .enumerate()
        .map(|(i, score)| LabelScore {
            score,
            label: labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{i}")),
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

fn num_labels(state: &AppState) -> usize {
    state.ready.get().map_or(1, |r| r.scorer.num_labels())
}

#[utoipa::path(post, path = "/predict", tag = "TEI", request_body = crate::server::compat::schema::TeiPredictRequest,
    responses((status = 200, body = crate::server::compat::schema::TeiPredictResponse), crate::server::compat::schema::WarmErrors))]
pub async fn predict(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    predict_body(&state, body).await
}

pub async fn predict_body(state: &Arc<AppState>, body: Value) -> Result<Response, ApiError> {
    let req: PredictRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::unprocessable(format!("invalid /predict body: {e}")))?;
    let (inputs, batch) = predict_inputs(&req.inputs)?;
    let request = ScoringRequest {
        truncate: req.truncate,
        direction: parse_direction(req.truncation_direction.as_deref())?,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "tei_predict", request).await?;
    let activation = if req.raw_scores || super::scores_are_probabilities(state) {
        Activation::None
    } else {
        Activation::for_labels(num_labels(state))
    };
    let rows: Vec<Vec<LabelScore>> = outcome
        .scores
        .iter()
        .map(|s| labelled(state, &s.logits, activation))
        .collect();
    Ok(if batch {
        outcome.respond(rows)
    } else {
        outcome.respond(rows.into_iter().next().unwrap_or_default())
    })
}

#[derive(Deserialize)]
struct RerankRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<String>,
}

#[derive(Serialize)]
struct RankedText {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    score: f32,
}

/// TEI rerank: each text scored as the pair (query, text), formatted like a
/// prompt/response pair; sorted best first.
pub async fn rerank_body(state: &Arc<AppState>, body: Value) -> Result<Response, ApiError> {
    let req: RerankRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::unprocessable(format!("invalid /rerank body: {e}")))?;
    if req.texts.is_empty() {
        return Err(ApiError::bad_request("`texts` cannot be empty"));
    }
    let inputs = req
        .texts
        .iter()
        .map(|t| Input::Pair {
            prompt: req.query.clone(),
            response: t.clone(),
        })
        .collect();
    let request = ScoringRequest {
        truncate: req.truncate,
        direction: parse_direction(req.truncation_direction.as_deref())?,
        ..ScoringRequest::new(inputs)
    };
    let outcome = pipeline::run(state, "tei_rerank", request).await?;
    let activation = if req.raw_scores || super::scores_are_probabilities(state) {
        Activation::None
    } else {
        Activation::Sigmoid
    };
    let mut ranked: Vec<RankedText> = outcome
        .scores
        .iter()
        .enumerate()
        .map(|(index, s)| RankedText {
            index,
            text: req.return_text.then(|| req.texts[index].clone()),
            score: activation.apply(&[s.value])[0],
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    Ok(outcome.respond(ranked))
}

#[derive(Deserialize)]
struct TextClassificationRequest {
    inputs: Value,
    #[serde(default)]
    parameters: Option<TextClassificationParameters>,
}

#[derive(Deserialize, Default)]
struct TextClassificationParameters {
    #[serde(default)]
    function_to_apply: Option<String>,
    #[serde(default, deserialize_with = "crate::server::api::saturating_count")]
    top_k: Option<usize>,
}

/// Hugging Face's `InferenceClient.text_classification`: `{"inputs": text, "parameters":
/// {"function_to_apply", "top_k"}}`, answered with the Inference API's nested list
/// `[[{"label", "score"}, ...]]` (the client reads element 0).
pub async fn text_classification_body(
    state: &Arc<AppState>,
    body: Value,
) -> Result<Response, ApiError> {
    // serde would read a struct from a list too (by position): `parameters` is an object.
    if !matches!(
        body.get("parameters"),
        None | Some(Value::Null | Value::Object(_))
    ) {
        return Err(ApiError::unprocessable(
            "`parameters` must be an object: {\"function_to_apply\", \"top_k\"}",
        ));
    }
    let req: TextClassificationRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::unprocessable(format!("invalid text classification body: {e}")))?;
    let inputs: Vec<Input> = match &req.inputs {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(|s| Input::Text(s.to_string()))
                    .ok_or_else(|| {
                        ApiError::unprocessable(format!("inputs[{i}]: expected a string"))
                    })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::unprocessable(
                "`inputs` must be a string or a list of strings",
            ))
        }
    };
    let parameters = req.parameters.unwrap_or_default();
    let activation = match parameters.function_to_apply.as_deref() {
        None if super::scores_are_probabilities(state) => Activation::None,
        None => {
            let problem_type = state
                .ready
                .get()
                .and_then(|r| r.scorer.problem_type().map(str::to_string));
            Activation::pipeline_default(num_labels(state), problem_type.as_deref())
        }
        Some("none") => Activation::None,
        Some("sigmoid") => Activation::Sigmoid,
        Some("softmax") => Activation::Softmax,
        Some(other) => {
            return Err(ApiError::unprocessable(format!(
                "function_to_apply '{other}': expected sigmoid, softmax or none"
            )))
        }
    };
    let outcome = pipeline::run(state, "text_classification", ScoringRequest::new(inputs)).await?;
    let rows: Vec<Vec<LabelScore>> = outcome
        .scores
        .iter()
        .map(|s| {
            let mut row = labelled(state, &s.logits, activation);
            if let Some(k) = parameters.top_k {
                row.truncate(k);
            }
            row
        })
        .collect();
    Ok(outcome.respond(rows))
}
