//! Classifier fine-tunes over HTTP: `POST /api/v1/fine-tune` with `model_id` naming an
//! encoder or ResNet folder in the models directory (or `resnet18|34|50`) and `data_path`
//! naming a file or folder inside `imports.dir` queues a classifier job `clsjob-N`; its
//! state and events are under `/api/v1/classifier-jobs` (and `/api/v1/fine-tune/clsjob-N`,
//! which `api` hands here), and `POST /api/v1/predict` serves the best
//! checkpoint of a finished job. A client's strings never become arbitrary paths: both
//! names are resolved inside their configured folders.

use crate::error::ApiError;
use crate::operations::CreateJob;
use crate::paging::{List, Page, page_query};
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use loraloop_core::storage::{ClassifierJob, ClassifierJobEvent, NewClassifierJob};
use loraloop_model::classify::{self, Classifier, Task};
use loraloop_trainer::classify::ClassifySettings;
use loraloop_trainer::classify::worker::task_key;
use loraloop_trainer::config::TrainFile;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Component, PathBuf};
use std::sync::{Arc, Mutex};
use utoipa::ToSchema;

/// Training-YAML keys a classifier job may set (plus `batch_size` and `n_epochs`).
pub const CLASSIFIER_HYPERPARAMETERS: [&str; 18] = [
    "num_epochs",
    "n_epochs",
    "batch_size",
    "micro_batch_size",
    "max_steps",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "freeze_trainable_layers",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "val_set_size",
    "early_stopping_patience",
    "metric_for_best_model",
];
/// Also accepted: `seed`, `sequence_len`, `image_size`, `gradient_checkpointing`.
const MORE_KEYS: [&str; 4] = [
    "seed",
    "sequence_len",
    "image_size",
    "gradient_checkpointing",
];

/// A classifier job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifierJobView {
    /// `clsjob-N`.
    pub id: String,
    pub object: &'static str,
    pub task: String,
    pub status: String,
    pub model: String,
    pub data_path: String,
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub best_checkpoint: Option<String>,
    pub best_metric: Option<f64>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

pub fn view(job: ClassifierJob) -> ClassifierJobView {
    ClassifierJobView {
        id: format!("{ID_PREFIX}{}", job.id),
        object: "classifier_job",
        task: job.task.replace('_', "-"),
        status: job.state,
        model: job.base_model,
        data_path: job.data_path,
        hyperparameters: serde_json::from_str(&job.settings).unwrap_or(Value::Null),
        step: job.step,
        total_steps: job.total_steps,
        best_checkpoint: job.best_checkpoint,
        best_metric: job.best_metric,
        error: job.error,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
    }
}

/// A name that must stay inside its folder: relative, no `..`, not empty.
fn inside(root: &std::path::Path, name: &str, param: &str) -> Result<PathBuf, ApiError> {
    let rel = std::path::Path::new(name);
    let ok = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be a relative name inside its folder, got {name:?}"),
        ));
    }
    Ok(root.join(rel))
}

/// A name inside `imports.dir` as the real path it resolves to, with the same check as
/// a local `dataset_url` (links followed first, so a link out of the folder is refused).
async fn in_imports(root: &std::path::Path, name: &str, param: &str) -> Result<PathBuf, ApiError> {
    let lexical = inside(root, name, param)?;
    crate::dataset_url::resolve_inside(root, &lexical)
        .await
        .ok_or_else(|| ApiError::invalid(param, format!("{name} is not in imports.dir")))
}

