//! The error bodies of the APIs the compat routes imitate. Their handlers return warm's
//! `ApiError` (status and message) and map it here, once, to the body their original
//! answers with; the status stays warm's.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::server::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub enum ErrorShape {
    /// vLLM: `{"error": {"message", "type", "param", "code"}}`.
    Vllm,
    /// SGLang's native routes: `{"error": {"message"}}`.
    Sglang,
    /// SGLang's OpenAI-compatible routes: `{"object": "error", "message", "type", "param",
    /// "code"}`.
    OpenAiFlat,
    /// FastAPI's `HTTPException` (LLaMA-Factory): `{"detail": message}`.
    FastApi,
}

impl ErrorShape {
    pub fn respond(self, error: ApiError) -> Response {
        let status = error.status;
        let code = status.as_u16();
        let message = error.message;
        let body = match self {
            Self::Vllm => json!({"error": {"message": message, "type": openai_type(status),
                                           "param": null, "code": code}}),
            Self::Sglang => json!({"error": {"message": message}}),
            Self::OpenAiFlat => json!({"object": "error", "message": message,
                                       "type": openai_type(status), "param": null, "code": code}),
            Self::FastApi => json!({"detail": message}),
        };
        (status, Json(body)).into_response()
    }
}

/// The `type` OpenAI-style servers give a status.
fn openai_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "AuthenticationError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
        StatusCode::GATEWAY_TIMEOUT => "TimeoutError",
        s if s.is_client_error() => "BadRequestError",
        _ => "InternalServerError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(shape: ErrorShape, status: StatusCode) -> serde_json::Value {
        let response = shape.respond(ApiError::new(status, "bad"));
        assert_eq!(response.status(), status);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("json")
    }

    #[test]
    fn each_shape_keeps_the_status_and_the_message() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let vllm = body_of(ErrorShape::Vllm, StatusCode::TOO_MANY_REQUESTS).await;
            assert_eq!(
                vllm,
                json!({"error": {"message": "bad", "type": "RateLimitError", "param": null, "code": 429}})
            );
            let sglang = body_of(ErrorShape::Sglang, StatusCode::BAD_REQUEST).await;
            assert_eq!(sglang, json!({"error": {"message": "bad"}}));
            let flat = body_of(ErrorShape::OpenAiFlat, StatusCode::BAD_REQUEST).await;
            assert_eq!(
                flat,
                json!({"object": "error", "message": "bad", "type": "BadRequestError", "param": null, "code": 400})
            );
            let fastapi = body_of(ErrorShape::FastApi, StatusCode::SERVICE_UNAVAILABLE).await;
            assert_eq!(fastapi, json!({"detail": "bad"}));
        });
    }
}
