//! The job worker: claims the oldest queued training job, trains it on a blocking thread,
//! stores its events and state transitions, registers the adapter, and honours cancel
//! requests. A job whose worker died is requeued and resumes from its last checkpoint.
//!
//! A running job holds a lease the worker renews every few seconds; a job whose lease ran
//! out was left by a worker that died and goes back to the queue, or fails once it has
//! been claimed [`MAX_ATTEMPTS`] times (a job that takes the process down is not retried
//! forever). Several workers may share a database.

use crate::checkpoint::{self, AdapterMetadata, Checkpoint, TRAINER_STATE_FILE};
use crate::config::{Method, Objective, TrainFile};
use crate::events::{Ending, TrainEvent};
use crate::fingerprint::hash_model;
use crate::job_card::{self, GateOptions};
use crate::job_events::store_event;
use crate::lease::{LEASE_SECS, MAX_ATTEMPTS, RENEW_EVERY, recovery_lines, while_renewed};
use crate::preference::{parse_stored, train_preferences};
use crate::run::{TrainJob, auto_train_dtype, train};
use candle_core::Device;
use loraloop_core::service::adapters::reserved_model_name;
use loraloop_core::storage::{Db, JobState, NewAdapter, NewTrainingEvent, TrainingJob};
use loraloop_model::engine::LoadedModel;
use loraloop_model::train::DenseLlama;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Where a model named by file name lives.
    pub models_dir: PathBuf,
    /// Each job writes to `adapters_dir/job-ID` (unless the job names a folder).
    pub adapters_dir: PathBuf,
    pub poll_interval: Duration,
    pub device: Device,
    /// A model already loaded on `device` (the server's engine model) and its path: a
    /// job on that model trains on it instead of loading the file again. The dense
    /// training copy shares its tensors where the dtypes match (a Hugging Face folder:
    /// f32 on the CPU, bf16 on CUDA); quantized GGUF weights are dequantized for training.
    pub shared_model: Option<(PathBuf, Arc<LoadedModel>)>,
    /// The report card's thresholds and what the activation policy does with a card.
    pub gate: GateOptions,
    /// Chat in the same process: jobs give way to it between micro-batches.
    pub yield_to: Option<crate::yield_to::YieldTo>,
}

/// The loaded model a job on `path` uses: `shared` when it is the same model file.
fn model_for(
    path: &Path,
    shared: Option<&(PathBuf, Arc<LoadedModel>)>,
    device: &Device,
) -> anyhow::Result<Arc<LoadedModel>> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some((p, m)) = shared
        && same(p, path)
    {
        tracing::info!(
            "training on the serving model's weights already loaded on {device:?} (not loading {} again)",
            path.display()
        );
        return Ok(m.clone());
    }
    Ok(Arc::new(LoadedModel::load(path, device)?))
}

/// The model path a job names: a path, or a file name in `models_dir`.
pub fn resolve_model(name: &str, models_dir: &Path) -> PathBuf {
    let p = Path::new(name);
    if p.components().count() > 1 || p.exists() {
        p.to_path_buf()
    } else {
        models_dir.join(p)
    }
}

/// The newest complete `checkpoint-STEP` in `dir` (or the `.old-` copy a kill left while
/// that checkpoint was being written again, when it is all there is of that step).
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<((usize, bool), PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = e.path();
        let Some((step, old)) = checkpoint::checkpoint_step(&e.file_name().to_string_lossy())
        else {
            continue;
        };
        // Newer steps first; of one step, the checkpoint before its `.old-` copy.
        let rank = (step, !old);
        if path.join(TRAINER_STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| rank > *b) {
            best = Some((rank, path));
        }
    }
    best.map(|(_, p)| p)
}

