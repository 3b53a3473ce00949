//! What the REST API and the console both do: importing a dataset, creating a training
//! job, the job object.

use crate::error::ApiError;
use crate::state::AppState;
use loraloop_core::storage::{Dataset, DatasetInsert, JobState, NewDataset, NewJob, TrainingJob};
use loraloop_trainer::config::{Objective, TrainFile};
use loraloop_trainer::dataset::{
    self, Format, MAX_LISTED_PROBLEMS, Problem, content_hash, format_problems,
};
use loraloop_trainer::preference::{PreferenceImport, preference_import};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A dataset import: what was stored and the warnings the parser had.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Imported {
    #[schema(value_type = Object)]
    pub dataset: Dataset,
    /// False when the same content already existed under this name.
    pub created: bool,
    /// The first warnings (duplicates, very long examples): a file with one on every line
    /// would otherwise make a response as large as itself. `warning_count` counts them all.
    #[schema(value_type = Vec<Object>)]
    #[serde(serialize_with = "first_problems")]
    pub warnings: Vec<Problem>,
    pub warning_count: usize,
}

fn first_problems<S: serde::Serializer>(p: &[Problem], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(p.iter().take(MAX_LISTED_PROBLEMS))
}

/// A dataset version as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatasetView {
    pub object: &'static str,
    pub id: i64,
    pub name: String,
    pub version: i64,
    pub content_hash: String,
    pub format: String,
    pub source: String,
    pub example_count: i64,
    pub created_at: i64,
    /// `sft` (chat examples), `dpo` (preference pairs) or `kto` (rated replies): what a
    /// job on it trains.
    pub kind: String,
}

impl From<loraloop_core::storage::Dataset> for DatasetView {
    fn from(d: loraloop_core::storage::Dataset) -> Self {
        Self {
            object: "dataset",
            id: d.id,
            name: d.name,
            version: d.version,
            content_hash: d.content_hash,
            format: d.format,
            source: d.source,
            example_count: d.example_count,
            created_at: unix(&d.created_at),
            kind: d.kind,
        }
    }
}

/// Validate JSONL bytes (the CLI's rules) and store them as the next version of `name`.
/// Invalid files are refused whole, with the problems in the error message.
pub async fn import_dataset(
    state: &AppState,
    name: &str,
    bytes: Vec<u8>,
    format: Option<&str>,
    source: &str,
) -> Result<Imported, ApiError> {
    loraloop_core::storage::validate_dataset_name(name)
        .map_err(|e| ApiError::invalid("name", e.to_string()))?;
    let fmt = format.filter(|f| !f.is_empty()).map(str::to_string);
    let (bytes, preference) = tokio::task::spawn_blocking(move || {
        let p = preference_import(&bytes, fmt.as_deref());
        (bytes, p)
    })
    .await
    .map_err(ApiError::internal)?;
    if let Some(parsed) = preference {
        return import_preferences(state, name, parsed, source).await;
    }
    let format = format
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.parse::<Format>()
                .map_err(|e| ApiError::invalid("format", e.to_string()))
        })
        .transpose()?;
    let outcome = tokio::task::spawn_blocking(move || dataset::parse_jsonl(&bytes, format))
        .await
        .map_err(ApiError::internal)?;
    if !outcome.is_ok() {
        return Err(refused(&outcome.errors));
    }
    let hash = content_hash(&outcome.examples);
    let fmt = outcome.format.map_or("openai", Format::as_str);
    let new = NewDataset {
        assistant_id: None,
        name,
        format: fmt,
        source,
        content_hash: &hash,
        examples: &outcome.examples,
        ..Default::default()
    };
    store(state, &new, outcome.warnings).await
}

/// A file refused whole, with its problems.
fn refused(problems: &[impl std::fmt::Display]) -> ApiError {
    ApiError::invalid(
        "file",
        format!(
            "the file has {} problem(s) and was not imported:\n{}",
            problems.len(),
            format_problems(problems, MAX_LISTED_PROBLEMS)
        ),
    )
}

/// Store `new` as the next version of its name; an import with the parser's `warnings`.
async fn store(
    state: &AppState,
    new: &NewDataset<'_>,
    warnings: Vec<Problem>,
) -> Result<Imported, ApiError> {
    let inserted = state.core.db.insert_dataset(new).await?;
    Ok(Imported {
        created: matches!(inserted, DatasetInsert::Created(_)),
        dataset: inserted.dataset().clone(),
        warning_count: warnings.len(),
        warnings,
    })
}

