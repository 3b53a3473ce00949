//! The REST API under `/api/v1` (bearer auth), with its OpenAPI document generated from
//! these handlers by utoipa.

use crate::adapter_views::{ActivationView, AdapterView, adapter_views};
use crate::assistant_api::{AssistantQuery, query_assistant};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::operations::{self, CreateJob, DatasetView, Imported, JobView};
use crate::paging::{List, Page, cut, page_query};
use crate::path_params::{JobPathId, NumericId};
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::Stream;
use loraloop_core::storage::TrainingEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "loraloop", description = "Self-hosted chat assistants that learn from their own conversations: datasets, fine-tuning jobs, adapters, and an OpenAI-compatible chat endpoint."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route that needs the API key, with its OpenAPI description.
pub fn router(_state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_job, list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(job_events))
        .routes(routes!(upload_dataset, list_datasets))
        .routes(routes!(crate::build_api::build_dataset))
        .routes(routes!(
            crate::assistant_api::list_assistants,
            crate::assistant_api::create_assistant
        ))
        .routes(routes!(
            crate::assistant_api::get_assistant,
            crate::assistant_api::update_assistant,
            crate::assistant_api::delete_assistant
        ))
        .routes(routes!(crate::assistant_api::add_route))
        .routes(routes!(crate::assistant_api::delete_route))
        .routes(routes!(list_adapters))
        .routes(routes!(activate_adapter))
        .routes(routes!(crate::export_api::export_adapter))
        .routes(routes!(
            crate::sweep_api::create_sweep,
            crate::sweep_api::list_sweeps
        ))
        .routes(routes!(crate::sweep_api::get_sweep))
        .routes(routes!(rollback_adapter))
        .routes(routes!(crate::canary_views::get_canary))
        .routes(routes!(crate::canary_views::stop_canary))
        .routes(routes!(crate::openai::chat_completions))
        .routes(routes!(crate::openai::list_models))
        .routes(routes!(crate::openai::retrieve_model))
        .routes(routes!(
            crate::openai_files::upload_file,
            crate::openai_files::list_files
        ))
        .routes(routes!(
            crate::openai_files::get_file,
            crate::openai_files::delete_file
        ))
        .routes(routes!(crate::openai_files::file_content))
        .routes(routes!(
            crate::fine_tuning::create_fine_tuning_job,
            crate::fine_tuning::list_fine_tuning_jobs
        ))
        .routes(routes!(crate::fine_tuning::get_fine_tuning_job))
        .routes(routes!(crate::fine_tuning::cancel_fine_tuning_job))
        .routes(routes!(crate::fine_tuning::list_fine_tuning_events))
        .routes(routes!(crate::fine_tuning::list_fine_tuning_checkpoints))
        .routes(routes!(metrics))
        .routes(routes!(crate::classifier_api::list))
        .routes(routes!(crate::classifier_api::get))
        .routes(routes!(crate::classifier_api::cancel))
        .routes(routes!(crate::classifier_api::events))
        .routes(routes!(crate::classifier_api::predict))
        .routes(routes!(crate::audit::list_audit))
}

/// Create a fine-tuning job.
#[utoipa::path(post, path = "/api/v1/fine-tune", request_body = CreateJob,
    responses((status = 200, body = JobView, description = "a chat-model job; a classifier request (model_id an encoder or ResNet folder) answers a ClassifierJobView"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_job(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateJob>,
) -> Result<Json<Value>, ApiError> {
    if let Some(job) = crate::classifier_api::create(&state, &req).await? {
        return json_value(job);
    }
    let job = operations::create_job(&state, &req, crate::audit::API).await?;
    json_value(operations::job_view(&state, job).await?)
}

/// List fine-tuning jobs, newest first.
#[utoipa::path(get, path = "/api/v1/fine-tune", params(Page),
    responses((status = 200, body = List<JobView>), (status = 401, body = ErrorBody)))]