/// Run until `shutdown` is set: claim, train, repeat; sleep when the queue is empty.
pub async fn run_worker(
    db: Db,
    opts: WorkerOptions,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    while !shutdown.load(Ordering::SeqCst) {
        recover_abandoned(&db, &opts).await?;
        crate::classify::worker::recover_abandoned(&db).await?;
        match run_next(&db, &opts, shutdown.clone()).await? {
            Some(id) => tracing::info!("job {id} done"),
            // Classifier jobs when no chat-model job waits: one training run at a time.
            None if let Some(id) =
                crate::classify::worker::run_next(&db, &opts.device, shutdown.clone()).await? =>
            {
                tracing::info!("classifier job {id} done")
            }
            None => {
                close_ended_sweeps(&db, &opts).await;
                tokio::time::sleep(opts.poll_interval).await
            }
        }
    }
    Ok(())
}

/// Sweeps whose trials have all ended but that no trial's end closed: the last trial was
/// cancelled before a worker ran it, or a worker stopped between a trial and the ranking.
async fn close_ended_sweeps(db: &Db, opts: &WorkerOptions) {
    match db.sweeps_ended_unranked().await {
        Ok(ids) => {
            for s in ids {
                if let Err(e) = crate::sweep::finish_if_done(db, &opts.gate, s).await {
                    tracing::warn!("sweep {s}: cannot rank its trials: {e:#}");
                }
            }
        }
        Err(e) => tracing::warn!("cannot look for ended sweeps: {e}"),
    }
}

/// Requeue (or fail) the jobs whose worker died, with a line in each one's events.
async fn recover_abandoned(db: &Db, opts: &WorkerOptions) -> anyhow::Result<()> {
    let recovered = db.recover_abandoned_jobs(MAX_ATTEMPTS).await?;
    for &id in &recovered.cancelled {
        remove_cancelled_folder(opts, id);
    }
    let requeued = "the worker running this job stopped without a word; back in the queue";
    for (id, message) in recovery_lines(recovered, requeued) {
        tracing::warn!("job {id}: {message}");
        db.add_training_event(id, &NewTrainingEvent::message("state", message))
            .await?;
    }
    Ok(())
}

/// Where job `id` writes when it names no folder: its own, `adapters_dir/job-ID`.
fn default_output_dir(opts: &WorkerOptions, id: i64) -> PathBuf {
    opts.adapters_dir.join(format!("job-{id}"))
}

/// A cancelled job's own folder (`adapters_dir/job-ID`, its checkpoints: tens of MB) goes
/// with it: nothing names it and a cancelled job never resumes. A folder the job was told
/// to write to is its owner's and stays.
fn remove_cancelled_folder(opts: &WorkerOptions, id: i64) {
    let dir = default_output_dir(opts, id);
    if dir.is_dir()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        tracing::warn!("job {id}: cannot remove {}: {e}", dir.display());
    }
}

/// Claim and run one job; `None` when the queue is empty.
pub async fn run_next(
    db: &Db,
    opts: &WorkerOptions,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<Option<i64>> {
    let Some(job) = db.claim_next_job(LEASE_SECS).await? else {
        return Ok(None);
    };
    let id = job.id;
    tracing::info!(
        "job {id}: training {} on dataset {:?}",
        job.base_model,
        job.dataset_id
    );
    let renew = move |db: Db| async move { db.renew_job_lease(id, LEASE_SECS).await };
    let work = run_job(db, opts, &job, shutdown);
    let result = while_renewed(RENEW_EVERY, db, format!("job {id}"), renew, work).await;
    match result {
        Ok(JobEnd::Succeeded) => {
            let csv = crate::job_events::results_csv(&db.training_events(id, 0).await?);
            db.succeed_job(id, &format!("step_metrics_ftjob-{id}.csv"), csv.as_bytes())
                .await?;
        }
        Ok(JobEnd::Cancelled) => {
            db.transition_job(id, JobState::Running, JobState::Cancelled, None)
                .await?;
            remove_cancelled_folder(opts, id);
        }
        Ok(JobEnd::Interrupted) => {
            // The worker is shutting down: back to the queue, to resume later.
            db.return_job_to_queue(id).await?;
        }
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!("job {id} failed: {message}");
            let _ = db
                .add_training_event(id, &NewTrainingEvent::message("state", &message))
                .await;
            db.transition_job(id, JobState::Running, JobState::Failed, Some(&message))
                .await?;
        }
    }
    if let Some(sweep) = job.sweep_id
        && let Err(e) = crate::sweep::finish_if_done(db, &opts.gate, sweep).await
    {
        tracing::warn!("sweep {sweep}: cannot rank its trials: {e:#}");
    }
    Ok(Some(id))
}