/// Store a parsed preference file (DPO pairs or KTO rows) as the next version of `name`.
async fn import_preferences(
    state: &AppState,
    name: &str,
    parsed: PreferenceImport,
    source: &str,
) -> Result<Imported, ApiError> {
    let (kind, lines) = parsed.map_err(|problems| refused(&problems))?;
    let new = NewDataset {
        assistant_id: None,
        name,
        format: kind.as_str(),
        source,
        content_hash: &dataset::lines_hash(&lines),
        kind,
        lines: &lines,
        ..Default::default()
    };
    store(state, &new, Vec::new()).await
}

/// Keys of `hyperparameters` a client may set (the training YAML's names; paths such as
/// `output_dir` are the server's business), plus `batch_size` and `n_epochs`.
pub const HYPERPARAMETERS: &[&str] = &[
    "learning_rate",
    "batch_size",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "n_epochs",
    "num_epochs",
    "max_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "peft_use_rslora",
    "sequence_len",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "val_set_size",
    "eval_steps",
    "save_steps",
    "logging_steps",
    "early_stopping_patience",
    "gradient_checkpointing",
    "sample_packing",
    "train_on_inputs",
    "seed",
    "freeze_trainable_layers",
    "replay",
    "replay_ratio",
    "replay_distill",
    "replay_weight",
    "rl",
    "rl_beta",
    "kto_desirable_weight",
    "kto_undesirable_weight",
];

/// The limits past which a value is a mistake rather than a choice.
const MAX_EPOCHS: f64 = 1000.0;
const MAX_LEARNING_RATE: f64 = 1.0;
const MAX_BATCH: u64 = 4096;
const MAX_RANK: u64 = 1024;

/// `POST /api/v1/fine-tune`'s body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// What to train: any name `GET /v1/models` lists (an assistant or `base`: the served
    /// model; an adapter: a LoRA run continues from it) or a model file in the models
    /// folder (default: the served model).
    #[serde(default)]
    pub model_id: Option<String>,
    /// A stored dataset's id.
    #[serde(default)]
    pub dataset_id: Option<i64>,
    /// The assistant the adapter is for: its activation policy decides what happens to
    /// the adapter (default: the dataset's assistant, else the default assistant).
    #[serde(default)]
    pub assistant: Option<String>,
    /// Or a JSONL file to import first: a local path or an http(s) URL.
    #[serde(default)]
    pub dataset_url: Option<String>,
    #[serde(default)]
    pub epochs: Option<f64>,
    /// What trains: `lora` (default), `full` or `freeze`; or what it learns from:
    /// `sft`, `dpo` or `kto` (a LoRA adapter). Default: the dataset's kind (a DPO or KTO
    /// dataset trains DPO or KTO).
    #[serde(default)]
    pub method: Option<String>,
    /// Training settings by their training-YAML names, plus `batch_size` (total, split
    /// into micro batches and accumulation) and `n_epochs`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Map<String, Value>,
    /// Classifier jobs: text-classification or image-classification (default: from
    /// `model_id`, an encoder or ResNet folder in the models directory).
    #[serde(default)]
    pub task: Option<String>,
    /// Classifier jobs: the training data, a JSONL/CSV file of texts or a folder of class
    /// folders of images, named inside `imports.dir`.
    #[serde(default)]
    pub data_path: Option<String>,
    /// Classifier jobs: held-out data inside `imports.dir` (default: the folder's `val/`,
    /// else `val_set_size` split off).
    #[serde(default)]
    pub eval_data_path: Option<String>,
}

