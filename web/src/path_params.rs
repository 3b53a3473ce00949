//! The ids and names in REST paths as extractors: a handler takes `FileId(id): FileId`
//! instead of a `Path` result it turns into a 404 itself. A segment axum cannot read
//! (bad percent-encoding, or not a number where one is wanted) is a 404 that says what
//! was looked for.

use crate::error::ApiError;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

/// What was wrong with a path segment, in the user's terms rather than the parser's.
fn unreadable(e: &PathRejection) -> String {
    match e {
        PathRejection::FailedToDeserializePathParams(d) => match d.kind() {
            ErrorKind::ParseError { value, .. }
            | ErrorKind::ParseErrorAtKey { value, .. }
            | ErrorKind::ParseErrorAtIndex { value, .. } => format!("{value:?} is not a number"),
            ErrorKind::InvalidUtf8InPathParam { .. } => "the path is not valid UTF-8".into(),
            _ => d.body_text(),
        },
        other => other.body_text(),
    }
}

macro_rules! path_param {
    ($($(#[$doc:meta])* $name:ident($ty:ty) => $no_such:literal;)*) => {$(
        $(#[$doc])*
        pub struct $name(pub $ty);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                Path::<$ty>::from_request_parts(parts, state)
                    .await
                    .map(|Path(s)| Self(s))
                    .map_err(|e| ApiError::not_found(format!("{}{}", $no_such, unreadable(&e))))
            }
        }
    )*};
}

path_param! {
    /// An uploaded file's id (`file-N`).
    FileId(String) => "no such file: ";
    /// An OpenAI-style fine-tuning job's id (`ftjob-N`).
    FineTuningJobId(String) => "no such fine-tuning job: ";
    /// An assistant's name.
    AssistantName(String) => "";
    /// A REST job id (`N` or `clsjob-N`).
    JobPathId(String) => "no such id: ";
    /// A numeric id (an adapter's).
    NumericId(i64) => "no such id: ";
    /// What `GET /v1/models` lists: an assistant, `base` or an adapter.
    ModelName(String) => "no such model: ";
}
