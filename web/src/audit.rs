//! The audit log as the web sees it: recording what an operator or API client did, and
//! `GET /api/v1/audit`.

use crate::error::ApiError;
use crate::paging::{List, Page, cut, page_query};
use crate::state::AppState;
use axum::Json;
use axum::extract::{Query, State};
use loraloop_core::storage::AuditEntry;

/// Who acts through the console and through the API key.
pub const CONSOLE: &str = "console:admin";
pub const API: &str = "api";

/// Record an action; a failure to record is logged, the action stands.
pub async fn record(state: &AppState, actor: &str, action: &str, target: &str) {
    if let Err(e) = state.core.db.audit(actor, action, Some(target), None).await {
        tracing::warn!("cannot write the audit log ({actor} {action} {target}): {e}");
    }
}

/// The audit log, newest first: activations and rollbacks (by the console, the API, the
/// gate or a canary), deletions, uploads, jobs, assistants, /forget, logins.
#[utoipa::path(get, path = "/api/v1/audit", params(Page), responses((status = 200, body = Object), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list_audit(
    State(state): State<AppState>,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<List<AuditEntry>>, ApiError> {
    let p = page_query(q)?;
    let limit = p.limit.unwrap_or(50).min(500);
    let mut data = state.core.db.audit_entries(p.after, limit + 1).await?;
    let has_more = cut(&mut data, limit);
    Ok(Json(List::new(data, has_more)))
}