/// Check every hyperparameter and turn the request into the stored job settings (what
/// the worker reads back as a training YAML).
pub fn job_settings(req: &CreateJob) -> Result<Map<String, Value>, ApiError> {
    let mut hp = Map::new();
    for (k, v) in &req.hyperparameters {
        if !HYPERPARAMETERS.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                format!("hyperparameters.{k}"),
                format!(
                    "unknown hyperparameter {k:?}; allowed: {}",
                    HYPERPARAMETERS.join(", ")
                ),
            ));
        }
        hp.insert(k.clone(), v.clone());
    }
    let param = |k: &str| format!("hyperparameters.{k}");
    let positive_f = |k: &str, v: &Value, max: f64| -> Result<f64, ApiError> {
        match v.as_f64() {
            Some(x) if x > 0.0 && x <= max && x.is_finite() => Ok(x),
            _ => Err(ApiError::invalid(
                param(k),
                format!("{k} must be a number greater than 0 and at most {max}, got {v}"),
            )),
        }
    };
    let positive_u = |k: &str, v: &Value, max: u64| -> Result<u64, ApiError> {
        match v.as_u64() {
            Some(x) if x >= 1 && x <= max => Ok(x),
            _ => Err(ApiError::invalid(
                param(k),
                format!("{k} must be a whole number from 1 to {max}, got {v}"),
            )),
        }
    };
    if let Some(e) = hp.remove("n_epochs") {
        if hp.contains_key("num_epochs") {
            return Err(ApiError::invalid(
                param("n_epochs"),
                "n_epochs and num_epochs are one setting; send one",
            ));
        }
        hp.insert("num_epochs".into(), e);
    }
    if let Some(e) = req.epochs {
        if let Some(other) = hp.get("num_epochs")
            && other.as_f64() != Some(e)
        {
            return Err(ApiError::invalid(
                "epochs",
                format!("epochs {e} and hyperparameters' {other} disagree; send one"),
            ));
        }
        if !(e > 0.0 && e <= MAX_EPOCHS) {
            return Err(ApiError::invalid(
                "epochs",
                format!("epochs must be greater than 0 and at most {MAX_EPOCHS}, got {e}"),
            ));
        }
        hp.insert("num_epochs".into(), Value::from(e));
    }
    if let Some(v) = hp.get("num_epochs") {
        positive_f("num_epochs", v, MAX_EPOCHS)?;
    }
    if let Some(v) = hp.get("learning_rate") {
        positive_f("learning_rate", v, MAX_LEARNING_RATE)?;
    }
    if let Some(v) = hp.get("lora_r") {
        positive_u("lora_r", v, MAX_RANK)?;
    }
    for k in ["micro_batch_size", "gradient_accumulation_steps"] {
        if let Some(v) = hp.get(k) {
            positive_u(k, v, MAX_BATCH)?;
        }
    }
    if let Some(b) = hp.remove("batch_size") {
        let b = positive_u("batch_size", &b, MAX_BATCH)?;
        let micro = hp
            .get("micro_batch_size")
            .and_then(Value::as_u64)
            .unwrap_or(4)
            .min(b);
        if b % micro != 0 {
            return Err(ApiError::invalid(
                param("batch_size"),
                format!("batch_size {b} is not a multiple of micro_batch_size {micro}"),
            ));
        }
        hp.insert("micro_batch_size".into(), Value::from(micro));
        hp.insert("gradient_accumulation_steps".into(), Value::from(b / micro));
    }
    match req.method.as_deref() {
        Some(m @ ("sft" | "dpo" | "kto")) => {
            if hp.get("rl").is_some_and(|r| r.as_str() != Some(m)) {
                return Err(ApiError::invalid(
                    "method",
                    format!("method {m} and hyperparameters.rl disagree"),
                ));
            }
            if m != "sft" {
                hp.insert("rl".into(), Value::from(m));
            }
        }
        Some(m) => {
            hp.insert("finetuning_type".into(), Value::from(m));
        }
        None => {}
    }
    check_settings(&hp)?;
    Ok(hp)
}

/// The trainer's own validation of stored job settings: types, ranges, combinations.
fn check_settings(hp: &Map<String, Value>) -> Result<(), ApiError> {
    let param = |k: &str| format!("hyperparameters.{k}");
    let file: TrainFile = serde_json::from_value(Value::Object(hp.clone()))
        .map_err(|e| ApiError::invalid("hyperparameters", format!("hyperparameters: {e}")))?;
    file.validate().map_err(|e| match e {
        loraloop_trainer::config::ConfigError::Invalid { key, message } => {
            let p = if key == "finetuning_type" {
                "method".to_string()
            } else {
                param(key)
            };
            ApiError::invalid(p, format!("{key}: {message}"))
        }
        other => ApiError::invalid("hyperparameters", other.to_string()),
    })?;
    Ok(())
}