/// The classifier base a request names, or `None` when it is not a classifier request.
fn classifier_base(state: &AppState, req: &CreateJob) -> Result<Option<(PathBuf, Task)>, ApiError> {
    let asked = req.task.as_deref().map(|t| {
        Task::parse(t).ok_or_else(|| {
            ApiError::invalid(
                "task",
                format!("unknown task {t:?}; expected text-classification or image-classification"),
            )
        })
    });
    let asked = asked.transpose()?;
    let Some(model_id) = req.model_id.as_deref() else {
        return match asked {
            Some(_) => Err(ApiError::invalid(
                "model_id",
                "a classifier job needs model_id: a model folder in the models directory, or resnet18|34|50",
            )),
            None => Ok(None),
        };
    };
    let path = if classify::resnet::ResNetConfig::named(model_id).is_some()
        && !state.core.config.models_dir.join(model_id).exists()
    {
        PathBuf::from(model_id)
    } else {
        match inside(&state.core.config.models_dir, model_id, "model_id") {
            Ok(p) => p,
            Err(e) if asked.is_some() => return Err(e),
            Err(_) => return Ok(None),
        }
    };
    match (classify::detect_task(&path), asked) {
        (Some(found), Some(t)) if found != t => Err(ApiError::invalid(
            "task",
            format!("{model_id} is a {} model, not {}", found.name(), t.name()),
        )),
        (Some(found), _) => Ok(Some((path, found))),
        (None, Some(t)) => Err(ApiError::invalid(
            "model_id",
            format!(
                "{model_id} is not an encoder or ResNet folder in the models directory, so it cannot be fine-tuned for {}",
                t.name()
            ),
        )),
        (None, None) => Ok(None),
    }
}

/// Queue a classifier job when the request is one; `None` leaves it to the chat-model path.
pub async fn create(
    state: &AppState,
    req: &CreateJob,
) -> Result<Option<ClassifierJobView>, ApiError> {
    let Some((model, task)) = classifier_base(state, req)? else {
        if req.data_path.is_some() || req.eval_data_path.is_some() {
            return Err(ApiError::invalid(
                "data_path",
                "data_path is for classifier jobs; model_id does not name an encoder or ResNet folder in the models directory (chat-model jobs take dataset_id or dataset_url)",
            ));
        }
        return Ok(None);
    };
    let Some(root) = state.core.config.raw.imports.dir.clone() else {
        return Err(ApiError::invalid(
            "data_path",
            "classifier data is read from imports.dir, which is not set in the configuration",
        ));
    };
    let data_name = req
        .data_path
        .as_deref()
        .ok_or_else(|| ApiError::invalid("data_path", "a classifier job needs data_path: a JSONL/CSV file of texts or a folder of class folders, inside imports.dir"))?;
    let data = in_imports(&root, data_name, "data_path").await?;
    let eval = match req.eval_data_path.as_deref() {
        Some(e) => Some(in_imports(&root, e, "eval_data_path").await?),
        None => None,
    };
    let settings = settings_of(req, task)?;
    // The data must be readable for the task before anything is queued.
    let (d, t) = (data.clone(), task);
    tokio::task::spawn_blocking(move || loraloop_trainer::classify::data::read_for(&d, t))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid("data_path", e))?;
    let out = state
        .core
        .adapters_dir
        .parent()
        .unwrap_or(&state.core.adapters_dir)
        .join("classifiers")
        .join("clsjob-{id}");
    let job = state
        .core
        .db
        .create_classifier_job(&NewClassifierJob {
            task: task_key(task),
            base_model: &model.display().to_string(),
            data_path: &data.display().to_string(),
            eval_data_path: eval.as_ref().map(|p| p.display().to_string()).as_deref(),
            settings: &Value::Object(settings),
            output_dir: &out.display().to_string(),
        })
        .await?;
    Ok(Some(view(job)))
}

