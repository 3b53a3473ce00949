//! `POST /api/v1/sweeps` (and `loraloop sweep`, which calls it): grid or random search
//! over training settings, each trial an ordinary job on one stored dataset; `GET
//! /api/v1/sweeps/{id}` ranks the trials by their report cards
//! ([`loraloop_trainer::sweep`]).

use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::operations::{CreateJob, create_trial, job_settings};
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use loraloop_core::storage::{Dataset, Sweep};
use loraloop_trainer::sweep::{DatasetRef, Standing, SweepSpec, standings};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TrialView {
    pub job_id: i64,
    pub status: String,
    /// What this trial sets that the others may not.
    #[schema(value_type = Object)]
    pub varied: Map<String, Value>,
    pub adapter: Option<String>,
    /// 1 for the best; None until it has a report card.
    pub rank: Option<usize>,
    #[schema(value_type = Option<Object>)]
    pub standing: Option<Standing>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SweepView {
    pub object: &'static str,
    pub id: i64,
    pub name: String,
    /// running or finished
    pub status: &'static str,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub best_job_id: Option<i64>,
    pub best_adapter: Option<String>,
    /// What the sweep did with its best adapter.
    pub decision: Option<String>,
    pub trials: Vec<TrialView>,
}

async fn dataset_of(state: &AppState, d: &DatasetRef) -> Result<Dataset, ApiError> {
    let db = &state.core.db;
    match d {
        DatasetRef::Id(id) => crate::operations::dataset_by_id(state, *id).await,
        DatasetRef::Name(n) => db
            .dataset(n, None)
            .await
            .map_err(|e| ApiError::from(e).with_param("dataset")),
    }
}

/// Start a sweep: every trial is checked first, then created as a queued job.
#[utoipa::path(post, path = "/api/v1/sweeps", request_body(content = Object, description = "name, dataset (id or name), assistant, search (grid | random), trials, seed, hyperparameters (shared), parameters ({setting: [values]}), activate_best"),
    responses((status = 200, body = SweepView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_sweep(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<SweepSpec>,
) -> Result<Json<SweepView>, ApiError> {
    let sweep = start_sweep(&state, &spec, crate::audit::API).await?;
    Ok(Json(sweep_view(&state, sweep).await?))
}

/// Check every trial of `spec`, then create the sweep and its trials as queued jobs (the
/// API's route and the console's form).
pub async fn start_sweep(
    state: &AppState,
    spec: &SweepSpec,
    actor: &str,
) -> Result<Sweep, ApiError> {
    let trials = spec
        .trials()
        .map_err(|m| ApiError::invalid("parameters", m))?;
    let dataset = dataset_of(state, &spec.dataset).await?;
    let requests: Vec<CreateJob> = trials
        .iter()
        .map(|t| CreateJob {
            model_id: None,
            dataset_id: Some(dataset.id),
            assistant: spec.assistant.clone(),
            dataset_url: None,
            epochs: t.epochs,
            method: t.method.clone(),
            hyperparameters: t.hyperparameters.clone(),
            ..Default::default()
        })
        .collect();
    for (i, r) in requests.iter().enumerate() {
        job_settings(r).map_err(|mut e| {
            e.message = format!(
                "trial {} ({}): {}",
                i + 1,
                Value::Object(trials[i].varied.clone()),
                e.message
            );
            e
        })?;
    }
    let name = spec
        .name
        .clone()
        .unwrap_or_else(|| format!("sweep on {} v{}", dataset.name, dataset.version));
    let spec_json = serde_json::to_value(spec).map_err(ApiError::internal)?;
    let sweep = state.core.db.create_sweep(&name, &spec_json).await?;
    for r in &requests {
        create_trial(state, r, actor, Some(sweep.id)).await?;
    }
    crate::audit::record(
        state,
        actor,
        "start sweep",
        &format!(
            "sweep {} ({} trials on {} v{})",
            sweep.id,
            requests.len(),
            dataset.name,
            dataset.version
        ),
    )
    .await;
    Ok(sweep)
}

pub async fn sweep_view(state: &AppState, sweep: Sweep) -> Result<SweepView, ApiError> {
    let db = &state.core.db;
    let spec: Option<SweepSpec> = serde_json::from_str(&sweep.spec).ok();
    let varied = spec.and_then(|s| s.trials().ok()).unwrap_or_default();
    let jobs = db.sweep_jobs(sweep.id).await?;
    let ranked = standings(db, &jobs).await.map_err(ApiError::internal)?;
    let mut trials = Vec::with_capacity(jobs.len());
    let mut best_adapter = None;
    for (i, j) in jobs.iter().enumerate() {
        let adapter = match j.adapter_id {
            Some(a) => db.adapter(a).await.ok().map(|a| a.name),
            None => None,
        };
        if Some(j.id) == sweep.best_job_id {
            best_adapter = adapter.clone();
        }
        let rank = ranked.iter().position(|s| s.job_id == j.id);
        trials.push(TrialView {
            job_id: j.id,
            status: j.state.clone(),
            varied: varied.get(i).map(|t| t.varied.clone()).unwrap_or_default(),
            adapter,
            rank: rank.map(|r| r + 1),
            standing: rank.map(|r| ranked[r].clone()),
        });
    }
    Ok(SweepView {
        object: "sweep",
        id: sweep.id,
        name: sweep.name,
        status: if sweep.finished_at.is_some() {
            "finished"
        } else {
            "running"
        },
        created_at: crate::operations::unix(&sweep.created_at),
        finished_at: sweep.finished_at.as_deref().map(crate::operations::unix),
        best_job_id: sweep.best_job_id,
        best_adapter,
        decision: sweep.decision,
        trials,
    })
}

/// One sweep with its trials, ranked by their report cards.
#[utoipa::path(get, path = "/api/v1/sweeps/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = SweepView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_sweep(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<SweepView>, ApiError> {
    let Path(id) =
        id.map_err(|e| ApiError::not_found(format!("no such sweep: {}", e.body_text())))?;
    let sweep = state.core.db.sweep(id).await?;
    Ok(Json(sweep_view(&state, sweep).await?))
}

/// Sweeps, newest first (the latest 100).
#[utoipa::path(get, path = "/api/v1/sweeps",
    responses((status = 200, body = crate::paging::List<SweepView>), (status = 401, body = ErrorBody)))]
pub async fn list_sweeps(
    State(state): State<AppState>,
) -> Result<Json<crate::paging::List<SweepView>>, ApiError> {
    let mut data = Vec::new();
    for s in state.core.db.list_sweeps(100).await? {
        data.push(sweep_view(&state, s).await?);
    }
    Ok(Json(crate::paging::List::new(data, false)))
}
