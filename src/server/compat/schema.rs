//! The compat routes' bodies as the OpenAPI document shows them. The handlers read bodies
//! themselves (to answer each original's errors in its words and shape), so these types
//! only describe; they derive `Deserialize` so that serde's `untagged` and `flatten` shape
//! their schemas as they would shape parsing. `scripts/fuzz-api.sh` holds the two together:
//! it sends bodies drawn from this document and checks that the server takes what the
//! document allows and refuses what it does not.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::server::api::{ChatMessage, ErrorResponse, TokenId, TruncationDirection};

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn strings(min: usize, max: Option<usize>) -> ArrayBuilder {
    ArrayBuilder::new()
        .items(string())
        .min_items(Some(min))
        .max_items(max)
}

fn token_ids() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(TokenId::schema())
        .min_items(Some(1))
}

/// A schema written by hand (a union serde's derive cannot state), under its type's name.
macro_rules! hand_written {
    ($name:ident, $doc:literal, $schema:expr) => {
        #[doc = $doc]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema.description(Some($doc)).into()
            }
        }

        impl ToSchema for $name {}
    };
}

hand_written!(
    Null,
    "Null (or left out).",
    ObjectBuilder::new().schema_type(Type::Null)
);

hand_written!(
    Anything,
    "Any JSON value (taken, not read).",
    ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
);

hand_written!(
    TextOrTexts,
    "A text, or a non-empty list of texts.",
    OneOfBuilder::new().item(string()).item(strings(1, None))
);

hand_written!(
    ModelInput,
    "vLLM's and OpenAI's `input`: a text, a non-empty list of texts, the token ids of one \
     input, or a non-empty list of such lists (ids are scored as given).",
    OneOfBuilder::new()
        .item(string())
        .item(strings(1, None))
        .item(token_ids())
        .item(ArrayBuilder::new().items(token_ids()).min_items(Some(1)))
);

hand_written!(
    TokenIdInputs,
    "The token ids of one input, or a non-empty list of such lists.",
    OneOfBuilder::new()
        .item(token_ids())
        .item(ArrayBuilder::new().items(token_ids()).min_items(Some(1)))
);

hand_written!(
    TeiInputs,
    "TEI's `inputs`: a text, a `[text, text_pair]` (or `[text]`), or a batch: a list whose \
     first item is a list, each item a `[text]`, a `[text, text_pair]` or a text.",
    OneOfBuilder::new()
        .item(string())
        .item(strings(1, Some(2)))
        .item(
            ArrayBuilder::new()
                .items(OneOfBuilder::new().item(strings(1, Some(2))).item(string()))
                .prefix_items([strings(1, Some(2))])
                .min_items(Some(1))
        )
);

hand_written!(
    TruncatePromptTokens,
    "vLLM's `truncate_prompt_tokens`: keep this many tokens of a longer input (`-1`: the \
     model's maximum); absent or null, a too-long input is refused.",
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .enum_values(Some([-1]))
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
        )
);

hand_written!(
    SlimePrompt,
    "slime's `prompt`: the user's turn as text (or the whole templated prompt with \
     `?prompt=templated`), or the conversation before the response.",
    OneOfBuilder::new()
        .item(string())
        .item(ArrayBuilder::new().items(ChatMessage::schema()))
);

hand_written!(
    RequestIds,
    "SGLang's `rid`: a string for one text, a list of as many strings for a list.",
    OneOfBuilder::new().item(string()).item(strings(0, None))
);

hand_written!(
    Floats,
    "Floats as a JSON list, or with `encoding_format: base64` base64 of their \
     little-endian f32 bytes.",
    OneOfBuilder::new()
        .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Number)))
        .item(string())
);

hand_written!(
    PooledValue,
    "One input's pooled output: a reward model's score (a number; the logits, a list, for \
     several labels), a process reward model's `[p, 1 - p]` per step, or base64.",
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Number)))
        .item(
            ArrayBuilder::new()
                .items(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Number)))
        )
        .item(string())
);