async fn list_jobs(
    State(state): State<AppState>,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<List<JobView>>, ApiError> {
    let p = page_query(q)?;
    let limit = p.limit.unwrap_or(20).min(100);
    let mut jobs = state.core.db.list_jobs(p.after, limit + 1).await?;
    let has_more = crate::paging::cut(&mut jobs, limit);
    let mut data = Vec::with_capacity(jobs.len());
    for j in jobs {
        data.push(operations::job_view(&state, j).await?);
    }
    Ok(Json(List::new(data, has_more)))
}

/// One fine-tuning job.
#[utoipa::path(get, path = "/api/v1/fine-tune/{id}", params(("id" = String, Path, description = "N (a chat-model job) or clsjob-N (a classifier job)")),
    responses((status = 200, body = JobView, description = "a chat-model job; a classifier job answers a ClassifierJobView"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(State(state): State<AppState>, job: JobRef) -> Result<Json<Value>, ApiError> {
    match job {
        JobRef::Chat(id) => chat_job_json(&state, id).await,
        JobRef::Classifier(id) => {
            classifier_json(crate::classifier_api::get(State(state), Path(id))).await
        }
    }
}

/// A view as the `Value` the job endpoints answer (a chat-model or a classifier job).
fn json_value(view: impl Serialize) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(view).map_err(ApiError::internal)?,
    ))
}

/// Chat-model job `id` as the job endpoints answer it.
async fn chat_job_json(state: &AppState, id: i64) -> Result<Json<Value>, ApiError> {
    let job = state.core.db.job(id).await?;
    json_value(operations::job_view(state, job).await?)
}

/// What a classifier job's own endpoint answered, as the job endpoints answer it.
async fn classifier_json<V: Serialize>(
    answer: impl Future<Output = Result<Json<V>, ApiError>>,
) -> Result<Json<Value>, ApiError> {
    let Json(view) = answer.await?;
    json_value(view)
}

/// A job id in a path: `N` for a chat-model job, `clsjob-N` for a classifier job (what
/// `POST /api/v1/fine-tune` answers for one), so one set of job endpoints serves both.
enum JobRef {
    Chat(i64),
    Classifier(String),
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for JobRef {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let JobPathId(id) = JobPathId::from_request_parts(parts, state).await?;
        if id.starts_with(crate::classifier_api::ID_PREFIX) {
            return Ok(JobRef::Classifier(id));
        }
        id.parse()
            .map(JobRef::Chat)
            .map_err(|_| ApiError::not_found(format!("no such id: {id:?}")))
    }
}

