//! OpenAI's fine-tuning API, `/v1/fine_tuning/jobs`: create (from `/v1/files`), list,
//! retrieve, cancel, events and checkpoints, with OpenAI's ids (`ftjob-7`), object shapes
//! and status names. These are the same jobs as `/api/v1/fine-tune` (job 7 is `ftjob-7`);
//! a job created here starts in `validating_files` ([`crate::job_files`]). Its
//! `fine_tuned_model` is the adapter's name, which `/v1/chat/completions` takes as `model`.

use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::job_files::method_name;
use crate::openai_files::{FILE_PREFIX, stored_file};
use crate::operations::{CreateJob, job_settings, unix};
use crate::paging::OpenAiList;
use crate::path_params::FineTuningJobId;
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use loraloop_core::storage::{JobState, NewFileJob, TrainingEvent, TrainingJob};
use loraloop_trainer::config::{Objective, TrainFile};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub const JOB_PREFIX: &str = "ftjob-";
const EVENT_PREFIX: &str = "ftevent-";
const CHECKPOINT_PREFIX: &str = "ftckpt-";
/// OpenAI's limit on `suffix`.
const MAX_SUFFIX: usize = 64;

/// `"auto"` or a value.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Value(T),
    Auto(String),
}

impl<T: Copy> AutoOr<T> {
    fn value(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self {
            Self::Value(v) => Ok(Some(*v)),
            Self::Auto(a) if a == "auto" => Ok(None),
            Self::Auto(a) => Err(ApiError::invalid(
                format!("hyperparameters.{name}"),
                format!("{name} must be \"auto\" or a number, got {a:?}"),
            )),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    pub n_epochs: Option<AutoOr<f64>>,
    pub batch_size: Option<AutoOr<u64>>,
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
    /// DPO only: the strength of the pull toward the reference model.
    pub beta: Option<AutoOr<f64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodOptions {
    pub hyperparameters: Option<Hyperparameters>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub supervised: Option<MethodOptions>,
    pub dpo: Option<MethodOptions>,
    pub reinforcement: Option<Value>,
}

/// `POST /v1/fine_tuning/jobs`'s body (OpenAI's).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFineTuningJob {
    /// Any name `GET /v1/models` lists: an assistant or `base` (the served model), or an
    /// adapter (training continues from it).
    pub model: String,
    /// A `file-N` uploaded with purpose `fine-tune`.
    pub training_file: String,
    pub validation_file: Option<String>,
    /// The older place for the method's hyperparameters (supervised).
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Hyperparameters>,
    /// `{type: supervised | dpo, supervised|dpo: {hyperparameters: {...}}}`.
    #[schema(value_type = Option<Object>)]
    pub method: Option<MethodIn>,
    /// Up to 64 letters, digits, `-` and `_`: part of the adapter's name.
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    /// Not supported: only an empty list.
    #[schema(value_type = Option<Vec<Object>>)]
    pub integrations: Option<Vec<Value>>,
    /// Not supported: only an empty object.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// OpenAI's FineTuningJob object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FineTuningJob {
    pub object: &'static str,
    pub id: String,
    pub model: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub fine_tuned_model: Option<String>,
    pub organization_id: &'static str,
    pub result_files: Vec<String>,
    /// validating_files, queued, running, succeeded, failed, cancelled
    pub status: String,
    pub validation_file: Option<String>,
    pub training_file: Option<String>,
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    #[schema(value_type = Object)]
    pub method: Value,
    pub trained_tokens: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub seed: u64,
    pub estimated_finish: Option<i64>,
    #[schema(value_type = Vec<Object>)]
    pub integrations: Vec<Value>,
    pub user_provided_suffix: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// `ftjob-N` (or `N`) to N.
pub fn job_number(id: &str) -> Option<i64> {
    crate::paging::prefixed_id(id, JOB_PREFIX).filter(|n| *n > 0)
}

async fn job_named(state: &AppState, id: &str) -> Result<TrainingJob, ApiError> {
    let missing = || ApiError::not_found(format!("no such fine-tuning job: {id}"));
    let n = job_number(id).ok_or_else(missing)?;
    state.core.db.job(n).await.map_err(|_| missing())
}

fn refuse_unsupported(req: &CreateFineTuningJob) -> Result<(), ApiError> {
    if req.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid(
            "integrations",
            "integrations (Weights & Biases) are not supported here: the job's events and the console's loss chart carry its metrics",
        ));
    }
    if req.metadata.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid(
            "metadata",
            "metadata is not stored here: leave it out",
        ));
    }
    if let Some(s) = &req.suffix {
        let ok = !s.is_empty()
            && s.len() <= MAX_SUFFIX
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !ok {
            return Err(ApiError::invalid(
                "suffix",
                format!("suffix must be 1 to {MAX_SUFFIX} letters, digits, '-' or '_', got {s:?}"),
            ));
        }
    }
    Ok(())
}

