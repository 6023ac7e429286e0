//! Request and response bodies of the native API, and the OpenAPI document made from them.

use serde::{Deserialize, Deserializer, Serialize};
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
    /// At most `--max-client-batch-size` (413 beyond).
    #[schema(value_type = Vec<ScoreInput>, min_items = 1,
        example = json!(["text", {"prompt": "2+2?", "response": "4"}]))]
    pub inputs: Vec<serde_json::Value>,
    /// Truncate inputs over the maximum length instead of refusing them (422).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `left` keeps the end (default for decoders), `right` the start (default for encoders).
    #[serde(default)]
    #[schema(value_type = Option<TruncationDirection>)]
    pub truncation_direction: Option<String>,
}

/// One input of `POST /v1/score`, as the OpenAPI document shows it (the server reads inputs
/// itself, to name the one that is malformed: `pipeline::parse_input`).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ScoreInput {
    /// Text formatted already: encoded with the tokenizer's special tokens.
    Text(String),
    Pair(PairInput),
    Conversation(ConversationInput),
    Steps(StepsInput),
    TokenIds(TokenIdsInput),
}

/// A prompt and its response: rendered with the chat template as a user and an assistant
/// turn, or encoded as a text pair by a model without a template.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct PairInput {
    pub prompt: String,
    pub response: String,
}

/// A conversation, rendered with the chat template (422 for a model without one); for a
/// process reward model, `steps` are the last assistant turn's.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ConversationInput {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    #[schema(min_items = 1)]
    pub steps: Option<Vec<String>>,
}

/// A process reward model's input: the prompt and the response's steps (422 for other
/// models).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct StepsInput {
    pub prompt: String,
    #[schema(min_items = 1)]
    pub steps: Vec<String>,
}

/// Token ids as the client tokenized them, scored as given (no special tokens added; an id
/// beyond the vocabulary is a 422).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct TokenIdsInput {
    #[schema(value_type = Vec<TokenId>, min_items = 1)]
    pub input_ids: Vec<u32>,
}

/// A token id of the model's tokenizer: the schema of a u32 (utoipa's derive names u32
/// `int32`, whose range differs).
pub struct TokenId;

impl utoipa::PartialSchema for TokenId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .minimum(Some(0))
            .maximum(Some(u32::MAX))
            .description(Some("A token id of the model's tokenizer."))
            .into()
    }
}

impl ToSchema for TokenId {}

/// Which end of a too-long input truncation cuts: `left` keeps the end, `right` the start,
/// in any case (TEI's clients send `Left`).
#[derive(Deserialize)]
pub struct TruncationDirection;

impl utoipa::PartialSchema for TruncationDirection {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^([Ll][Ee][Ff][Tt]|[Rr][Ii][Gg][Hh][Tt])$"))
            .description(Some(
                "`left` keeps the end of a too-long input, `right` its start (any case).",
            ))
            .into()
    }
}

impl ToSchema for TruncationDirection {}

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
/// The OpenAPI document shows it as [`RerankBody`].
#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    pub responses: Vec<Candidate>,
    #[serde(default, deserialize_with = "saturating_count")]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<String>,
}

/// An optional integer as JSON may write it (`7` or `7.0`, both integers to JSON Schema and
/// to the Python servers whose clients send them), those past `i64` read as its bounds.
pub fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = n.as_i64() {
        return Ok(Some(n));
    }
    match n.as_f64() {
        // `as` saturates (a u64 beyond i64 arrives as a float too).
        Some(f) if f.fract() == 0.0 => Ok(Some(f as i64)),
        _ => Err(serde::de::Error::custom(format!(
            "expected an integer, got {n}"
        ))),
    }
}

/// An optional count that may exceed anything the server holds (`top_n` beyond the
/// responses): any non-negative integer, those past `usize` read as its largest value
/// (serde_json hands them over as floats).
pub fn saturating_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(n) = n.as_u64() {
        return Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)));
    }
    match n.as_f64() {
        // `as` saturates, and a JSON integer may be written 2.0.
        Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(Some(f as usize)),
        _ => Err(serde::de::Error::custom(format!(
            "expected a non-negative integer, got {n}"
        ))),
    }
}

