//! Uploads: reading one within its limit, names a client supplies that become paths,
//! and scratch files (and what a killed server left of them).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Multipart, Request};
use axum::http::header;
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
    scratch_dir(state).join(format!("{}{suffix}", random_token(8)))
}

fn scratch_dir(state: &AppState) -> PathBuf {
    state.core.config.raw.data_dir.join("tmp")
}

/// In the adapters folder: an uploaded adapter being unpacked and checked.
pub const UPLOAD_STAGING_PREFIX: &str = ".upload-";
/// In the adapters folder: an uploaded adapter `uploaded-NAME`.
pub const UPLOADED_PREFIX: &str = "uploaded-";
/// In the adapters folder: the adapters `loraloop restore` copied, `restored-<UTC time>`.
pub const RESTORED_PREFIX: &str = "restored-";

/// Remove what a killed server left: scratch files (exports, downloads), adapters it was
/// unpacking, and uploaded adapter folders whose adapter was never recorded (they made
/// every later upload of that name a 409), and the folder of a restore that stopped before
/// its database replaced the one in place. Run at start, before any request.
pub async fn remove_leftovers(state: &AppState) {
    let adapters = match state.core.db.list_adapters().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("cannot look for leftover uploads: {e}");
            return;
        }
    };
    // Kept when any adapter's path has a folder of the name, wherever it lies (a restore's
    // folder holds the adapters).
    let recorded: std::collections::HashSet<std::ffi::OsString> = adapters
        .iter()
        .flat_map(|a| std::path::Path::new(&a.path).iter().map(Into::into))
        .collect();
    let mut left: Vec<PathBuf> = std::fs::read_dir(scratch_dir(state))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    for e in std::fs::read_dir(&state.core.adapters_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name();
        let text = name.to_string_lossy();
        let unrecorded = (text.starts_with(UPLOADED_PREFIX) || text.starts_with(RESTORED_PREFIX))
            && !recorded.contains(&name);
        if text.starts_with(UPLOAD_STAGING_PREFIX) || unrecorded {
            left.push(e.path());
        }
    }
    for path in left {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::warn!("removed {}: left by a server that stopped", path.display()),
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// The bytes of an upload (raw body, or the `file_field` part of a multipart form), and
/// the other form fields (plus `filename`). Over the size limit: a 413.
pub async fn read_upload(
    state: &AppState,
    req: Request,
    file_field: &str,
) -> Result<(Vec<u8>, std::collections::HashMap<String, String>), ApiError> {
    let limit = state.max_upload_bytes;
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let mut fields = std::collections::HashMap::new();
    let body_err = |e: &(dyn std::error::Error + 'static), text: String| {
        if over_limit(e) {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request(format!("cannot read the upload: {text}"))
        }
    };
    let mp_err = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            body_err(&e, e.body_text())
        }
    };
    if !multipart {
        let bytes = axum::body::to_bytes(req.into_body(), limit as usize)
            .await
            .map_err(|e| body_err(&e, e.to_string()))?;
        return Ok((bytes.to_vec(), fields));
    }
    let mut mp = <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut file = None;
    while let Some(field) = mp.next_field().await.map_err(mp_err)? {
        let name = field.name().unwrap_or("").to_string();
        if name == file_field {
            if let Some(f) = field.file_name() {
                fields.insert("filename".to_string(), f.to_string());
            }
            let bytes = field.bytes().await.map_err(mp_err)?;
            if bytes.len() as u64 > limit {
                return Err(ApiError::too_large(limit));
            }
            file = Some(bytes.to_vec());
        } else {
            let text = field.text().await.map_err(mp_err)?;
            fields.insert(name, text);
        }
    }
    let file = file.ok_or_else(|| {
        ApiError::invalid(file_field, format!("the form has no `{file_field}` part"))
    })?;
    Ok((file, fields))
}

/// Whether reading a body stopped at its length limit (the one `limits::limit_body` puts
/// on every request), wherever that error sits in the chain: a chunked upload declares
/// no length, so it is only found out while reading.
fn over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() || c.to_string().contains("length limit") {
            return true;
        }
        cause = c.source();
    }
    false
}
