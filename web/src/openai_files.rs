//! OpenAI's `/v1/files` for fine-tuning data: upload (`purpose=fine-tune`), list,
//! retrieve, delete, content. Ids are `file-N`. A fine-tune file must be JSONL (one JSON
//! object per line); what the lines hold is checked when a job validates it.

use crate::error::{ApiError, ErrorBody};
use crate::paging::OpenAiList;
use crate::path_params::FileId;
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use loraloop_core::storage::{NewFile, StoredFile};
use serde::{Deserialize, Serialize};

pub const FILE_PREFIX: &str = "file-";

/// OpenAI's File object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    /// Always `processed`: a file is stored whole or refused.
    pub status: &'static str,
    pub status_details: Option<String>,
    pub expires_at: Option<i64>,
}

impl From<StoredFile> for FileObject {
    fn from(f: StoredFile) -> Self {
        Self {
            id: format!("{FILE_PREFIX}{}", f.id),
            object: "file",
            bytes: f.bytes,
            created_at: crate::operations::unix(&f.created_at),
            filename: f.filename,
            purpose: f.purpose,
            status: "processed",
            status_details: None,
            expires_at: None,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileDeleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// `file-N` (or `N`) to N.
pub fn file_number(id: &str) -> Option<i64> {
    crate::paging::prefixed_id(id, FILE_PREFIX).filter(|n| *n > 0)
}

/// The stored file `id` names; a 404 naming the id otherwise.
pub async fn stored_file(state: &AppState, id: &str) -> Result<StoredFile, ApiError> {
    let missing = || ApiError::not_found(format!("no such file: {id}"));
    let n = file_number(id).ok_or_else(missing)?;
    state.core.db.file(n).await.map_err(|_| missing())
}

/// The problem with a fine-tune upload's bytes, if any: not UTF-8, a line that is not a
/// JSON object, or no lines at all. A leading UTF-8 BOM (Windows editors write one) is
/// not content, as in a dataset import, which a job's file goes through later.
fn jsonl_problem(bytes: &[u8]) -> Option<String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Some("the file is not UTF-8 text; fine-tune files are JSONL".into());
    };
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => {}
            Ok(_) => return Some(format!("line {}: not a JSON object", i + 1)),
            Err(e) => return Some(format!("line {}: not JSON: {e}", i + 1)),
        }
    }
    (lines == 0).then(|| "the file has no lines".to_string())
}

/// Upload a file (multipart: `file`, `purpose`). Only `purpose=fine-tune` is kept here.
#[utoipa::path(post, path = "/v1/files", request_body(content = Object, content_type = "multipart/form-data", description = "file (JSONL), purpose (fine-tune)"),
    responses((status = 200, body = FileObject), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn upload_file(
    State(state): State<AppState>,
    req: Request,
) -> Result<Json<FileObject>, ApiError> {
    let (bytes, fields) = crate::files::read_upload(&state, req, "file").await?;
    let purpose = fields.get("purpose").map(String::as_str).unwrap_or("");
    if purpose != "fine-tune" {
        return Err(ApiError::invalid(
            "purpose",
            format!(
                "purpose {purpose:?} is not supported here: upload fine-tuning data with purpose \"fine-tune\""
            ),
        ));
    }
    let filename = fields
        .get("filename")
        .map(|f| f.trim())
        .filter(|f| !f.is_empty())
        .unwrap_or("upload.jsonl");
    let filename: String = filename.chars().take(255).collect();
    if let Some(problem) = jsonl_problem(&bytes) {
        return Err(ApiError::invalid(
            "file",
            format!("Invalid file format for fine-tuning: {problem}"),
        ));
    }
    let f = state
        .core
        .db
        .insert_file(&NewFile {
            filename: &filename,
            purpose,
            content: &bytes,
        })
        .await?;
    crate::audit::record(
        &state,
        crate::audit::API,
        "upload file",
        &format!("{FILE_PREFIX}{} ({filename}, {} bytes)", f.id, f.bytes),
    )
    .await;
    Ok(Json(f.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct FileListQuery {
    pub purpose: Option<String>,
    /// At most 10000 (default).
    pub limit: Option<i64>,
    /// `asc` or `desc` (default) by creation.
    pub order: Option<String>,
    /// A file id: the page starts after it.
    pub after: Option<String>,
}

/// List uploaded files.
#[utoipa::path(get, path = "/v1/files", params(FileListQuery),
    responses((status = 200, body = OpenAiList<FileObject>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list_files(
    State(state): State<AppState>,
    q: Result<Query<FileListQuery>, QueryRejection>,
) -> Result<Json<OpenAiList<FileObject>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be from 1 to 10000, got {limit}"),
        ));
    }
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(ApiError::invalid(
                "order",
                format!("order must be asc or desc, got {o:?}"),
            ));
        }
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => Some(
            file_number(a)
                .ok_or_else(|| ApiError::invalid("after", format!("{a:?} is not a file id")))?,
        ),
    };
    let mut files = state
        .core
        .db
        .list_files(q.purpose.as_deref(), after, limit + 1, ascending)
        .await?;
    let has_more = crate::paging::cut(&mut files, limit);
    let data: Vec<FileObject> = files.into_iter().map(FileObject::from).collect();
    Ok(Json(OpenAiList::new(data, has_more, |f| f.id.clone())))
}