/// The request's settings as training-YAML keys, validated as the trainer will read them.
fn settings_of(req: &CreateJob, task: Task) -> Result<Map<String, Value>, ApiError> {
    let mut hp = Map::new();
    for (k, v) in &req.hyperparameters {
        if !CLASSIFIER_HYPERPARAMETERS.contains(&k.as_str()) && !MORE_KEYS.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                format!("hyperparameters.{k}"),
                format!(
                    "unknown hyperparameter {k:?} for a classifier; allowed: {}, {}",
                    CLASSIFIER_HYPERPARAMETERS.join(", "),
                    MORE_KEYS.join(", ")
                ),
            ));
        }
        hp.insert(k.clone(), v.clone());
    }
    if let Some(e) = hp.remove("n_epochs") {
        hp.insert("num_epochs".into(), e);
    }
    if let Some(e) = req.epochs {
        hp.insert("num_epochs".into(), Value::from(e));
    }
    if let Some(b) = hp.remove("batch_size") {
        hp.insert("micro_batch_size".into(), b);
    }
    if let Some(m) = req.method.as_deref() {
        hp.insert("finetuning_type".into(), Value::from(m));
    }
    hp.insert("task".into(), Value::from(task.name()));
    let file: TrainFile = serde_json::from_value(Value::Object(hp.clone()))
        .map_err(|e| ApiError::invalid("hyperparameters", format!("hyperparameters: {e}")))?;
    ClassifySettings::from_file(&file, task).map_err(|e| match e {
        loraloop_trainer::config::ConfigError::Invalid { key, message } => {
            let p = if key == "finetuning_type" {
                "method".to_string()
            } else {
                format!("hyperparameters.{key}")
            };
            ApiError::invalid(p, format!("{key}: {message}"))
        }
        other => ApiError::invalid("hyperparameters", other.to_string()),
    })?;
    Ok(hp)
}

/// What a classifier job's id starts with (`clsjob-N`).
pub const ID_PREFIX: &str = "clsjob-";

fn job_id(s: &str) -> Result<i64, ApiError> {
    s.strip_prefix(ID_PREFIX)
        .unwrap_or(s)
        .parse()
        .map_err(|_| ApiError::not_found(format!("no classifier job {s:?}")))
}