/// Bodies of which a route takes any (it tells them apart by their fields, and one body
/// may have the fields of two): `anyOf` the named schemas, which it also registers.
macro_rules! any_of {
    ($name:ident, $doc:literal, [$($variant:ty),+ $(,)?]) => {
        #[doc = $doc]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                AnyOfBuilder::new()
                    $(.item(Ref::from_schema_name(<$variant as ToSchema>::name())))+
                    .description(Some($doc))
                    .into()
            }
        }

        impl ToSchema for $name {
            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                $(
                    schemas.push((<$variant as ToSchema>::name().into(), <$variant>::schema()));
                    <$variant as ToSchema>::schemas(schemas);
                )+
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Text Embeddings Inference and Hugging Face's InferenceClient
// ---------------------------------------------------------------------------------------

/// TEI's `POST /predict` (and `POST /` with `inputs`): sigmoid scores for a one-label
/// model unless `raw_scores`.
#[derive(Deserialize, ToSchema)]
pub struct TeiPredictRequest {
    #[schema(value_type = TeiInputs)]
    pub inputs: serde_json::Value,
    pub raw_scores: Option<bool>,
    pub truncate: Option<bool>,
    #[schema(value_type = Option<TruncationDirection>)]
    pub truncation_direction: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct LabelScore {
    pub score: f32,
    pub label: String,
}

/// One input's labels (a list), or a batch's (a list of those).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TeiPredictResponse {
    Single(Vec<LabelScore>),
    Batch(Vec<Vec<LabelScore>>),
}

/// TEI's `POST /rerank` (and `POST /`): each text scored as the pair (query, text).
#[derive(Deserialize, ToSchema)]
pub struct TeiRerankRequest {
    pub query: String,
    #[schema(min_items = 1)]
    pub texts: Vec<String>,
    pub raw_scores: Option<bool>,
    pub return_text: Option<bool>,
    pub truncate: Option<bool>,
    #[schema(value_type = Option<TruncationDirection>)]
    pub truncation_direction: Option<String>,
}

/// Best first.
#[derive(Serialize, ToSchema)]
pub struct RankedText {
    pub index: usize,
    /// With `return_text`.
    pub text: Option<String>,
    pub score: f32,
}

/// InferenceClient's `text_classification` on `POST /`.
#[derive(Deserialize, ToSchema)]
pub struct TextClassificationRequest {
    #[schema(value_type = TextOrTexts)]
    pub inputs: serde_json::Value,
    pub parameters: Option<TextClassificationParameters>,
}

#[derive(Deserialize, ToSchema)]
pub struct TextClassificationParameters {
    /// The pipeline's default when absent: sigmoid for one label, softmax for several.
    pub function_to_apply: Option<FunctionToApply>,
    /// At most this many labels per input, best first.
    pub top_k: Option<usize>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FunctionToApply {
    Sigmoid,
    Softmax,
    None,
}

/// What `POST /` answers: TEI's predict (or InferenceClient's nested list) or rerank.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum RootResponse {
    Predict(TeiPredictResponse),
    Rerank(Vec<RankedText>),
}

any_of!(
    RootRequest,
    "`POST /`: TEI's predict or rerank, or InferenceClient's text classification (with `parameters`), told apart by their fields.",
    [TeiRerankRequest, TextClassificationRequest, TeiPredictRequest]
);

// ---------------------------------------------------------------------------------------
// vLLM's pooling API (and SGLang's names for it)
// ---------------------------------------------------------------------------------------

/// The activation switches: `softmax` over `activation` over `use_activation` (older
/// names vLLM took).
#[derive(Deserialize, ToSchema)]
pub struct ActivationFlags {
    pub use_activation: Option<bool>,
    pub activation: Option<bool>,
    pub softmax: Option<bool>,
}

#[derive(Deserialize, ToSchema)]
pub struct ClassifyOptions {
    /// Default: true for `input`, false for `messages` (the template has them).
    pub add_special_tokens: Option<bool>,
    #[schema(value_type = Option<TruncatePromptTokens>)]
    pub truncate_prompt_tokens: Option<i64>,
    #[schema(value_type = Option<TruncationDirection>)]
    pub truncation_side: Option<String>,
    #[serde(flatten)]
    pub flags: ActivationFlags,
}

#[derive(Deserialize, ToSchema)]
pub struct ClassifyInput {
    #[schema(value_type = ModelInput)]
    pub input: serde_json::Value,
    #[serde(flatten)]
    pub options: ClassifyOptions,
}

#[derive(Deserialize, ToSchema)]
pub struct ClassifyConversation {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub options: ClassifyOptions,
}

/// vLLM's `POST /classify`: `input` or `messages` (exactly one).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum VllmClassifyRequest {
    Input(ClassifyInput),
    Conversation(ClassifyConversation),
}

