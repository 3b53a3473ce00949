//! Classifier jobs from the queue (the API and the console create them): the trainer's
//! events stored as the job's events, the best checkpoint recorded, cancellation between
//! steps. The training worker runs them when no chat-model job waits.

use super::data;
use super::run::{ClassifyEvent, Run};
use super::settings::ClassifySettings;
use crate::config::TrainFile;
use crate::lease::{LEASE_SECS, MAX_ATTEMPTS, RENEW_EVERY, recovery_lines, while_renewed};
use candle_core::Device;
use loraloop_core::storage::{ClassifierJob, Db};
use loraloop_model::classify::{self, Task};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The stored name of a task.
pub fn task_key(task: Task) -> &'static str {
    match task {
        Task::TextClassification => "text_classification",
        Task::ImageClassification => "image_classification",
    }
}

fn task_of_key(key: &str) -> Option<Task> {
    match key {
        "text_classification" => Some(Task::TextClassification),
        "image_classification" => Some(Task::ImageClassification),
        _ => None,
    }
}

/// Requeue (or fail, after `MAX_ATTEMPTS` claims) the classifier jobs whose worker died,
/// with a line in each one's events.
pub async fn recover_abandoned(db: &Db) -> anyhow::Result<()> {
    let recovered = db.recover_abandoned_classifier_jobs(MAX_ATTEMPTS).await?;
    let requeued =
        "the worker running this job stopped without a word; back in the queue, to start over";
    for (id, text) in recovery_lines(recovered, requeued) {
        tracing::warn!("classifier job {id}: {text}");
        db.add_classifier_event(id, "message", &serde_json::json!({ "text": text }))
            .await?;
    }
    Ok(())
}

/// Claim and run one queued classifier job; its id, or `None` when none waits.
pub async fn run_next(
    db: &Db,
    device: &Device,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<Option<i64>> {
    let Some(job) = db.claim_classifier_job(LEASE_SECS).await? else {
        return Ok(None);
    };
    let id = job.id;
    let renew = move |db: Db| async move { db.renew_classifier_lease(id, LEASE_SECS).await };
    let work = run_job(db, device, &job, shutdown.clone());
    let result = while_renewed(RENEW_EVERY, db, format!("classifier job {id}"), renew, work).await;
    let (state, error) = match result {
        Ok(false) => ("succeeded", None),
        Ok(true) if shutdown.load(Ordering::SeqCst) => {
            // Stopping: back to the queue, it starts over next time.
            db.return_classifier_job_to_queue(id).await?;
            return Ok(Some(id));
        }
        Ok(true) => ("cancelled", None),
        Err(e) => ("failed", Some(format!("{e:#}"))),
    };
    if let Some(e) = &error {
        tracing::error!("classifier job {id} failed: {e}");
    }
    let ended = db
        .finish_classifier_job(id, state, error.as_deref())
        .await?;
    let state = ended.as_deref().unwrap_or(state);
    db.add_classifier_event(
        id,
        "state",
        &serde_json::json!({ "state": state, "error": error }),
    )
    .await?;
    Ok(Some(id))
}

/// Train; `Ok(true)` when it stopped early (cancelled or shutting down).
async fn run_job(
    db: &Db,
    device: &Device,
    job: &ClassifierJob,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<bool> {
    let id = job.id;
    let task =
        task_of_key(&job.task).ok_or_else(|| anyhow::anyhow!("unknown task {}", job.task))?;
    let file: TrainFile =
        serde_json::from_str(&job.settings).map_err(|e| anyhow::anyhow!("settings: {e}"))?;
    let settings = ClassifySettings::from_file(&file, task)?;
    let (data_path, eval_path) = (
        PathBuf::from(&job.data_path),
        job.eval_data_path.as_ref().map(PathBuf::from),
    );
    let model = PathBuf::from(&job.base_model);
    let output_dir = PathBuf::from(&job.output_dir);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ClassifyEvent>();
    let dev = device.clone();
    let stop_flag = stop.clone();
    let trainer = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let prepared = data::prepare(
            &data_path,
            eval_path.as_deref(),
            task,
            settings.val_set_size,
            settings.seed,
        )?;
        let base = classify::load_base(
            &model,
            settings.image_size,
            settings.max_length,
            settings.seed,
            &dev,
        )?;
        if base.random {
            let _ = tx.send(ClassifyEvent::Message {
                text: format!(
                    "no weights found for {}: training from a random initialization",
                    model.display()
                ),
            });
        }
        let run = Run {
            base,
            base_name: model.display().to_string(),
            labels: prepared.labels,
            train: prepared.train,
            eval: prepared.eval,
            settings: &settings,
            output_dir,
        };
        let mut on_event = |e: ClassifyEvent| {
            let _ = tx.send(e);
        };
        let out = super::train(run, &mut on_event, &|| stop_flag.load(Ordering::SeqCst))?;
        Ok(out.cancelled)
    });
    // Store events as they come; look for a cancel request once a second.
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut trainer = trainer;
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => store(db, id, &e).await?,
                None => break,
            },
            _ = tick.tick() => {
                if shutdown.load(Ordering::SeqCst) || db.classifier_cancel_requested(id).await.unwrap_or(false) {
                    stop.store(true, Ordering::SeqCst);
                }
            }
            done = &mut trainer => {
                while let Ok(e) = rx.try_recv() {
                    store(db, id, &e).await?;
                }
                return done.map_err(|e| anyhow::anyhow!("the trainer panicked: {e}"))?.map_err(anyhow::Error::msg);
            }
        }
    }
    trainer
        .await
        .map_err(|e| anyhow::anyhow!("the trainer panicked: {e}"))?
        .map_err(anyhow::Error::msg)
}

async fn store(db: &Db, id: i64, e: &ClassifyEvent) -> anyhow::Result<()> {
    let payload = serde_json::to_value(e)?;
    let kind = payload
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("message")
        .to_string();
    match e {
        ClassifyEvent::Started { total_steps, .. } => {
            db.set_classifier_job_progress(id, 0, *total_steps as i64)
                .await?
        }
        ClassifyEvent::Step {
            step, total_steps, ..
        } => {
            db.set_classifier_job_progress(id, *step as i64, *total_steps as i64)
                .await?
        }
        ClassifyEvent::Best { dir, metric, .. } => {
            db.set_classifier_job_best(id, &dir.display().to_string(), *metric)
                .await?
        }
        _ => {}
    }
    db.add_classifier_event(id, &kind, &payload).await?;
    Ok(())
}
