//! The canary as the API shows it: the running one (or the last one) with the ratings of
//! both sides and where the decision stands, and stopping it.

use crate::assistant_api::{AssistantQuery, query_assistant};
use crate::error::{ApiError, ErrorBody};
use crate::operations::unix;
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use loraloop_core::canary::Decision;
use loraloop_core::service::CanaryStatus;
use loraloop_core::storage::Assistant;
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Canary)]
pub struct CanaryView {
    pub object: &'static str,
    pub id: i64,
    /// The candidate adapter.
    pub adapter_id: i64,
    /// What users had when it started (None: the base model).
    pub baseline_adapter_id: Option<i64>,
    /// The share of new conversations the candidate serves.
    pub share: f64,
    /// `running`, `promoted`, `rolled_back` or `cancelled`.
    pub status: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// Why it ended; for a running canary, where the decision stands.
    pub reason: Option<String>,
    pub candidate_up: u64,
    pub candidate_rated: u64,
    pub baseline_up: u64,
    pub baseline_rated: u64,
}

impl From<CanaryStatus> for CanaryView {
    fn from(s: CanaryStatus) -> Self {
        let c = s.canary;
        let standing = s.decision.map(|d| match d {
            Decision::Wait { reason }
            | Decision::Promote { reason }
            | Decision::RollBack { reason } => reason,
        });
        Self {
            object: "canary",
            id: c.id,
            adapter_id: c.adapter_id,
            baseline_adapter_id: c.baseline_adapter_id,
            share: c.share,
            status: c.outcome.unwrap_or_else(|| "running".into()),
            started_at: unix(&c.started_at),
            ended_at: c.ended_at.as_deref().map(unix),
            reason: c.reason.or(standing),
            candidate_up: s.candidate.up,
            candidate_rated: s.candidate.rated,
            baseline_up: s.current.up,
            baseline_rated: s.current.rated,
        }
    }
}

/// The assistant's latest canaries, newest first, with their ratings.
pub async fn canary_views(
    state: &AppState,
    assistant: &Assistant,
    limit: i64,
) -> Result<Vec<CanaryView>, ApiError> {
    let mut out = Vec::new();
    for c in state.core.db.canaries(assistant.id, limit).await? {
        out.push(state.core.canary.status(c).await?.into());
    }
    Ok(out)
}

/// The running canary, or the last one, with the ratings of both sides. 404 when there
/// has never been one.
#[utoipa::path(get, path = "/api/v1/canary", params(AssistantQuery),
    responses((status = 200, body = CanaryView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_canary(
    State(state): State<AppState>,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Json<CanaryView>, ApiError> {
    let assistant = query_assistant(&state, q).await?;
    canary_views(&state, &assistant, 1)
        .await?
        .into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no canary has run yet (assistant.activation: canary starts one when a job's adapter passes the gate)"))
}

/// Stop the running canary: the candidate is rolled back, and conversations pinned to it
/// move to the active adapter at their next message. 409 when none runs.
#[utoipa::path(post, path = "/api/v1/canary/stop", params(AssistantQuery),
    responses((status = 200, body = CanaryView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stop_canary(
    State(state): State<AppState>,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Json<CanaryView>, ApiError> {
    let assistant = query_assistant(&state, q).await?;
    let c = state.core.canary.stop(assistant.id, "api").await?;
    Ok(Json(state.core.canary.status(c).await?.into()))
}