#[derive(Serialize, ToSchema)]
pub struct VllmUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    #[schema(value_type = Option<Object>)]
    pub prompt_tokens_details: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct ClassificationData {
    pub index: usize,
    /// config.json's `id2label` name of the largest probability.
    pub label: Option<String>,
    pub probs: Vec<f32>,
    pub num_classes: usize,
}

#[derive(Serialize, ToSchema)]
pub struct VllmClassifyResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ClassificationData>,
    pub usage: VllmUsage,
}

#[derive(Deserialize, ToSchema)]
pub struct PoolingOptions {
    pub encoding_format: Option<EncodingFormat>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// `POST /pooling`: the body of /classify and `encoding_format`.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PoolingRequest {
    Input {
        #[serde(flatten)]
        classify: ClassifyInput,
        #[serde(flatten)]
        pooling: PoolingOptions,
    },
    Conversation {
        #[serde(flatten)]
        classify: ClassifyConversation,
        #[serde(flatten)]
        pooling: PoolingOptions,
    },
}

#[derive(Serialize, ToSchema)]
pub struct PoolingData {
    pub index: usize,
    pub object: String,
    #[schema(value_type = PooledValue)]
    pub data: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct PoolingResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<PoolingData>,
    pub usage: VllmUsage,
}

/// vLLM's `POST /score`: one query and N documents, or N of each (zipped); `text_1` /
/// `data_1` are other names of `queries`, `text_2` / `data_2` / `items` of `documents`.
/// Sigmoid scores unless switched off.
#[derive(Deserialize, ToSchema)]
pub struct VllmScoreRequest {
    #[schema(value_type = TextOrTexts)]
    pub queries: serde_json::Value,
    #[schema(value_type = TextOrTexts)]
    pub documents: serde_json::Value,
    #[schema(value_type = Option<TruncatePromptTokens>)]
    pub truncate_prompt_tokens: Option<i64>,
    #[serde(flatten)]
    pub flags: ActivationFlags,
}

#[derive(Serialize, ToSchema)]
pub struct ScoreData {
    pub index: usize,
    pub object: String,
    pub score: f32,
}

#[derive(Serialize, ToSchema)]
pub struct VllmScoreResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ScoreData>,
    pub usage: VllmUsage,
}

/// vLLM's `POST /rerank` (Jina's and Cohere's shape): documents scored as the pairs
/// (query, document), best first; `top_n` 0 or absent returns all.
#[derive(Deserialize, ToSchema)]
pub struct VllmRerankRequest {
    pub query: String,
    #[schema(value_type = TextOrTexts)]
    pub documents: serde_json::Value,
    pub top_n: Option<usize>,
    #[schema(value_type = Option<TruncatePromptTokens>)]
    pub truncate_prompt_tokens: Option<i64>,
    #[serde(flatten)]
    pub flags: ActivationFlags,
}

#[derive(Serialize, ToSchema)]
pub struct RerankDocument {
    pub text: String,
    #[schema(value_type = Option<Object>)]
    pub multi_modal: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct VllmRerankResult {
    pub index: usize,
    pub document: RerankDocument,
    pub relevance_score: f32,
}

#[derive(Serialize, ToSchema)]
pub struct RerankUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Serialize, ToSchema)]
pub struct VllmRerankResponse {
    pub id: String,
    pub model: String,
    pub usage: RerankUsage,
    pub results: Vec<VllmRerankResult>,
}

// ---------------------------------------------------------------------------------------
// SGLang
// ---------------------------------------------------------------------------------------