/// `POST /v1/rerank` as the OpenAPI document shows it: a prompt or a conversation (exactly
/// one of them), the responses and the options.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum RerankBody {
    Prompt(PromptRerank),
    Conversation(ConversationRerank),
}

/// Best-of-N after a prompt: each response is scored as `{"prompt", "response"}`.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct PromptRerank {
    pub prompt: String,
    #[serde(flatten)]
    pub options: RerankOptions,
}

/// Best-of-N after a conversation: each response is its next assistant turn.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ConversationRerank {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub options: RerankOptions,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct RerankOptions {
    /// At most `--max-client-batch-size` (413 beyond).
    #[schema(min_items = 1)]
    pub responses: Vec<Candidate>,
    /// How many results to return, best first (all when absent).
    #[serde(default)]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
}

/// A response to rank: its text, or (a process reward model) its steps.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Candidate {
    Text(String),
    Steps(Vec<String>),
}

// By hand: the derive cannot bound the steps' count.
impl utoipa::PartialSchema for Candidate {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || ObjectBuilder::new().schema_type(Type::String);
        OneOfBuilder::new()
            .item(text())
            .item(ArrayBuilder::new().items(text()).min_items(Some(1)))
            .description(Some(
                "A response's text, or (a process reward model) the list of its steps.",
            ))
            .into()
    }
}

impl ToSchema for Candidate {}

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

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "warm",
        description = "Reward-model server for weight-averaged reward models (WARM)"
    ),
    paths(
        super::native::health,
        super::native::root_health,
        super::native::live,
        super::native::info,
        super::native::metrics,
        super::native::openapi
    ),
    components(schemas(
        ScoreRequest,
        ScoreInput,
        PairInput,
        ConversationInput,
        StepsInput,
        TokenIdsInput,
        TokenId,
        TruncationDirection,
        ScoreResponse,
        RerankBody,
        PromptRerank,
        ConversationRerank,
        RerankOptions,
        Candidate,
        RerankResponse,
        RerankResult,
        Usage,
        ChatMessage,
        ErrorResponse
    ))
)]
pub struct ApiDoc;

/// The whole OpenAPI document: warm's routes and the compat routes.
pub fn document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = ApiDoc::openapi();
    doc.merge(super::compat::CompatDoc::openapi());
    doc
}

/// A route's answer that says how the server is (`/health`, `/live`).
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` (ready) or `alive`.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    fn refs(value: &Value, found: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("$ref", Value::String(target)) => {
                            found.insert(target.clone());
                        }
                        _ => refs(v, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_the_document_names_is_in_it() {
        let doc = serde_json::to_value(super::document()).expect("the document serializes");
        let mut found = BTreeSet::new();
        refs(&doc, &mut found);
        assert!(found.len() > 40, "{found:?}");
        for target in found {
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{target}: not a component schema"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{target} is named but not defined"
            );
        }
    }

    #[test]
    fn the_document_lists_every_route_the_server_answers() {
        let doc = serde_json::to_value(super::document()).expect("the document serializes");
        for (path, method) in [
            ("/", "get"),
            ("/", "post"),
            ("/health", "get"),
            ("/live", "get"),
            ("/info", "get"),
            ("/metrics", "get"),
            ("/openapi.json", "get"),
            ("/v1/score", "post"),
            ("/v1/rerank", "post"),
            ("/v2/rerank", "post"),
            ("/predict", "post"),
            ("/rerank", "post"),
            ("/classify", "post"),
            ("/v1/classify", "post"),
            ("/pooling", "post"),
            ("/v1/embeddings", "post"),
            ("/score", "post"),
            ("/get_reward", "post"),
            ("/v1/score/evaluation", "post"),
            ("/remote_rm", "post"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is not in the document"
            );
        }
    }
}