/// A job trains what its dataset holds: a DPO or KTO dataset sets `rl`, and a job that
/// asks for another objective than its dataset's kind is refused.
fn match_dataset_kind(hp: &mut Map<String, Value>, dataset: &Dataset) -> Result<(), ApiError> {
    let asked: Objective = match hp.get("rl").and_then(Value::as_str) {
        Some(r) => r
            .parse()
            .map_err(|m: String| ApiError::invalid("hyperparameters.rl", m))?,
        None => Objective::Sft,
    };
    let has = dataset.objective();
    if hp.get("rl").is_none() && has != Objective::Sft {
        hp.insert("rl".into(), Value::from(has.as_str()));
        return check_settings(hp);
    }
    if asked != has {
        return Err(ApiError::invalid(
            "dataset_id",
            format!(
                "dataset {} v{} holds {} rows, but the job trains {}: build one with POST /api/v1/datasets/build (kind {}) or import a {} file",
                dataset.name,
                dataset.version,
                has.as_str(),
                asked.as_str(),
                asked.as_str(),
                asked.as_str()
            ),
        ));
    }
    Ok(())
}

/// Create a queued job from a request (importing `dataset_url` first).
pub async fn create_job(
    state: &AppState,
    req: &CreateJob,
    actor: &str,
) -> Result<TrainingJob, ApiError> {
    create_trial(state, req, actor, None).await
}

/// [`create_job`], as a trial of `sweep` when given (marked before it is queued, so no
/// worker decides its adapter alone).
pub async fn create_trial(
    state: &AppState,
    req: &CreateJob,
    actor: &str,
    sweep: Option<i64>,
) -> Result<TrainingJob, ApiError> {
    let mut settings = job_settings(req)?;
    // A name `GET /v1/models` lists, or a model file in the models folder by name: a
    // client's string never becomes an arbitrary path.
    let chosen = crate::job_model::job_model(state, req.model_id.as_deref(), "model_id").await?;
    let model = chosen.file.clone();
    let dataset = match (&req.dataset_id, &req.dataset_url) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "dataset_id",
                "give dataset_id or dataset_url, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "dataset_id",
                "give dataset_id (a stored dataset) or dataset_url (a JSONL file to import)",
            ));
        }
        (Some(id), None) => dataset_by_id(state, *id).await?,
        (None, Some(url)) => {
            let policy = &state.core.config.raw.imports;
            let got =
                crate::dataset_url::fetch_dataset(url, policy, state.max_upload_bytes).await?;
            import_dataset(state, &got.name, got.bytes, None, &got.source)
                .await
                .map_err(|mut e| {
                    if e.param.as_deref() == Some("file") {
                        e.param = Some("dataset_url".into());
                    }
                    e
                })?
                .dataset
        }
    };
    match_dataset_kind(&mut settings, &dataset)?;
    chosen.continue_from_adapter(&mut settings, "model_id")?;
    if let (Some(a), Some(b)) = (&req.assistant, &chosen.assistant)
        && a != b
    {
        return Err(ApiError::invalid(
            "assistant",
            format!("model_id belongs to assistant {b:?} but assistant is {a:?}"),
        ));
    }
    let asked = req.assistant.clone().or(chosen.assistant);
    let assistant = match (&asked, dataset.assistant_id) {
        (None, Some(id)) => state.core.db.assistant_by_id(id).await?,
        (named, _) => {
            crate::assistant_api::assistant_named(state, named.as_deref(), "assistant").await?
        }
    };
    if let Some(owner) = dataset.assistant_id
        && owner != assistant.id
    {
        let owner = state.core.db.assistant_by_id(owner).await?;
        return Err(ApiError::invalid(
            "assistant",
            format!(
                "dataset {} was built from {}'s conversations; train it for {} (or build one from {}'s)",
                dataset.name, owner.name, owner.name, assistant.name
            ),
        ));
    }
    let method = req
        .method
        .clone()
        .filter(|m| !matches!(m.as_str(), "sft" | "dpo" | "kto"))
        .unwrap_or_else(|| "lora".into());
    let job = state
        .core
        .db
        .create_job(&NewJob {
            dataset_id: dataset.id,
            base_model: &model,
            method: &method,
            hyperparameters: &Value::Object(settings),
            assistant_id: Some(assistant.id),
        })
        .await?;
    if let Some(s) = sweep {
        state.core.db.set_job_sweep(job.id, s).await?;
    }
    state
        .core
        .db
        .transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
        .await?;
    // The job as this request left it: a worker polling the queue may claim it before a
    // second read, and the answer to "create" should not depend on that race.
    let mut job = job;
    job.state = JobState::Queued.as_str().to_string();
    crate::audit::record(
        state,
        actor,
        "create job",
        &format!(
            "job {} on dataset {} v{}",
            job.id, dataset.name, dataset.version
        ),
    )
    .await;
    Ok(job)
}