/// Classifier jobs, newest first; `after=N` pages on to jobs older than clsjob-N.
#[utoipa::path(get, path = "/api/v1/classifier-jobs", params(Page),
    responses((status = 200, body = List<ClassifierJobView>), (status = 422, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<Page>, QueryRejection>,
) -> Result<Json<List<ClassifierJobView>>, ApiError> {
    let p = page_query(q)?;
    let limit = p.limit.unwrap_or(20).min(100);
    let mut jobs = state
        .core
        .db
        .list_classifier_jobs(p.after, limit + 1)
        .await?;
    let has_more = crate::paging::cut(&mut jobs, limit);
    Ok(Json(List::new(
        jobs.into_iter().map(view).collect(),
        has_more,
    )))
}

/// One classifier job.
#[utoipa::path(get, path = "/api/v1/classifier-jobs/{id}", params(("id" = String, Path, description = "clsjob-N")),
    responses((status = 200, body = ClassifierJobView), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ClassifierJobView>, ApiError> {
    Ok(Json(view(
        state.core.db.classifier_job(job_id(&id)?).await?,
    )))
}

/// Cancel: a queued job at once, a running one at its next step.
#[utoipa::path(post, path = "/api/v1/classifier-jobs/{id}/cancel", params(("id" = String, Path, description = "clsjob-N")),
    responses((status = 200, body = ClassifierJobView), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ClassifierJobView>, ApiError> {
    let id = job_id(&id)?;
    if !state.core.db.cancel_classifier_job(id).await? {
        return Err(ApiError::conflict(format!(
            "classifier job {id} has already ended"
        )));
    }
    Ok(Json(view(state.core.db.classifier_job(id).await?)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub data: Value,
    pub created_at: String,
}

fn event_view(e: ClassifierJobEvent) -> EventView {
    EventView {
        id: e.id,
        kind: e.kind,
        data: serde_json::from_str(&e.payload).unwrap_or(Value::Null),
        created_at: e.created_at,
    }
}

/// A job's events in order: started, step (loss, accuracy, learning rate), evaluated (the
/// held-out metrics of each epoch), saved, best, early_stopped, state.
#[utoipa::path(get, path = "/api/v1/classifier-jobs/{id}/events", params(("id" = String, Path, description = "clsjob-N")),
    responses((status = 200, body = Vec<EventView>), (status = 404, body = crate::error::ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    state.core.db.classifier_job(id).await?;
    let events = state.core.db.classifier_events(id, 0, 100_000).await?;
    let data: Vec<EventView> = events.into_iter().map(event_view).collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// `POST /api/v1/predict`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// `clsjob-N`: the best checkpoint of that finished job.
    pub model: String,
    /// Texts (text models).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Base64-encoded JPEG, PNG or WebP images (image models).
    #[serde(default)]
    pub images: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PredictionView {
    pub label: String,
    pub score: f32,
    #[schema(value_type = Object)]
    pub scores: Map<String, Value>,
}

/// Labels and probabilities from a fine-tuned classifier.
#[utoipa::path(post, path = "/api/v1/predict", request_body = PredictRequest,
    responses((status = 200, body = Vec<PredictionView>), (status = 404, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn predict(
    State(state): State<AppState>,
    crate::error::ApiJson(req): crate::error::ApiJson<PredictRequest>,
) -> Result<Json<Value>, ApiError> {
    const MAX_INPUTS: usize = 256;
    let job = state.core.db.classifier_job(job_id(&req.model)?).await?;
    let Some(dir) = job.best_checkpoint.clone() else {
        return Err(ApiError::invalid(
            "model",
            format!("{} has no checkpoint yet (status {})", req.model, job.state),
        ));
    };
    let n = req.inputs.len() + req.images.len();
    if n == 0 || n > MAX_INPUTS || (!req.inputs.is_empty() && !req.images.is_empty()) {
        return Err(ApiError::invalid(
            "inputs",
            format!("give 1 to {MAX_INPUTS} texts in inputs or images in images, not both"),
        ));
    }
    let images = req
        .images
        .iter()
        .map(|b| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| ApiError::invalid("images", format!("not base64: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cache = state.classifier.clone();
    let choice = state.core.config.device;
    let preds =
        tokio::task::spawn_blocking(move || -> Result<Vec<classify::Prediction>, ApiError> {
            let c = {
                let mut slot = cache
                    .lock()
                    .map_err(|_| ApiError::internal("classifier cache poisoned"))?;
                match slot.as_ref() {
                    Some((d, c)) if *d == dir => c.clone(),
                    _ => {
                        let device = loraloop_model::device::select_device(choice)
                            .map_err(ApiError::internal)?;
                        let (c, _) = Classifier::load(std::path::Path::new(&dir), &device)
                            .map_err(ApiError::internal)?;
                        let c = Arc::new(Mutex::new(c));
                        *slot = Some((dir.clone(), c.clone()));
                        c
                    }
                }
            };
            let mut c = c
                .lock()
                .map_err(|_| ApiError::internal("classifier poisoned"))?;
            let input = if images.is_empty() {
                let texts: Vec<&str> = req.inputs.iter().map(String::as_str).collect();
                c.encode_texts(&texts)
                    .map_err(|e| ApiError::invalid("inputs", e.to_string()))?
            } else {
                let decoded = images
                    .iter()
                    .map(|b| classify::image::decode(b))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ApiError::invalid("images", e))?;
                c.encode_images(&decoded)
                    .map_err(|e| ApiError::invalid("images", e.to_string()))?
            };
            c.predict(&input).map_err(ApiError::internal)
        })
        .await
        .map_err(ApiError::internal)??;
    let data: Vec<PredictionView> = preds
        .into_iter()
        .map(|p| PredictionView {
            label: p.label,
            score: p.score,
            scores: p
                .scores
                .into_iter()
                .map(|(l, s)| (l, Value::from(s)))
                .collect(),
        })
        .collect();
    Ok(Json(
        serde_json::json!({"object": "list", "model": req.model, "data": data}),
    ))
}
