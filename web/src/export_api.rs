//! `GET /api/v1/adapters/{id}/export`: an adapter for llama.cpp and Ollama, as the
//! console's download links and `loraloop export` make it: `format=lora` (a LoRA GGUF)
//! or `format=merged` (the served model with the adapter merged in, `type` f16, q8_0 or
//! q4_1). The file is written to the scratch folder and streamed, then removed.

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use loraloop_model::export::{Export, GgufType, export_adapter as write_export};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::AsyncReadExt;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `lora` (default) or `merged`.
    pub format: Option<String>,
    /// A merged model's weights: `f16`, `q8_0` (default) or `q4_1`.
    #[serde(rename = "type")]
    pub gguf_type: Option<String>,
}

/// Export an adapter as a GGUF file (download).
#[utoipa::path(get, path = "/api/v1/adapters/{id}/export", params(("id" = i64, Path), ExportQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn export_adapter(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::not_found(format!("no such id: {}", e.body_text())))?;
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    export_download(&state, id, &q, crate::audit::API).await
}

/// The export of adapter `id` as a download (the API's route and the console's).
pub async fn export_download(
    state: &AppState,
    id: i64,
    q: &ExportQuery,
    actor: &str,
) -> Result<Response, ApiError> {
    let merged = match q.format.as_deref().unwrap_or("lora") {
        "lora" => false,
        "merged" => true,
        other => {
            return Err(ApiError::invalid(
                "format",
                format!("format must be lora or merged, got {other:?}"),
            ));
        }
    };
    if !merged && let Some(t) = &q.gguf_type {
        return Err(ApiError::invalid(
            "type",
            format!("type {t:?} is for format=merged: a LoRA GGUF keeps the adapter's f32 weights"),
        ));
    }
    let ty = GgufType::parse(q.gguf_type.as_deref().unwrap_or("q8_0"))
        .map_err(|m| ApiError::invalid("type", m))?;
    let adapter = state.core.db.adapter(id).await?;
    if let Some(why) = state.core.adapters.mismatch(&adapter) {
        return Err(ApiError::invalid(
            "id",
            format!(
                "adapter {} does not fit the served model: {why}",
                adapter.name
            ),
        ));
    }
    let stem = download_name(&adapter.name);
    let file_name = if merged {
        format!("{stem}-merged-{}.gguf", ty.as_str())
    } else {
        format!("{stem}.gguf")
    };
    let scratch = crate::files::scratch_file(state, ".gguf");
    let cfg = state.core.engine.model().llama.config.clone();
    let base_path = state.core.model.path.clone();
    let (dir, out, name) = (adapter.path.clone(), scratch.clone(), adapter.name.clone());
    let what = if merged {
        Export::Merged(ty)
    } else {
        Export::Lora
    };
    // The export owns its scratch file until it hands it back: a client gone before then
    // drops this request, and the file goes when the export ends (it was left behind, one
    // whole model per aborted download).
    let guard = Scratch(scratch.clone());
    // And it stops merging when the client is gone (this request dropped).
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let cancelled = cancel.0.clone();
    let (written, _guard) = tokio::task::spawn_blocking(move || {
        let written = write_export(
            std::path::Path::new(&dir),
            &base_path,
            &cfg,
            what,
            &name,
            &out,
            &cancelled,
        )
        .map_err(|e| e.to_string());
        (written, guard)
    })
    .await
    .map_err(ApiError::internal)?;
    if let Err(m) = written {
        return Err(ApiError::invalid(
            "id",
            format!("cannot export {}: {m}", adapter.name),
        ));
    }
    crate::audit::record(
        state,
        actor,
        "export adapter",
        &format!("{} as {file_name}", adapter.name),
    )
    .await;
    stream_and_remove(&scratch, &file_name).await
}

/// A scratch file removed when this is dropped (streaming unlinks it earlier, once open).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sets its flag when dropped: with the request, when the client leaves mid-export.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A name as a download's file name: letters, digits, `-`, `_` and `.`; the rest `_`.
pub fn download_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Stream a scratch file as a download; the file is unlinked once open (the open handle
/// keeps its bytes until the stream ends).
pub async fn stream_and_remove(
    path: &std::path::Path,
    file_name: &str,
) -> Result<Response, ApiError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(ApiError::internal)?;
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let _ = tokio::fs::remove_file(path).await;
    let stream = futures_util::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 1 << 16];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(f)))
            }
            // The error ends the body; nothing more is read.
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