/// The objective and the hyperparameters the request's method carries.
fn method_of(req: &CreateFineTuningJob) -> Result<(Objective, Hyperparameters), ApiError> {
    let top = req.hyperparameters.clone();
    let Some(m) = &req.method else {
        return Ok((Objective::Sft, top.unwrap_or_default()));
    };
    let (objective, options) = match m.kind.as_str() {
        "supervised" => (Objective::Sft, m.supervised.clone()),
        "dpo" => (Objective::Dpo, m.dpo.clone()),
        "reinforcement" => {
            return Err(ApiError::invalid(
                "method.type",
                "reinforcement fine-tuning is not supported here: use supervised or dpo",
            ));
        }
        other => {
            return Err(ApiError::invalid(
                "method.type",
                format!("method.type must be supervised or dpo, got {other:?}"),
            ));
        }
    };
    let inner = options.and_then(|o| o.hyperparameters);
    if inner.is_some() && top.is_some() {
        return Err(ApiError::invalid(
            "hyperparameters",
            "give hyperparameters in method, not both there and at the top level",
        ));
    }
    Ok((objective, inner.or(top).unwrap_or_default()))
}

/// The training settings (the training YAML's keys) a request asks for.
fn settings_of(
    req: &CreateFineTuningJob,
    objective: Objective,
    hp: &Hyperparameters,
) -> Result<Map<String, Value>, ApiError> {
    let mut keys = Map::new();
    if let Some(b) = hp
        .batch_size
        .as_ref()
        .map(|b| b.value("batch_size"))
        .transpose()?
        .flatten()
    {
        keys.insert("batch_size".into(), Value::from(b));
    }
    if let Some(m) = hp
        .learning_rate_multiplier
        .as_ref()
        .map(|m| m.value("learning_rate_multiplier"))
        .transpose()?
        .flatten()
    {
        if !(m > 0.0 && m.is_finite()) {
            return Err(ApiError::invalid(
                "hyperparameters.learning_rate_multiplier",
                format!("learning_rate_multiplier must be greater than 0, got {m}"),
            ));
        }
        keys.insert(
            "learning_rate".into(),
            Value::from(m * default_learning_rate(objective)),
        );
    }
    if let Some(beta) = hp
        .beta
        .as_ref()
        .map(|b| b.value("beta"))
        .transpose()?
        .flatten()
    {
        if objective != Objective::Dpo {
            return Err(ApiError::invalid(
                "hyperparameters.beta",
                "beta is a DPO hyperparameter: use method {\"type\": \"dpo\"}",
            ));
        }
        keys.insert("rl_beta".into(), Value::from(beta));
    }
    if let Some(seed) = req.seed {
        keys.insert("seed".into(), Value::from(seed));
    }
    let epochs = hp
        .n_epochs
        .as_ref()
        .map(|e| e.value("n_epochs"))
        .transpose()?
        .flatten();
    let create = CreateJob {
        model_id: Some(req.model.clone()),
        dataset_id: None,
        assistant: None,
        dataset_url: None,
        epochs,
        method: Some(objective.as_str().to_string()),
        hyperparameters: keys,
        ..Default::default()
    };
    // The trainer names its own keys; the client sent OpenAI's.
    job_settings(&create).map_err(|mut e| {
        let sent = match e.param.as_deref() {
            Some("epochs") => "hyperparameters.n_epochs",
            Some("hyperparameters.learning_rate") => {
                e.message = format!(
                    "learning_rate_multiplier times the default learning rate ({}) is out of range: {}",
                    default_learning_rate(objective),
                    e.message
                );
                "hyperparameters.learning_rate_multiplier"
            }
            Some("hyperparameters.rl_beta") => "hyperparameters.beta",
            _ => return e,
        };
        e.param = Some(sent.into());
        e
    })
}

