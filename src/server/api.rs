//! Request and response bodies of the native API, and the OpenAPI document made from them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One chat message.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `POST /v1/score`. Each input is a pre-formatted string, `{"prompt", "response"}`,
/// `{"messages": [...]}` or `{"input_ids": [...]}` (token ids, scored as given); for a process reward model, `{"prompt", "steps": [...]}` or
/// `{"messages", "steps"}` give the response as its steps (one whose steps are tokenized
/// apart, TRL's, takes `{"prompt", "steps"}` or `{"prompt", "response"}` only).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ScoreRequest {
    #[schema(value_type = Vec<Object>, example = json!(["text", {"prompt": "2+2?", "response": "4"}]))]
    pub inputs: Vec<serde_json::Value>,
    /// Truncate inputs over the maximum length instead of refusing them (422).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `left` keeps the end (default for decoders), `right` the start (default for encoders).
    #[serde(default)]
    pub truncation_direction: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreResponse {
    /// Raw reward logits, one per input (a process reward model's weakest step reward).
    pub scores: Vec<f32>,
    /// With `--combine predictions`: the members' weighted standard deviation per input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<Vec<f32>>,
    /// A process reward model's: each input's step rewards, in order (`scores` holds the
    /// weakest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_scores: Option<Vec<Vec<f32>>>,
    /// ArmoRM's: each input's objectives' rewards (its regression layer's outputs, in the
    /// order of the model card's attributes), which the gate weighs into `scores`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective_scores: Option<Vec<Vec<f32>>>,
    pub model: String,
    pub usage: Usage,
}

/// `POST /v1/rerank` (best-of-N): one prompt (or conversation) and N candidate responses.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RerankRequest {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    pub responses: Vec<Candidate>,
    #[serde(default)]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<String>,
}

/// A response to rank: its text, or (a process reward model) its steps.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Candidate {
    Text(String),
    Steps(Vec<String>),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResult {
    pub index: usize,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<f32>,
    /// A process reward model's step rewards (`score` is the weakest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_scores: Option<Vec<f32>>,
    /// ArmoRM's objectives' rewards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective_scores: Option<Vec<f32>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResponse {
    /// Sorted by score, best first.
    pub results: Vec<RerankResult>,
    pub best_index: usize,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

/// The error statuses of the scoring routes, all with an [`ErrorResponse`] body: only its
/// OpenAPI description is used.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ScoringErrors {
    /// Malformed JSON, an empty input list or a malformed input (named by index).
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// A missing or wrong API key (`--api-key`).
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The body did not all arrive within `--read-timeout`.
    #[response(status = 408)]
    RequestTimeout(ErrorResponse),
    /// Over `--payload-limit` or `--max-client-batch-size`.
    #[response(status = 413)]
    TooLarge(ErrorResponse),
    /// An input too long without truncation, empty once tokenized, or rejected by the chat
    /// template.
    #[response(status = 422)]
    Unprocessable(ErrorResponse),
    /// More than `--max-concurrent-requests` in flight.
    #[response(status = 429)]
    Overloaded(ErrorResponse),
    /// The model is still loading.
    #[response(status = 503)]
    NotReady(ErrorResponse),
    /// Over `--request-timeout`.
    #[response(status = 504)]
    Timeout(ErrorResponse),
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "warm",
        description = "Reward-model server for weight-averaged reward models (WARM)"
    ),
    paths(
        super::compat::v1_score,
        super::compat::v1_rerank,
        super::native::health,
        super::native::info
    ),
    components(schemas(
        ScoreRequest,
        ScoreResponse,
        RerankRequest,
        Candidate,
        RerankResponse,
        RerankResult,
        Usage,
        ChatMessage,
        ErrorResponse
    ))
)]
pub struct ApiDoc;