enum JobEnd {
    Succeeded,
    Cancelled,
    Interrupted,
}

async fn run_job(
    db: &Db,
    opts: &WorkerOptions,
    job: &TrainingJob,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<JobEnd> {
    let id = job.id;
    let hp: serde_json::Value = serde_json::from_str(&job.hyperparameters)?;
    let mut file: TrainFile =
        serde_json::from_value(hp).map_err(|e| anyhow::anyhow!("hyperparameters: {e}"))?;
    if file.finetuning_type.is_none() {
        file.finetuning_type = Some(job.method.clone());
    }
    let dataset_id = job
        .dataset_id
        .ok_or_else(|| anyhow::anyhow!("job {id} has no dataset (its file was never validated)"))?;
    let dataset = db.dataset_by_id(dataset_id).await?;
    // A preference dataset trains by its kind (the API and the console set `rl` to it).
    if file.rl.is_none() && dataset.objective() != Objective::Sft {
        file.rl = Some(dataset.kind.clone());
    }
    let config = file.validate()?;
    let init_adapter = file.lora_model_dir.clone();
    if config.objective != dataset.objective() {
        anyhow::bail!(
            "dataset {} v{} holds {} rows, but the job trains {}: build or import a {} dataset",
            dataset.name,
            dataset.version,
            dataset.kind,
            config.objective.as_str(),
            config.objective.as_str()
        );
    }
    let trained_on = db
        .dataset_conversations(dataset_id)
        .await?
        .into_iter()
        .collect();
    let (examples, preferences) = match config.objective {
        Objective::Sft => {
            let stored = db.dataset_examples(dataset_id).await?;
            (stored.into_iter().map(|e| e.example).collect(), None)
        }
        objective => {
            let lines = db.dataset_lines(dataset_id).await?;
            let data = parse_stored(&lines, objective).map_err(|p| {
                anyhow::anyhow!(
                    "the stored {} rows do not parse: {}",
                    objective.as_str(),
                    p.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            (Vec::new(), Some(data))
        }
    };
    // OpenAI's `validation_file`: held out as given, instead of a split of the training set.
    let eval_examples = match (job.validation_dataset_id, &preferences) {
        (Some(v), None) => Some(
            db.dataset_examples(v)
                .await?
                .into_iter()
                .map(|e| e.example)
                .collect(),
        ),
        _ => None,
    };
    let card_data = if config.method == Method::Lora {
        Some(job_card::card_data(db, &opts.gate, job.assistant_id, &trained_on).await?)
    } else {
        None
    };
    let model_path = resolve_model(&job.base_model, &opts.models_dir);
    let output_dir = job
        .output_dir
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| default_output_dir(opts, id));
    db.set_job_progress_target(id, Some(&output_dir.display().to_string()), None)
        .await?;
    // Preference runs cannot resume yet: an interrupted one starts over.
    let resume = latest_checkpoint(&output_dir).filter(|_| preferences.is_none());
    let overwrite = preferences.is_some();
    if let Some(ck) = &resume {
        tracing::info!("job {id}: resuming from {}", ck.display());
    }
    let resumed_step = resume
        .as_ref()
        .and_then(|ck| ck.file_name())
        .and_then(|n| crate::checkpoint::checkpoint_step(&n.to_string_lossy()))
        .map_or(0, |(step, _)| step as i64);
    db.drop_training_events_after(id, resumed_step).await?;

    // Cancel requests and worker shutdown both stop the run at its next step.
    let stop = Arc::new(AtomicBool::new(false));
    let cancel_seen = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (db, stop, cancel_seen, shutdown) = (
            db.clone(),
            stop.clone(),
            cancel_seen.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                if shutdown.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                }
                if let Ok(j) = db.job(id).await
                    && j.cancel_requested
                {
                    cancel_seen.store(true, Ordering::SeqCst);
                    stop.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<TrainEvent>();
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Err(err) = store_event(&db, id, &e).await {
                    tracing::warn!("job {id}: cannot store an event: {err}");
                }
            }
        })
    };
    let device = opts.device.clone();
    let shared = opts.shared_model.clone();
    let base_model = job.base_model.clone();
    let method = config.method;
    let dtype = auto_train_dtype(&device, method);
    let stop_flag = stop.clone();
    let card_cancel = cancel_seen.clone();
    let gate = opts.gate.clone();
    let yield_to = opts.yield_to.clone();
    let seq = config.sequence_len;
    let mut name = adapter_name(job);
    let card_name = name.clone();
    let decide_data = card_data.clone();
    let assistant_id = decide_data
        .as_ref()
        .and_then(|d| d.assistant_id)
        .or(job.assistant_id);
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let model = model_for(&model_path, shared.as_ref(), &device)?;
        let hash = hash_model(&model_path)?;
        let started = std::time::Instant::now();
        let train_job = TrainJob {
            model: &model,
            base_model_name: base_model,
            base_model_hash: hash.clone(),
            examples,
            eval_examples,
            config,
            output_dir,
            overwrite,
            resume_from: resume,
            init_adapter,
            dtype,
            yield_to,
        };
        let mut on_event = |e: &TrainEvent| {
            let _ = tx.send(e.clone());
        };
        let o = match &preferences {
            Some(data) => train_preferences(train_job, data, &stop_flag, &mut on_event)?,
            None => train(train_job, &stop_flag, &mut on_event)?,
        };
        let train_secs = started.elapsed().as_secs_f64();
        let card = match (&card_data, o.ending) {
            (Some(data), Ending::Finished | Ending::EarlyStopped) => {
                let say = |text: String| {
                    let _ = tx.send(TrainEvent::Message { text });
                };
                let made = DenseLlama::from_llama(&model.llama, dtype)
                    .map_err(anyhow::Error::from)
                    .and_then(|dense| {
                        job_card::make_card(
                            &model,
                            &dense,
                            &card_name,
                            &o.output_dir,
                            &o.heldout,
                            data,
                            &hash,
                            seq,
                            &gate,
                            &card_cancel,
                            &mut |m| say(m.to_string()),
                        )
                    });
                match made {
                    Ok(card) => {
                        say(format!(
                            "report card made in {:.1} s ({:.0}% of the {:.1} s of training)",
                            card.seconds,
                            100.0 * card.seconds / train_secs.max(1e-9),
                            train_secs
                        ));
                        Some(card)
                    }
                    Err(_) if card_cancel.load(Ordering::SeqCst) => {
                        say("report card stopped: the job was cancelled".into());
                        None
                    }
                    Err(e) => {
                        say(format!("report card failed: {e:#}"));
                        None
                    }
                }
            }
            _ => None,
        };
        Ok((o, card))
    })
    .await;
    watcher.abort();
    let _ = writer.await;
    let (outcome, mut card) =
        outcome.map_err(|e| anyhow::anyhow!("the trainer panicked: {e}"))??;
    match outcome.ending {
        Ending::Cancelled if cancel_seen.load(Ordering::SeqCst) => return Ok(JobEnd::Cancelled),
        Ending::Cancelled => return Ok(JobEnd::Interrupted),
        _ => {}
    }
    // A cancel that came after the last step (or during the card) still stops the job;
    // from here on one is refused, so what follows is never half undone.
    if !db.begin_publishing(id).await? {
        return Ok(JobEnd::Cancelled);
    }
    if method == Method::Lora {
        let meta = AdapterMetadata::read(&outcome.output_dir)?;
        let cfg = Checkpoint::load(&outcome.output_dir).map_err(anyhow::Error::msg)?;
        let c = &cfg.state.config;
        let metrics = serde_json::json!({
            "final_loss": outcome.final_loss,
            "eval": outcome.eval,
            "steps": outcome.steps,
            "trained_tokens": outcome.trained_tokens,
        });
        // A worker killed while publishing this job registered its adapter already: this
        // attempt finishes that publication (a second insert failed on the name).
        let registered = db.adapter_of_job(id).await?;
        let adapter = match registered {
            Some(a) => a,
            None => {
                let free = free_model_name(db, &name, &job.base_model).await?;
                if free != name {
                    let text = format!(
                        "{name} already names an adapter or an assistant (the OpenAI endpoint's model names both): the adapter is published as {free}"
                    );
                    tracing::info!("job {id}: {text}");
                    store_event(db, id, &TrainEvent::Message { text }).await?;
                    name = free;
                }
                db.insert_adapter(&NewAdapter {
                    name: &name,
                    path: &outcome.output_dir.display().to_string(),
                    base_model: &meta.base_model,
                    base_model_hash: &meta.base_model_hash,
                    tokenizer_hash: &meta.tokenizer_hash,
                    chat_template_hash: &meta.chat_template_hash,
                    rank: Some(c.lora_r as i64),
                    alpha: Some(c.lora_alpha),
                    target_modules: &c.lora_target_modules,
                    metrics: &metrics,
                    job_id: Some(id),
                    assistant_id,
                })
                .await?
            }
        };
        db.set_job_adapter(id, adapter.id).await?;
        if let Some(card) = card.as_mut() {
            card.adapter.clone_from(&adapter.name);
        }
        let said = match &card {
            Some(card) if job.sweep_id.is_some() => {
                db.set_report_card(adapter.id, &serde_json::to_value(card)?)
                    .await?;
                format!(
                    "{name} is a trial of sweep {}: the sweep decides when its last trial ends",
                    job.sweep_id.unwrap_or_default()
                )
            }
            Some(card) => {
                db.set_report_card(adapter.id, &serde_json::to_value(card)?)
                    .await?;
                let data = decide_data.unwrap_or_default();
                job_card::decide(db, &opts.gate, &data, adapter.id, card).await?
            }
            None => format!("{name} has no report card, so the gate does not activate it"),
        };
        tracing::info!("job {id}: {said}");
        store_event(db, id, &TrainEvent::Message { text: said }).await?;
    }
    Ok(JobEnd::Succeeded)
}

/// `wanted`, or the first of `wanted-2`, `wanted-3`, ... that no adapter and no assistant
/// has (the OpenAI endpoint's `model` names both: an assistant of the adapter's name
/// answered in its place).
async fn free_model_name(db: &Db, wanted: &str, base_model: &str) -> anyhow::Result<String> {
    for n in 1u32.. {
        let name = match n {
            1 => wanted.to_string(),
            n => format!("{wanted}-{n}"),
        };
        let taken = reserved_model_name(&name, base_model) || db.model_name_in_use(&name).await?;
        if !taken {
            return Ok(name);
        }
    }
    unreachable!("some numbered name is free")
}

/// `job-ID`, or `SUFFIX-job-ID` for a job given OpenAI's `suffix`.
fn adapter_name(job: &TrainingJob) -> String {
    match &job.suffix {
        Some(s) => format!("{s}-job-{}", job.id),
        None => format!("job-{}", job.id),
    }
}