/// The learning rate a multiplier of 1 means: the trainer's default for the objective.
fn default_learning_rate(objective: Objective) -> f64 {
    let file = TrainFile {
        rl: (objective != Objective::Sft).then(|| objective.as_str().to_string()),
        ..Default::default()
    };
    file.validate().map(|c| c.learning_rate).unwrap_or(2e-4)
}

/// Create a fine-tuning job from uploaded files. It answers in `validating_files`; the
/// files are checked right after, and the job moves to `queued` or `failed`.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", request_body = CreateFineTuningJob,
    responses((status = 200, body = FineTuningJob), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_fine_tuning_job(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateFineTuningJob>,
) -> Result<Json<FineTuningJob>, ApiError> {
    refuse_unsupported(&req)?;
    let (objective, hp) = method_of(&req)?;
    let mut settings = settings_of(&req, objective, &hp)?;
    let chosen = crate::job_model::job_model(&state, Some(&req.model), "model").await?;
    chosen.continue_from_adapter(&mut settings, "model")?;
    let assistant =
        crate::assistant_api::assistant_named(&state, chosen.assistant.as_deref(), "model").await?;
    let file = |param: &'static str, id: String| {
        let state = state.clone();
        async move {
            let f = stored_file(&state, &id)
                .await
                .map_err(|e| ApiError::invalid(param, e.message))?;
            if f.purpose != "fine-tune" {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "{id} was uploaded with purpose {:?}, not fine-tune",
                        f.purpose
                    ),
                ));
            }
            Ok(f.id)
        }
    };
    let training_file_id = file("training_file", req.training_file.clone()).await?;
    let validation_file_id = match &req.validation_file {
        None => None,
        Some(_) if objective != Objective::Sft => {
            return Err(ApiError::invalid(
                "validation_file",
                "a validation file is used by supervised jobs here; a DPO job holds out part of its training file",
            ));
        }
        Some(v) => Some(file("validation_file", v.clone()).await?),
    };
    let job = state
        .core
        .db
        .create_file_job(&NewFileJob {
            base_model: &chosen.file,
            method: "lora",
            hyperparameters: &Value::Object(settings),
            assistant_id: Some(assistant.id),
            training_file_id,
            validation_file_id,
            suffix: req.suffix.as_deref(),
        })
        .await?;
    crate::audit::record(
        &state,
        crate::audit::API,
        "create job",
        &format!("job {} on {FILE_PREFIX}{training_file_id}", job.id),
    )
    .await;
    let view = job_object(&state, &job).await?;
    let id = job.id;
    let validating = state.clone();
    tokio::spawn(async move { crate::job_files::validate(&validating, id).await });
    Ok(Json(view))
}

/// The objective, hyperparameters (by OpenAI's names) and seed a job runs with, defaults
/// filled in.
fn openai_hyperparameters(settings: &Value) -> (Objective, Value, u64) {
    let file: TrainFile = serde_json::from_value(settings.clone()).unwrap_or_default();
    let objective: Objective = file
        .rl
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(Objective::Sft);
    let Ok(c) = file.validate() else {
        let default_seed = || TrainFile::default().validate().map(|c| c.seed).unwrap_or(0);
        return (objective, json!({}), file.seed.unwrap_or_else(default_seed));
    };
    let mut hp = json!({
        "n_epochs": c.num_epochs,
        "batch_size": c.micro_batch_size * c.gradient_accumulation_steps,
        "learning_rate_multiplier": c.learning_rate / default_learning_rate(objective),
    });
    if objective == Objective::Dpo {
        hp["beta"] = json!(c.rl_beta);
    }
    (objective, hp, c.seed)
}