/// Ask job `id` to stop (a queued one at once, a running one at its next step) and audit
/// it as `actor`; a conflict, naming the job as `name`, when it had already finished.
pub async fn cancel_job(
    state: &AppState,
    id: i64,
    name: &str,
    actor: &str,
) -> Result<(), ApiError> {
    if !state.core.db.request_cancel(id).await? {
        let job = state.core.db.job(id).await?;
        return Err(ApiError::conflict(if job.state().is_final() {
            format!("{name} has already finished ({})", job.state)
        } else {
            format!(
                "{name} has finished training and is publishing its adapter: too late to cancel"
            )
        }));
    }
    crate::audit::record(state, actor, "cancel job", &format!("job {id}")).await;
    Ok(())
}

pub async fn dataset_by_id(state: &AppState, id: i64) -> Result<Dataset, ApiError> {
    state
        .core
        .db
        .dataset_by_id(id)
        .await
        .map_err(|e| ApiError::from(e).with_param("dataset_id"))
}

/// A job as the API shows it, in the shape of OpenAI's fine-tuning job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub object: &'static str,
    pub id: i64,
    /// validating_files, queued, running, succeeded, failed, cancelled
    pub status: String,
    pub model: String,
    pub method: String,
    /// None while a job created from a file (`/v1/fine_tuning/jobs`) validates it.
    pub dataset_id: Option<i64>,
    /// The assistant the adapter is for.
    pub assistant: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub trained_tokens: Option<i64>,
    pub cancel_requested: bool,
    pub error: Option<JobErrorView>,
    /// The adapter the job produced (its name), once it has succeeded.
    pub fine_tuned_adapter: Option<String>,
    pub fine_tuned_adapter_id: Option<i64>,
    /// The adapter's report card: what it learned and kept, and the gate's verdict.
    #[schema(value_type = Option<Object>)]
    pub report_card: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobErrorView {
    pub code: &'static str,
    pub message: String,
}

pub fn unix(ts: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(ts)
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

pub async fn job_view(state: &AppState, job: TrainingJob) -> Result<JobView, ApiError> {
    let row = match job.adapter_id {
        Some(id) => state.core.db.adapter(id).await.ok(),
        None => None,
    };
    let report_card = row
        .as_ref()
        .and_then(|a| a.report_card.as_deref())
        .and_then(|c| serde_json::from_str(c).ok());
    let adapter = row.map(|a| a.name);
    let trained_tokens = match (adapter.is_some(), job.adapter_id) {
        (true, Some(id)) => state.core.db.adapter_trained_tokens(id).await?,
        _ => None,
    };
    let assistant = match job.assistant_id {
        Some(id) => state.core.db.assistant_by_id(id).await.ok().map(|a| a.name),
        None => None,
    };
    Ok(JobView {
        object: "fine_tuning.job",
        assistant,
        id: job.id,
        status: job.state.clone(),
        model: job.base_model.clone(),
        method: job.method.clone(),
        dataset_id: job.dataset_id,
        created_at: unix(&job.created_at),
        started_at: job.started_at.as_deref().map(unix),
        finished_at: job.finished_at.as_deref().map(unix),
        hyperparameters: serde_json::from_str(&job.hyperparameters).unwrap_or(Value::Null),
        step: job.step,
        total_steps: job.total_steps,
        trained_tokens,
        cancel_requested: job.cancel_requested,
        error: job.error.clone().map(|message| JobErrorView {
            code: "training_failed",
            message,
        }),
        fine_tuned_adapter: adapter,
        fine_tuned_adapter_id: job.adapter_id,
        report_card,
    })
}
