//! The ids and names in REST paths as extractors: a handler takes `FileId(id): FileId`
//! instead of a `Path` result it turns into a 404 itself. A segment axum cannot read
//! (bad percent-encoding) is a 404 that says what was looked for.

use crate::error::ApiError;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

macro_rules! path_text {
    ($($(#[$doc:meta])* $name:ident => $no_such:literal;)*) => {$(
        $(#[$doc])*
        pub struct $name(pub String);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                Path::<String>::from_request_parts(parts, state)
                    .await
                    .map(|Path(s)| Self(s))
                    .map_err(|e| ApiError::not_found(format!("{}{}", $no_such, e.body_text())))
            }
        }
    )*};
}

path_text! {
    /// An uploaded file's id (`file-N`).
    FileId => "no such file: ";
    /// An OpenAI-style fine-tuning job's id (`ftjob-N`).
    FineTuningJobId => "no such fine-tuning job: ";
    /// An assistant's name.
    AssistantName => "";
    /// A REST job id (`N` or `clsjob-N`).
    JobPathId => "no such id: ";
}

/// A numeric id (an adapter's).
pub struct NumericId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for NumericId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<i64>::from_request_parts(parts, state)
            .await
            .map(|Path(i)| Self(i))
            .map_err(|e| ApiError::not_found(format!("no such id: {}", e.body_text())))
    }
}