/// A job as OpenAI's FineTuningJob object.
pub async fn job_object(state: &AppState, job: &TrainingJob) -> Result<FineTuningJob, ApiError> {
    let settings: Value = serde_json::from_str(&job.hyperparameters).unwrap_or_default();
    let (objective, hyperparameters, seed) = openai_hyperparameters(&settings);
    let kind = method_name(objective);
    let adapter = match job.adapter_id {
        Some(id) => state.core.db.adapter(id).await.ok(),
        None => None,
    };
    let trained_tokens = match &adapter {
        Some(a) => state.core.db.adapter_trained_tokens(a.id).await?,
        None => None,
    };
    let error = job.error.as_ref().map(|message| {
        let code = match job.error_param.as_deref() {
            Some("training_file") => "invalid_training_file",
            Some("validation_file") => "invalid_validation_file",
            _ => "training_failed",
        };
        json!({"code": code, "message": message, "param": job.error_param})
    });
    let estimated_finish = match job.state() {
        JobState::Running => estimated_finish(state, job.id).await?,
        _ => None,
    };
    // A job made by `/api/v1/fine-tune` has no file: its dataset stands in.
    let training_file = match (job.training_file_id, job.dataset_id) {
        (Some(f), _) => Some(format!("{FILE_PREFIX}{f}")),
        _ => None,
    };
    Ok(FineTuningJob {
        object: "fine_tuning.job",
        id: format!("{JOB_PREFIX}{}", job.id),
        model: job.base_model.clone(),
        created_at: unix(&job.created_at),
        finished_at: job.finished_at.as_deref().map(unix),
        fine_tuned_model: adapter.map(|a| a.name),
        organization_id: "org-loraloop",
        result_files: job
            .result_file_id
            .map(|f| format!("{FILE_PREFIX}{f}"))
            .into_iter()
            .collect(),
        status: job.state.clone(),
        validation_file: job.validation_file_id.map(|f| format!("{FILE_PREFIX}{f}")),
        training_file,
        method: json!({"type": kind, kind: {"hyperparameters": hyperparameters.clone()}}),
        hyperparameters,
        trained_tokens,
        error,
        seed,
        estimated_finish,
        integrations: Vec::new(),
        user_provided_suffix: job.suffix.clone(),
        metadata: None,
    })
}

/// When a running job's training should end (Unix seconds): its last step's time plus the
/// trainer's estimate of the time left then (this run's pace; a resumed run counts only
/// its own steps). None before the first step and after the last one (the report card
/// and saving are not in the trainer's estimate).
async fn estimated_finish(state: &AppState, job_id: i64) -> Result<Option<i64>, ApiError> {
    let Some(step) = state.core.db.last_training_event(job_id, "step").await? else {
        return Ok(None);
    };
    let Some(v) = step
        .message
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
    else {
        return Ok(None);
    };
    let (Some(done), Some(total)) = (v["step"].as_u64(), v["total_steps"].as_u64()) else {
        return Ok(None);
    };
    let eta = v["eta_secs"]
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0 && done < total);
    Ok(eta.map(|s| unix(&step.created_at) + s.round() as i64))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct OpenAiPage {
    /// Default 20, at most 100.
    pub limit: Option<i64>,
    /// An id: the page starts after it (jobs: older; events: older).
    pub after: Option<String>,
}