/// SGLang's native `POST /classify`: `text` or `input_ids` (exactly one).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SglangClassifyRequest {
    Text {
        #[schema(value_type = TextOrTexts)]
        text: serde_json::Value,
        #[schema(value_type = Option<RequestIds>)]
        rid: Option<serde_json::Value>,
    },
    TokenIds {
        #[schema(value_type = TokenIdInputs)]
        input_ids: serde_json::Value,
        #[schema(value_type = Option<RequestIds>)]
        rid: Option<serde_json::Value>,
    },
}

#[derive(Serialize, ToSchema)]
pub struct SglangMetaInfo {
    pub id: String,
    pub prompt_tokens: usize,
    pub e2e_latency: f64,
}

/// The head's raw output as the "embedding".
#[derive(Serialize, ToSchema)]
pub struct SglangClassifyItem {
    pub embedding: Vec<f32>,
    pub meta_info: SglangMetaInfo,
}

/// One object for one string, a list in input order for a list.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SglangClassifyResponse {
    One(SglangClassifyItem),
    Many(Vec<SglangClassifyItem>),
}

/// OpenAI's `POST /v1/embeddings` as SGLang serves it for a reward model.
#[derive(Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    #[schema(value_type = ModelInput)]
    pub input: serde_json::Value,
    pub encoding_format: Option<EncodingFormat>,
    /// Refused unless null: the head's output has a fixed size.
    #[schema(value_type = Null, required = false)]
    pub dimensions: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct Embedding {
    pub object: String,
    #[schema(value_type = Floats)]
    pub embedding: serde_json::Value,
    pub index: usize,
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: RerankUsage,
}

// ---------------------------------------------------------------------------------------
// RL frameworks' reward clients
// ---------------------------------------------------------------------------------------

/// OpenRLHF's remote reward model: `query` is templated already (no special tokens
/// added); `prompts` and `labels` are taken and not read.
#[derive(Deserialize, ToSchema)]
pub struct GetRewardRequest {
    #[schema(value_type = TextOrTexts)]
    pub query: serde_json::Value,
    #[schema(value_type = Anything, required = false)]
    pub prompts: Option<serde_json::Value>,
    #[schema(value_type = Anything, required = false)]
    pub labels: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct GetRewardResponse {
    pub rewards: Vec<f32>,
    pub scores: Vec<f32>,
    #[schema(value_type = Object)]
    pub extra_logs: serde_json::Value,
}

/// LLaMA-Factory's reward API: texts formatted with its template already.
#[derive(Deserialize, ToSchema)]
pub struct ScoreEvaluationRequest {
    pub model: Option<String>,
    #[schema(value_type = TextOrTexts)]
    pub messages: serde_json::Value,
    /// Truncate each text to this many tokens (from the start, as LLaMA-Factory does).
    #[schema(minimum = 1)]
    pub max_length: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct ScoreEvaluationResponse {
    pub id: String,
    pub object: String,
    pub model: String,
    pub scores: Vec<f32>,
}

/// slime's `remote_rm`: the reward of one response, answered as a bare number.
#[derive(Deserialize, ToSchema)]
pub struct RemoteRmRequest {
    #[schema(value_type = SlimePrompt)]
    pub prompt: serde_json::Value,
    pub response: String,
}

/// `?prompt=`: `raw` (default: the prompt is the user's turn) or `templated` (the policy's
/// chat template is applied already: prompt + response is scored as text).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RemoteRmPrompt {
    Raw,
    Templated,
}

// ---------------------------------------------------------------------------------------
// Routes that two APIs share
// ---------------------------------------------------------------------------------------

any_of!(
    SharedRerankRequest,
    "`POST /rerank`: TEI's `{\"query\", \"texts\"}` or vLLM's `{\"query\", \"documents\"}`.",
    [TeiRerankRequest, VllmRerankRequest]
);

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SharedRerankResponse {
    Tei(Vec<RankedText>),
    Vllm(VllmRerankResponse),
}

any_of!(
    SharedClassifyRequest,
    "`POST /classify`: vLLM's `{\"input\"}` / `{\"messages\"}` or SGLang's `{\"text\"}` / `{\"input_ids\"}`.",
    [VllmClassifyRequest, SglangClassifyRequest]
);

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SharedClassifyResponse {
    Vllm(VllmClassifyResponse),
    Sglang(SglangClassifyResponse),
}

any_of!(
    SharedScoreRequest,
    "`POST /v1/score`: warm's `{\"inputs\"}` or vLLM's pairs.",
    [crate::server::api::ScoreRequest, VllmScoreRequest]
);

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SharedScoreResponse {
    Warm(crate::server::api::ScoreResponse),
    Vllm(VllmScoreResponse),
}

any_of!(
    SharedV1RerankRequest,
    "`POST /v1/rerank`: warm's `{\"prompt\" | \"messages\", \"responses\"}` or vLLM's `{\"query\", \"documents\"}`.",
    [crate::server::api::RerankBody, VllmRerankRequest]
);

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SharedV1RerankResponse {
    Warm(crate::server::api::RerankResponse),
    Vllm(VllmRerankResponse),
}

// ---------------------------------------------------------------------------------------
// Errors in each original's shape
// ---------------------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct VllmErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Option<String>)]
    pub param: Option<String>,
    pub code: u16,
}