/// Cancel a job: a queued one at once, a running one at its next step (it keeps a checkpoint).
#[utoipa::path(post, path = "/api/v1/fine-tune/{id}/cancel", params(("id" = String, Path, description = "N (a chat-model job) or clsjob-N (a classifier job)")),
    responses((status = 200, body = JobView, description = "a chat-model job; a classifier job answers a ClassifierJobView"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel_job(State(state): State<AppState>, job: JobRef) -> Result<Json<Value>, ApiError> {
    match job {
        JobRef::Chat(id) => {
            operations::cancel_job(&state, id, &format!("job {id}"), crate::audit::API).await?;
            chat_job_json(&state, id).await
        }
        JobRef::Classifier(id) => {
            classifier_json(crate::classifier_api::cancel(State(state), Path(id))).await
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub object: &'static str,
    pub id: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// step, eval, log or state
    #[serde(rename = "type")]
    pub kind: String,
    pub step: Option<i64>,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub message: Option<String>,
    /// The message parsed, when it is JSON (the trainer's structured events).
    #[schema(value_type = Object)]
    pub data: Option<serde_json::Value>,
}

pub fn event_view(e: TrainingEvent) -> EventView {
    EventView {
        object: "fine_tuning.job.event",
        id: e.id,
        created_at: operations::unix(&e.created_at),
        data: e
            .message
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok()),
        kind: e.kind,
        step: e.step,
        loss: e.loss,
        eval_loss: e.eval_loss,
        learning_rate: e.learning_rate,
        tokens_per_sec: e.tokens_per_sec,
        message: e.message,
    }
}

/// A job's events, oldest first (`after` pages on). With `Accept: text/event-stream`, a
/// live stream of server-sent events that ends when the job has finished.
#[utoipa::path(get, path = "/api/v1/fine-tune/{id}/events", params(("id" = String, Path, description = "N (a chat-model job) or clsjob-N (a classifier job: its events as GET /api/v1/classifier-jobs/{id}/events answers them)"), Page),
    responses((status = 200, body = List<EventView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn job_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    job: JobRef,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = match job {
        JobRef::Chat(id) => id,
        JobRef::Classifier(id) => {
            return Ok(crate::classifier_api::events(State(state), Path(id))
                .await?
                .into_response());
        }
    };
    let p = page_query(q)?;
    state.core.db.job(id).await?; // 404 for a job that does not exist
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if sse {
        return Ok(event_stream(state, id, p.after.unwrap_or(0)).into_response());
    }
    let limit = p.limit.unwrap_or(100).min(1000);
    let mut events = state
        .core
        .db
        .training_events(id, p.after.unwrap_or(0))
        .await?;
    let has_more = crate::paging::cut(&mut events, limit);
    Ok(Json(List::new(
        events.into_iter().map(event_view).collect(),
        has_more,
    ))
    .into_response())
}

/// Server-sent events of a job from `after` on: each stored event as it arrives (event
/// name = its type, id = its id, data = the event JSON), then `done` with the final job.
pub fn event_stream(
    state: AppState,
    id: i64,
    after: i64,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = async_stream(state, id, after);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn async_stream(
    state: AppState,
    id: i64,
    mut after: i64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        loop {
            let events = match state.core.db.training_events(id, after).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("event stream of job {id}: {e}");
                    return;
                }
            };
            for e in events {
                after = e.id;
                let kind = e.kind.clone();
                let data = serde_json::to_string(&event_view(e)).unwrap_or_default();
                if tx
                    .send(
                        SseEvent::default()
                            .event(kind)
                            .id(after.to_string())
                            .data(data),
                    )
                    .await
                    .is_err()
                {
                    return; // the client left
                }
            }
            let job = match state.core.db.job(id).await {
                Ok(j) => j,
                Err(_) => return,
            };
            if job.state().is_final() {
                // Events written just before the state changed were read above or are read now.
                if let Ok(rest) = state.core.db.training_events(id, after).await {
                    for e in rest {
                        after = e.id;
                        let kind = e.kind.clone();
                        let data = serde_json::to_string(&event_view(e)).unwrap_or_default();
                        let _ = tx
                            .send(
                                SseEvent::default()
                                    .event(kind)
                                    .id(after.to_string())
                                    .data(data),
                            )
                            .await;
                    }
                }
                if let Ok(view) = operations::job_view(&state, job).await {
                    let data = serde_json::to_string(&view).unwrap_or_default();
                    let _ = tx.send(SseEvent::default().event("done").data(data)).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Dataset name (letters, digits, '-', '_', '.'); a multipart `name` field works too.
    pub name: Option<String>,
    /// openai, prompt-completion, text, alpaca or sharegpt (default: detected).
    pub format: Option<String>,
}

/// Upload a JSONL dataset: the raw body (`Content-Type: application/jsonl`) or a
/// multipart form with a `file` part (and optional `name`, `format` parts). Stored as the
/// next version of its name; an invalid file is refused whole with its problems listed.
#[utoipa::path(post, path = "/api/v1/datasets", params(UploadQuery),
    request_body(content = String, content_type = "application/jsonl"),
    responses((status = 200, body = Imported), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn upload_dataset(
    State(state): State<AppState>,
    q: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Json<Imported>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let (bytes, fields) = crate::files::read_upload(&state, req, "file").await?;
    let name = q
        .name
        .or_else(|| fields.get("name").cloned())
        .ok_or_else(|| {
            ApiError::invalid(
                "name",
                "give the dataset a name (?name=... or a `name` form field)",
            )
        })?;
    let format = q.format.or_else(|| fields.get("format").cloned());
    let source = fields
        .get("filename")
        .cloned()
        .unwrap_or_else(|| "upload".into());
    Ok(Json(
        operations::import_dataset(&state, &name, bytes, format.as_deref(), &source).await?,
    ))
}

/// Every dataset version, by name then version; with `limit`, a page of them, the next
/// one after the id of the last (`after`).
#[utoipa::path(get, path = "/api/v1/datasets", params(Page),
    responses((status = 200, body = List<DatasetView>), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn list_datasets(
    State(state): State<AppState>,
    q: Result<Query<Page>, QueryRejection>,
) -> Result<Json<List<DatasetView>>, ApiError> {
    let page = page_query(q)?;
    let mut rows = state.core.db.list_datasets().await?;
    if let Some(after) = page.after {
        let Some(i) = rows.iter().position(|d| d.id == after) else {
            return Err(ApiError::invalid(
                "after",
                format!("no dataset version has id {after}"),
            ));
        };
        rows.drain(..=i);
    }
    let more = page.limit.is_some_and(|l| cut(&mut rows, l));
    let data = rows.into_iter().map(DatasetView::from).collect();
    Ok(Json(List::new(data, more)))
}

/// The adapters an assistant may use (its own and those tied to none), with their metrics
/// and whether they are its active one.
#[utoipa::path(get, path = "/api/v1/adapters", params(AssistantQuery),
    responses((status = 200, body = List<AdapterView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_adapters(
    State(state): State<AppState>,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Json<List<AdapterView>>, ApiError> {
    let assistant = query_assistant(&state, q).await?;
    Ok(Json(List::new(
        adapter_views(&state, &assistant).await?,
        false,
    )))
}

/// Activate an adapter: the next reply comes from it; replies in flight finish on the
/// adapter they started with. A second activation while one runs gets a 409.
#[utoipa::path(post, path = "/api/v1/adapters/{id}/activate", params(("id" = i64, Path), AssistantQuery),
    responses((status = 200, body = ActivationView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn activate_adapter(
    State(state): State<AppState>,
    NumericId(id): NumericId,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Json<ActivationView>, ApiError> {
    let assistant = query_assistant(&state, q).await?;
    Ok(Json(
        state
            .core
            .adapters
            .activate(assistant.id, Some(id), "api")
            .await?
            .into(),
    ))
}

/// Undo the newest activation still in force (each rollback goes one step further back
/// in the activation history); a running canary is cancelled.
#[utoipa::path(post, path = "/api/v1/adapters/rollback", params(AssistantQuery),
    responses((status = 200, body = ActivationView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn rollback_adapter(
    State(state): State<AppState>,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Json<ActivationView>, ApiError> {
    let assistant = query_assistant(&state, q).await?;
    Ok(Json(
        state
            .core
            .adapters
            .rollback(assistant.id, "api")
            .await?
            .into(),
    ))
}

/// Prometheus metrics: requests, generation tokens/s, queue depth, training step time.
#[utoipa::path(get, path = "/metrics", responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (queued, running) = state.core.db.active_job_counts().await?;
    // The running job's last two step events give its step time.
    let steps = state.core.db.last_running_steps().await?;
    let training = match steps.as_slice() {
        [(t1, tps), (t0, _)] => {
            let secs = |t: &str| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|d| d.timestamp_millis() as f64 / 1e3)
                    .unwrap_or(0.0)
            };
            Some((secs(t1) - secs(t0), tps.unwrap_or(0.0)))
        }
        _ => None,
    };
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.core.metrics.render(queued, running, training),
    )
        .into_response())
}