fn page(
    q: Result<Query<OpenAiPage>, QueryRejection>,
    prefix: &str,
) -> Result<(i64, Option<i64>), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be from 1 to 100, got {limit}"),
        ));
    }
    let after = match q.after {
        None => None,
        Some(a) => Some(
            crate::paging::prefixed_id(&a, prefix)
                .ok_or_else(|| ApiError::invalid("after", format!("{a:?} is not an id")))?,
        ),
    };
    Ok((limit, after))
}

/// List fine-tuning jobs, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", params(OpenAiPage),
    responses((status = 200, body = OpenAiList<FineTuningJob>), (status = 401, body = ErrorBody)))]
pub async fn list_fine_tuning_jobs(
    State(state): State<AppState>,
    q: Result<Query<OpenAiPage>, QueryRejection>,
) -> Result<Json<OpenAiList<FineTuningJob>>, ApiError> {
    let (limit, after) = page(q, JOB_PREFIX)?;
    let mut jobs = state.core.db.list_jobs(after, limit + 1).await?;
    let has_more = crate::paging::cut(&mut jobs, limit);
    let mut data = Vec::with_capacity(jobs.len());
    for j in &jobs {
        data.push(job_object(&state, j).await?);
    }
    Ok(Json(OpenAiList::new(data, has_more, |j| j.id.clone())))
}

/// One fine-tuning job.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}", params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = FineTuningJob), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_fine_tuning_job(
    State(state): State<AppState>,
    FineTuningJobId(id): FineTuningJobId,
) -> Result<Json<FineTuningJob>, ApiError> {
    let job = job_named(&state, &id).await?;
    Ok(Json(job_object(&state, &job).await?))
}

/// Cancel a job: one that waits at once, a running one at its next step.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = FineTuningJob), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel_fine_tuning_job(
    State(state): State<AppState>,
    FineTuningJobId(id): FineTuningJobId,
) -> Result<Json<FineTuningJob>, ApiError> {
    let job = job_named(&state, &id).await?;
    crate::operations::cancel_job(&state, job.id, &id, crate::audit::API).await?;
    let job = state.core.db.job(job.id).await?;
    Ok(Json(job_object(&state, &job).await?))
}

/// OpenAI's FineTuningJobEvent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobEvent {
    pub object: &'static str,
    pub id: String,
    pub created_at: i64,
    /// info, warn or error
    pub level: String,
    pub message: String,
    /// `message` or `metrics`
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

fn finite(x: Option<f64>) -> Value {
    x.filter(|v| v.is_finite()).map_or(Value::Null, Value::from)
}

/// A stored event in OpenAI's words: steps and evals as `metrics` with OpenAI's metric
/// names, the rest as messages.
fn job_event(e: &TrainingEvent) -> JobEvent {
    let parsed: Option<Value> = e
        .message
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok());
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|p| p.get(k))
            .and_then(Value::as_f64)
    };
    let (level, message, kind, data) = match e.kind.as_str() {
        "step" => {
            let total = field("total_steps");
            (
                "info".to_string(),
                format!(
                    "Step {}{}: training loss={:.4}",
                    e.step.unwrap_or(0),
                    total.map(|t| format!("/{t}")).unwrap_or_default(),
                    e.loss.unwrap_or(f64::NAN)
                ),
                "metrics",
                Some(json!({
                    "step": e.step,
                    "total_steps": total,
                    "train_loss": finite(e.loss),
                    "train_mean_token_accuracy": finite(field("accuracy")),
                    "learning_rate": finite(e.learning_rate),
                })),
            )
        }
        "eval" => (
            "info".to_string(),
            format!(
                "Step {}: validation loss={:.4}",
                e.step.unwrap_or(0),
                e.eval_loss.unwrap_or(f64::NAN)
            ),
            "metrics",
            Some(json!({
                "step": e.step,
                "valid_loss": finite(e.eval_loss),
                "valid_mean_token_accuracy": finite(field("accuracy")),
                "full_valid_loss": finite(e.eval_loss),
                "full_valid_mean_token_accuracy": finite(field("accuracy")),
            })),
        ),
        _ => {
            // The worker's failure event is a `state` event with the error as plain text.
            let fallback = if e.kind == "state" && parsed.is_none() {
                "error"
            } else {
                "info"
            };
            let level = parsed
                .as_ref()
                .and_then(|p| p.get("level"))
                .and_then(Value::as_str)
                .unwrap_or(fallback)
                .to_string();
            let text = match &parsed {
                Some(p) => p
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| describe(p)),
                None => e.message.clone().unwrap_or_default(),
            };
            (
                level,
                text,
                "message",
                parsed.filter(|p| p.get("text").is_none()),
            )
        }
    };
    JobEvent {
        object: "fine_tuning.job.event",
        id: format!("{EVENT_PREFIX}{}", e.id),
        created_at: unix(&e.created_at),
        level,
        message,
        kind,
        data,
    }
}