/// vLLM's error body.
#[derive(Serialize, ToSchema)]
pub struct VllmError {
    pub error: VllmErrorDetail,
}

/// SGLang's OpenAI-style error body: vLLM's fields at the top, with `object: "error"`.
#[derive(Serialize, ToSchema)]
pub struct OpenAiFlatError {
    pub object: String,
    #[serde(flatten)]
    pub detail: VllmErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct SglangErrorDetail {
    pub message: String,
}

/// SGLang's native error body.
#[derive(Serialize, ToSchema)]
pub struct SglangError {
    pub error: SglangErrorDetail,
}

/// FastAPI's error body (LLaMA-Factory's API).
#[derive(Serialize, ToSchema)]
pub struct FastApiError {
    pub detail: String,
}

/// The statuses a scoring route answers besides 200, with `$body` for its own errors; a
/// missing API key is refused before any route, in warm's shape.
macro_rules! route_errors {
    ($name:ident, $body:ty) => {
        #[derive(utoipa::IntoResponses)]
        pub enum $name {
            /// Malformed JSON or a body of the wrong shape (named).
            #[response(status = 400)]
            BadRequest($body),
            /// A missing or wrong API key (`--api-key`).
            #[response(status = 401)]
            Unauthorized(ErrorResponse),
            /// The body did not all arrive within `--read-timeout`.
            #[response(status = 408)]
            RequestTimeout($body),
            /// Over `--payload-limit` or `--max-client-batch-size`.
            #[response(status = 413)]
            TooLarge($body),
            /// An input too long without truncation, empty once tokenized, or one the
            /// model cannot serve.
            #[response(status = 422)]
            Unprocessable($body),
            /// More than `--max-concurrent-requests` in flight.
            #[response(status = 429)]
            Overloaded($body),
            /// The model is still loading.
            #[response(status = 503)]
            NotReady($body),
            /// Over `--request-timeout`.
            #[response(status = 504)]
            Timeout($body),
        }
    };
}

route_errors!(WarmErrors, ErrorResponse);
route_errors!(VllmErrors, VllmError);
route_errors!(OpenAiFlatErrors, OpenAiFlatError);
route_errors!(SglangErrors, SglangError);
route_errors!(FastApiErrors, FastApiError);

// A route two APIs share answers errors in the shape of the body it took the request for
// (vLLM's for an unreadable one on /classify, warm's on the others).
any_of!(
    WarmOrVllmError,
    "warm's error body or vLLM's, as the route took the request.",
    [ErrorResponse, VllmError]
);

any_of!(
    VllmOrSglangError,
    "vLLM's error body or SGLang's, as the route took the request.",
    [VllmError, SglangError]
);

route_errors!(WarmOrVllmErrors, WarmOrVllmError);
route_errors!(VllmOrSglangErrors, VllmOrSglangError);
