//! API errors: `{"error": {"code", "message", "param", "type"}}` with the matching HTTP
//! status (`type` as OpenAI's clients expect it, from the status).
//! A 500 never carries internal detail: the cause is logged, the client sees a generic
//! message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loraloop_core::ServiceError;
use loraloop_core::storage::StorageError;
use loraloop_model::engine::EngineError;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `invalid_json`, `invalid_request`, `unauthorized`, `not_found`,
    /// `conflict`, `payload_too_large`, `internal_error`, ...
    pub code: String,
    pub message: String,
    /// The request field the error is about, when there is one.
    pub param: Option<String>,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// OpenAI's error `type` for an HTTP status.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message).with_param(param)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// An upload (a file, a dataset, an adapter) over `server.max_upload_mb`.
    pub fn too_large(limit_bytes: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the upload is over the limit of {} (server.max_upload_mb)",
                size_text(limit_bytes)
            ),
        )
    }
    /// Any other request body over its route's limit (a JSON request, a login form).
    pub fn body_too_large(limit_bytes: Option<u64>) -> Self {
        let limit = limit_bytes.map_or(String::new(), |l| format!(" of {}", size_text(l)));
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over this endpoint's limit{limit}"),
        )
    }
    /// Log the cause; the client sees only that something failed on our side.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {cause}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error (the server log has the details)",
        )
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                param: self.param.clone(),
                kind: error_type(self.status),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.code == "overloaded" {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        r
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound { what } => Self::not_found(format!("{what} not found")),
            StorageError::Invalid { what, message } => Self::invalid(what, message),
            StorageError::Conflict { message } => Self::conflict(message),
            other => Self::internal(other),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid { param, message } => Self::invalid(param, message),
            ServiceError::Prompt(message) => Self::invalid("messages", message),
            ServiceError::NotFound { message, param } => {
                let err = Self::not_found(message);
                match param {
                    Some(p) => err.with_param(p),
                    None => err,
                }
            }
            ServiceError::Conflict(message) => Self::conflict(message),
            ServiceError::Busy(message) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
            }
            ServiceError::Internal(cause) => Self::internal(cause),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ServiceError::from(e).into()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(format!("{e:#}"))
    }
}

/// A JSON body parsed strictly: a syntax error is a 400 `invalid_json`; a wrong type,
/// missing or unknown field is a 422 naming the field in `param`.
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            // The media type without its parameters, in any case (RFC 9110).
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::body_too_large(None)
                } else {
                    ApiError::bad_request(e.body_text())
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// `1 MB`, `16 KB`: a limit as people read it.
pub fn size_text(bytes: u64) -> String {
    const MB: u64 = 1024 * 1024;
    if bytes >= MB && bytes.is_multiple_of(MB) {
        format!("{} MB", bytes / MB)
    } else {
        format!("{} KB", bytes.div_ceil(1024))
    }
}

pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {inner}"),
            )
        } else {
            let param = if path == "." { None } else { Some(path) };
            let mut err = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                inner.to_string(),
            );
            err.param = param;
            err
        }
    })
}