/// One line for a trainer event that has no text of its own.
fn describe(p: &Value) -> String {
    let get = |k: &str| p.get(k).cloned().unwrap_or(Value::Null);
    match p.get("kind").and_then(Value::as_str) {
        Some("started") => format!(
            "Fine-tuning job started: {} steps, {} training and {} validation examples",
            get("total_steps"),
            get("train_examples"),
            get("eval_examples")
        ),
        Some("checkpoint") => format!("Checkpoint written at step {}", get("step")),
        Some("early_stop") => format!(
            "Stopped early at step {}: the validation loss stopped improving (best {})",
            get("step"),
            get("best_eval_loss")
        ),
        Some(other) => other.replace('_', " "),
        None => p.to_string(),
    }
}

/// A job's events, newest first (OpenAI's order); `after` pages to older ones.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", params(("fine_tuning_job_id" = String, Path), OpenAiPage),
    responses((status = 200, body = OpenAiList<JobEvent>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_fine_tuning_events(
    State(state): State<AppState>,
    FineTuningJobId(id): FineTuningJobId,
    q: Result<Query<OpenAiPage>, QueryRejection>,
) -> Result<Json<OpenAiList<JobEvent>>, ApiError> {
    let job = job_named(&state, &id).await?;
    let (limit, after) = page(q, EVENT_PREFIX)?;
    let mut events = state
        .core
        .db
        .training_events_newest_first(job.id, after, limit + 1)
        .await?;
    let has_more = crate::paging::cut(&mut events, limit);
    let data = events.iter().map(job_event).collect();
    Ok(Json(OpenAiList::new(data, has_more, |e: &JobEvent| {
        e.id.clone()
    })))
}

/// OpenAI's FineTuningJobCheckpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCheckpoint {
    pub object: &'static str,
    pub id: String,
    pub created_at: i64,
    /// A name `/v1/chat/completions` takes as `model`.
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    #[schema(value_type = Object)]
    pub metrics: Value,
    pub step_number: i64,
}

/// A job's checkpoints: the adapter a succeeded LoRA job made, with its last training
/// and validation metrics (a job's intermediate checkpoints are for resuming, not serving).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", params(("fine_tuning_job_id" = String, Path), OpenAiPage),
    responses((status = 200, body = OpenAiList<JobCheckpoint>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_fine_tuning_checkpoints(
    State(state): State<AppState>,
    FineTuningJobId(id): FineTuningJobId,
    q: Result<Query<OpenAiPage>, QueryRejection>,
) -> Result<Json<OpenAiList<JobCheckpoint>>, ApiError> {
    let job = job_named(&state, &id).await?;
    let (_, after) = page(q, CHECKPOINT_PREFIX)?;
    let db = &state.core.db;
    let mut data = Vec::new();
    let adapter = match job.adapter_id {
        Some(a) if job.state() == JobState::Succeeded => db.adapter(a).await.ok(),
        _ => None,
    };
    if let Some(a) = adapter.filter(|a| after.is_none_or(|after| a.id < after)) {
        let step = db.last_training_event(job.id, "step").await?;
        let eval = db.last_training_event(job.id, "eval").await?;
        let acc = |e: &Option<TrainingEvent>| {
            e.as_ref()
                .and_then(|e| e.message.as_deref())
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .and_then(|v| v.get("accuracy").and_then(Value::as_f64))
        };
        let valid_loss = eval.as_ref().and_then(|e| e.eval_loss);
        data.push(JobCheckpoint {
            object: "fine_tuning.job.checkpoint",
            id: format!("{CHECKPOINT_PREFIX}{}", a.id),
            created_at: unix(&a.created_at),
            fine_tuned_model_checkpoint: a.name.clone(),
            fine_tuning_job_id: format!("{JOB_PREFIX}{}", job.id),
            metrics: json!({
                "step": job.step,
                "train_loss": finite(step.as_ref().and_then(|e| e.loss)),
                "train_mean_token_accuracy": finite(acc(&step)),
                "valid_loss": finite(valid_loss),
                "valid_mean_token_accuracy": finite(acc(&eval)),
                "full_valid_loss": finite(valid_loss),
                "full_valid_mean_token_accuracy": finite(acc(&eval)),
            }),
            step_number: job.step,
        });
    }
    Ok(Json(OpenAiList::new(data, false, |c: &JobCheckpoint| {
        c.id.clone()
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_auto_values_read_as_openai_writes_them() {
        assert_eq!(job_number("ftjob-7"), Some(7));
        assert_eq!(job_number("7"), Some(7));
        assert_eq!(job_number("ftjob-x"), None);
        let h: Hyperparameters = serde_json::from_value(
            json!({"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 0.5}),
        )
        .unwrap();
        assert_eq!(h.n_epochs.unwrap().value("n_epochs").unwrap(), None);
        assert_eq!(h.batch_size.unwrap().value("batch_size").unwrap(), Some(4));
        let bad: Hyperparameters = serde_json::from_value(json!({"n_epochs": "many"})).unwrap();
        assert!(bad.n_epochs.unwrap().value("n_epochs").is_err());
    }

    #[test]
    fn a_refused_value_is_named_as_the_client_sent_it() {
        let refused = |body: Value| {
            let req: CreateFineTuningJob = serde_json::from_value(body).unwrap();
            let (objective, hp) = method_of(&req).unwrap();
            settings_of(&req, objective, &hp).unwrap_err()
        };
        let e = refused(json!({"model": "base", "training_file": "file-1",
            "hyperparameters": {"learning_rate_multiplier": 1e6}}));
        assert_eq!(
            e.param.as_deref(),
            Some("hyperparameters.learning_rate_multiplier")
        );
        assert!(
            e.message
                .starts_with("learning_rate_multiplier times the default"),
            "{}",
            e.message
        );
        let e = refused(json!({"model": "base", "training_file": "file-1",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}));
        assert_eq!(
            e.param.as_deref(),
            Some("hyperparameters.beta"),
            "{}",
            e.message
        );
        let e = refused(json!({"model": "base", "training_file": "file-1",
            "hyperparameters": {"n_epochs": -1}}));
        assert_eq!(
            e.param.as_deref(),
            Some("hyperparameters.n_epochs"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_step_event_carries_openai_metric_names() {
        let e = TrainingEvent {
            id: 3,
            job_id: 1,
            kind: "step".into(),
            step: Some(2),
            loss: Some(1.5),
            eval_loss: None,
            learning_rate: Some(1e-4),
            tokens_per_sec: Some(10.0),
            message: Some(r#"{"kind":"step","total_steps":4,"accuracy":0.25}"#.into()),
            created_at: "2026-12-03T00:00:00Z".into(),
        };
        let v = job_event(&e);
        assert_eq!(v.id, "ftevent-3");
        assert_eq!(v.kind, "metrics");
        assert_eq!(v.message, "Step 2/4: training loss=1.5000");
        let d = v.data.unwrap();
        assert_eq!(d["train_loss"], 1.5);
        assert_eq!(d["train_mean_token_accuracy"], 0.25);
    }
}
