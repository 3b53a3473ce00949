//! `POST /api/v1/datasets/build`: conversations, ratings and corrections to training rows,
//! with the filters of the console's form and more (the shared builder:
//! `loraloop_trainer::dataset::build`).

use crate::error::{ApiError, ErrorBody};
use crate::operations::DatasetView;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use loraloop_core::storage::DatasetInsert;
use loraloop_trainer::dataset::{BuildError, BuildSpec, build_rows, store};
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Built {
    pub object: &'static str,
    /// `sft`, `dpo` or `kto`.
    pub kind: &'static str,
    /// How many rows the filters gave.
    pub rows: usize,
    /// The stored dataset version (with a name).
    pub dataset: Option<DatasetView>,
    /// False when the latest version already held exactly these examples.
    pub created: Option<bool>,
    /// The rows, one JSONL object each: OpenAI chat lines (SFT), OpenAI preference lines
    /// (`input`, `preferred_output`, `non_preferred_output`: DPO) or TRL's unpaired lines
    /// (`prompt`, `completion`, `label`: KTO). Empty when stored.
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<serde_json::Value>,
}

fn api_error(e: BuildError) -> ApiError {
    match e {
        BuildError::Invalid { field, message } => ApiError::invalid(field, message),
        BuildError::Empty(_) => ApiError::invalid("filters", e.to_string()),
        BuildError::Storage(e) => e.into(),
    }
}

/// Build training rows from stored conversations: filters by assistant, adapter,
/// platform, chat, date range and rating; SFT examples, DPO pairs from operators'
/// corrections, or KTO rows from 👍/👎 (stored as a dataset version when `name` is given,
/// which a job then trains on by its kind).
#[utoipa::path(post, path = "/api/v1/datasets/build", request_body(content = Object, description = "kind (sft, dpo, kto), name (store the rows as this dataset), assistant, adapter, platform, chat, from, to, rating, only_upvoted, include_corrections, exclude_downvoted"),
    responses((status = 200, body = Built), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn build_dataset(
    State(state): State<AppState>,
    body: Result<Json<BuildSpec>, JsonRejection>,
) -> Result<Json<Built>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::invalid("body", e.body_text()))?;
    let db = &state.core.db;
    let filter = req.filter(db).await.map_err(api_error)?;
    let kind = req.kind;
    if let Some(name) = &req.name {
        let stored = store(db, name, &filter, kind).await.map_err(api_error)?;
        let created = matches!(stored, DatasetInsert::Created(_));
        let d = stored.dataset().clone();
        return Ok(Json(Built {
            object: "dataset.build",
            kind: kind.as_str(),
            rows: d.example_count as usize,
            dataset: Some(d.into()),
            created: Some(created),
            data: Vec::new(),
        }));
    }
    let data = build_rows(db, &filter, kind).await.map_err(api_error)?;
    Ok(Json(Built {
        object: "dataset.build",
        kind: kind.as_str(),
        rows: data.len(),
        dataset: None,
        created: None,
        data,
    }))
}
