//! The `validating_files` step of a job created from uploaded files: the training (and
//! validation) file is parsed by the same rules as a dataset import, stored as a dataset
//! version, and the job moves to `queued`; a file that does not parse fails the job with
//! OpenAI's `invalid_training_file` / `invalid_validation_file` and the problems found.
//! Each step is a job event. Jobs left in `validating_files` by a stopped server are
//! validated when it starts again.

use crate::error::ApiError;
use crate::openai_files::FILE_PREFIX;
use crate::state::AppState;
use loraloop_core::storage::{Dataset, JobState, NewTrainingEvent, TrainingJob};
use loraloop_trainer::config::Objective;

/// Validate every job waiting in `validating_files`, oldest first.
pub async fn validate_waiting(state: AppState) {
    match state.core.db.jobs_validating_files().await {
        Ok(ids) => {
            for id in ids {
                validate(&state, id).await;
            }
        }
        Err(e) => tracing::warn!("cannot list the jobs waiting for validation: {e}"),
    }
}

/// Validate job `id`'s files and queue it, or fail it saying which file and why.
pub async fn validate(state: &AppState, id: i64) {
    let db = &state.core.db;
    let job = match db.job(id).await {
        // A job on a dataset passes through `validating_files` on its way to `queued`:
        // it has no files to validate.
        Ok(j) if j.state() == JobState::ValidatingFiles && j.dataset_id.is_none() => j,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("job {id}: cannot read it to validate its files: {e}");
            return;
        }
    };
    let outcome = match check_files(state, &job).await {
        Ok((train, valid)) => {
            let moved = db
                .validated_job(id, train.id, valid.as_ref().map(|d| d.id))
                .await;
            match moved {
                Ok(true) => Ok(format!(
                    "Files validated ({} training examples{}), moving job to queued state",
                    train.example_count,
                    valid
                        .map(|v| format!(", {} validation examples", v.example_count))
                        .unwrap_or_default()
                )),
                Ok(false) => return, // cancelled meanwhile
                Err(e) => Err(("training_file", format!("cannot queue the job: {e}"))),
            }
        }
        Err(refused) => Err(refused),
    };
    let (level, message) = match outcome {
        Ok(m) => ("info", m),
        Err((param, message)) => {
            if let Err(e) = db.job_file_refused(id, param, &message).await {
                tracing::warn!("job {id}: cannot record its refused file: {e}");
            }
            ("error", message)
        }
    };
    event(state, id, level, &message).await;
}

async fn event(state: &AppState, id: i64, level: &str, message: &str) {
    let text = serde_json::json!({"kind": "message", "level": level, "text": message}).to_string();
    let stored = state
        .core
        .db
        .add_training_event(id, &NewTrainingEvent::message("log", &text))
        .await;
    if let Err(e) = stored {
        tracing::warn!("job {id}: cannot store an event: {e}");
    }
}

/// The datasets the job's files become: (training, validation).
async fn check_files(
    state: &AppState,
    job: &TrainingJob,
) -> Result<(Dataset, Option<Dataset>), (&'static str, String)> {
    let hp: serde_json::Value = serde_json::from_str(&job.hyperparameters).unwrap_or_default();
    let objective: Objective = hp
        .get("rl")
        .and_then(|r| r.as_str())
        .and_then(|r| r.parse().ok())
        .unwrap_or(Objective::Sft);
    let Some(train_id) = job.training_file_id else {
        return Err((
            "training_file",
            "the training file was deleted before the job validated it".into(),
        ));
    };
    event(
        state,
        job.id,
        "info",
        &format!("Validating training file: {FILE_PREFIX}{train_id}"),
    )
    .await;
    let train = import_file(state, train_id, objective)
        .await
        .map_err(|m| ("training_file", m))?;
    let valid = match job.validation_file_id {
        None => None,
        Some(v) => {
            event(
                state,
                job.id,
                "info",
                &format!("Validating validation file: {FILE_PREFIX}{v}"),
            )
            .await;
            Some(
                import_file(state, v, objective)
                    .await
                    .map_err(|m| ("validation_file", m))?,
            )
        }
    };
    Ok((train, valid))
}

/// Parse a stored file as a dataset import does and store it as dataset `file-N` (the same
/// content again is the same version).
async fn import_file(
    state: &AppState,
    file_id: i64,
    objective: Objective,
) -> Result<Dataset, String> {
    let db = &state.core.db;
    let name = format!("{FILE_PREFIX}{file_id}");
    let (meta, bytes) = match (db.file(file_id).await, db.file_content(file_id).await) {
        (Ok(m), Ok(b)) => (m, b),
        _ => {
            return Err(format!(
                "file {name} was deleted before the job validated it"
            ));
        }
    };
    let imported = crate::operations::import_dataset(state, &name, bytes, None, &meta.filename)
        .await
        .map_err(|e: ApiError| format!("file {name} ({}): {}", meta.filename, e.message))?;
    let d = imported.dataset;
    if d.objective() != objective {
        return Err(format!(
            "file {name} ({}) holds {} rows, but the job's method is {}: {}",
            meta.filename,
            d.kind,
            method_name(objective),
            match objective {
                Objective::Dpo =>
                    "a DPO file has lines with input, preferred_output and non_preferred_output",
                _ => "a supervised file has lines with messages",
            }
        ));
    }
    if d.example_count == 0 {
        return Err(format!("file {name} ({}) has no examples", meta.filename));
    }
    Ok(d)
}

/// OpenAI's name for an objective (`method.type`).
pub fn method_name(o: Objective) -> &'static str {
    match o {
        Objective::Sft => "supervised",
        other => other.as_str(),
    }
}