/// One file's metadata.
#[utoipa::path(get, path = "/v1/files/{file_id}", params(("file_id" = String, Path)),
    responses((status = 200, body = FileObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_file(
    State(state): State<AppState>,
    FileId(id): FileId,
) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(stored_file(&state, &id).await?.into()))
}

/// Delete a file. Jobs made from it keep the data they validated.
#[utoipa::path(delete, path = "/v1/files/{file_id}", params(("file_id" = String, Path)),
    responses((status = 200, body = FileDeleted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_file(
    State(state): State<AppState>,
    FileId(id): FileId,
) -> Result<Json<FileDeleted>, ApiError> {
    let f = stored_file(&state, &id).await?;
    if !state.core.db.delete_file(f.id).await? {
        return Err(ApiError::not_found(format!("no such file: {id}")));
    }
    crate::audit::record(
        &state,
        crate::audit::API,
        "delete file",
        &format!("{FILE_PREFIX}{} ({})", f.id, f.filename),
    )
    .await;
    Ok(Json(FileDeleted {
        id: format!("{FILE_PREFIX}{}", f.id),
        object: "file",
        deleted: true,
    }))
}

/// A file's bytes, as uploaded.
#[utoipa::path(get, path = "/v1/files/{file_id}/content", params(("file_id" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn file_content(
    State(state): State<AppState>,
    FileId(id): FileId,
) -> Result<Response, ApiError> {
    let f = stored_file(&state, &id).await?;
    let bytes = state.core.db.file_content(f.id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fine_tune_file_must_be_jsonl_objects() {
        assert_eq!(jsonl_problem(b"{\"messages\": []}\n\n{\"a\": 1}\n"), None);
        assert!(jsonl_problem(b"").unwrap().contains("no lines"));
        assert!(jsonl_problem(b"{}\n[1]\n").unwrap().starts_with("line 2"));
        assert!(
            jsonl_problem(b"{}\n{oops\n")
                .unwrap()
                .starts_with("line 2: not JSON")
        );
        assert!(jsonl_problem(&[0xff, 0xfe]).unwrap().contains("UTF-8"));
        assert_eq!(jsonl_problem(b"\xEF\xBB\xBF{\"a\": 1}\r\n"), None);
        assert!(
            jsonl_problem(b"{}\n\xEF\xBB\xBF{}\n")
                .unwrap()
                .starts_with("line 2: not JSON"),
            "only a leading BOM is skipped"
        );
        assert_eq!(file_number("file-12"), Some(12));
        assert_eq!(file_number("12"), Some(12));
        assert_eq!(file_number("file-0"), None);
        assert_eq!(file_number("file-abc"), None);
    }
}
