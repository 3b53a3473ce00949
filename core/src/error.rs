//! What the chat and adapter services report when they cannot do what was asked. Each
//! surface decides what its users see: the web answers with an HTTP status, a bot with a
//! sentence in the chat.

use crate::storage::StorageError;
use loraloop_model::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong; `param` names the field.
    #[error("{message}")]
    Invalid { param: String, message: String },
    /// The prompt cannot be generated from: empty, or longer than the model's context.
    #[error("{0}")]
    Prompt(String),
    /// `param` names the request field that named the missing thing, when one did.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    /// It cannot be done in the current state (another activation runs, an adapter does
    /// not fit the served model, nothing to roll back to).
    #[error("{0}")]
    Conflict(String),
    /// Too much is running or waiting: try again shortly.
    #[error("{0}")]
    Busy(String),
    /// Something failed on our side; the message is for the log, not for users.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

impl ServiceError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<StorageError> for ServiceError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound { what } => Self::NotFound {
                message: format!("{what} not found"),
                param: None,
            },
            StorageError::Invalid { what, message } => Self::Invalid {
                param: what,
                message,
            },
            StorageError::Conflict { message } => Self::Conflict(message),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::EmptyPrompt | EngineError::PromptTooLong { .. } => {
                Self::Prompt(e.to_string())
            }
            EngineError::Busy { .. } => Self::Busy(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}
