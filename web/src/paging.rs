//! A page of a list, as every list route of the API takes and answers it.

use crate::error::ApiError;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// How many (default 20, at most 100 for jobs, 1000 for events, 500 for the audit log;
    /// datasets: all unless given).
    pub limit: Option<i64>,
    /// Jobs and the audit log: older than this id. Events: after this event id. Datasets:
    /// after this dataset version in the list.
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}

impl<T> List<T> {
    /// A page of `data`; `has_more` when rows were left after it.
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        Self {
            object: "list",
            data,
            has_more,
        }
    }
}

/// A page as OpenAI's list routes answer it (`/v1/files`, `/v1/fine_tuning/jobs`): with
/// the ids of its first and last items.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiList<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

impl<T> OpenAiList<T> {
    /// A page of `data`, each item's id given by `id`.
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> String) -> Self {
        Self {
            object: "list",
            first_id: data.first().map(&id),
            last_id: data.last().map(&id),
            data,
            has_more,
        }
    }
}

/// An OpenAI-style id (`file-12`, `ftjob-7`; the bare number too) as its number.
pub fn prefixed_id(id: &str, prefix: &str) -> Option<i64> {
    id.strip_prefix(prefix).unwrap_or(id).parse().ok()
}

/// The query of a list route; a limit under 1 is refused.
pub fn page_query(q: Result<Query<Page>, QueryRejection>) -> Result<Page, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    if p.limit.is_some_and(|l| l < 1) {
        return Err(ApiError::invalid("limit", "limit must be at least 1"));
    }
    Ok(p)
}

/// Keep the first `limit` of `rows` (read as `limit + 1`); whether there were more.
pub fn cut<T>(rows: &mut Vec<T>, limit: i64) -> bool {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    more
}
