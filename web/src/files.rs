//! Names a client supplies that become paths, and scratch files for uploads.

use crate::error::ApiError;
use crate::state::AppState;
use loraloop_core::token::random_token;
use std::path::PathBuf;

/// The folder under which a name supplied by a client may become a path: refuses
/// separators, `..`, and anything but letters, digits, `-`, `_`, `.`.
pub fn safe_file_name(name: &str) -> Result<&str, ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name)
    } else {
        Err(ApiError::invalid(
            "name",
            format!(
                "{name:?} is not a valid name: use letters, digits, '-', '_' and '.', not starting with '.'"
            ),
        ))
    }
}

/// A scratch path for a download or an upload.
pub fn scratch_file(state: &AppState, suffix: &str) -> PathBuf {
    state
        .core
        .config
        .raw
        .data_dir
        .join("tmp")
        .join(format!("{}{suffix}", random_token(8)))
}
