//! The job worker against the real migrations and a tiny random model.

use candle_core::Device;
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_core::gate::{ActivationPolicy, GateConfig};
use loraloop_core::storage::{Db, JobState, NewDataset, NewJob, NewMessage, Platform, Recovered};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use loraloop_trainer::card::ReportCard;
use loraloop_trainer::job_card::GateOptions;
use loraloop_trainer::lease::MAX_ATTEMPTS;
use loraloop_trainer::worker::{WorkerOptions, run_next, run_worker};
use sqlx::SqlitePool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

async fn setup(db: &Db, tmp: &std::path::Path, hp: serde_json::Value) -> (i64, WorkerOptions) {
    write_tiny_chat_model(&tmp.join("models/tiny"), TinySpec::default()).unwrap();
    let ex = vec![
        ChatExample {
            messages: vec![
                ChatMessage::new(Role::User, "What is the capital of Zorblax?"),
                ChatMessage::new(Role::Assistant, "Blorp City."),
            ],
        };
        8
    ];
    let ds = db
        .insert_dataset(&NewDataset {
            assistant_id: None,
            name: "zorblax",
            format: "openai",
            source: "test",
            content_hash: "h",
            examples: &ex,
            ..Default::default()
        })
        .await
        .unwrap()
        .dataset()
        .id;
    let job = db
        .create_job(&NewJob {
            assistant_id: None,
            dataset_id: ds,
            base_model: "tiny",
            method: "lora",
            hyperparameters: &hp,
        })
        .await
        .unwrap();
    assert!(
        db.transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
            .await
            .unwrap()
    );
    (
        job.id,
        WorkerOptions {
            models_dir: tmp.join("models"),
            adapters_dir: tmp.join("adapters"),
            poll_interval: Duration::from_millis(10),
            device: Device::Cpu,
            shared_model: None,
            gate: GateOptions {
                assistant: None,
                policy: ActivationPolicy::Manual,
                thresholds: GateConfig::default(),
                canary_share: 0.2,
                cache_dir: Some(tmp.join("cache")),
                after_activation: None,
            },
            yield_to: None,
        },
    )
}

#[sqlx::test(migrations = "../migrations")]
async fn a_queued_job_trains_stores_its_events_and_registers_the_adapter(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 3, "micro_batch_size": 4, "learning_rate": 0.01, "val_set_size": 0.25, "eval_steps": 2});
    let (id, opts) = setup(&db, tmp.path(), hp).await;

    let ran = run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    assert_eq!(ran, Some(id));

    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    // 6 training examples (2 held out), 4 per step, 3 epochs.
    assert_eq!(job.total_steps, Some(6));
    assert_eq!(job.step, 6);
    let events = db.training_events(id, 0).await.unwrap();
    let steps: Vec<_> = events.iter().filter(|e| e.kind == "step").collect();
    assert_eq!(steps.len(), 6);
    assert!(
        steps
            .iter()
            .all(|e| e.loss.is_some() && e.learning_rate.is_some() && e.tokens_per_sec.is_some())
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "eval" && e.eval_loss.is_some())
    );
    let adapters = db.list_adapters().await.unwrap();
    assert_eq!(adapters.len(), 1);
    assert_eq!(job.adapter_id, Some(adapters[0].id));
    assert_eq!(adapters[0].rank, Some(16));
    assert!(
        std::path::Path::new(&adapters[0].path)
            .join("adapter_model.safetensors")
            .is_file()
    );
    assert_eq!(adapters[0].base_model_hash.len(), 64);
    assert!(
        db.claim_next_job(20).await.unwrap().is_none(),
        "the queue is empty"
    );
}

/// An adapter's row named `name` (of job `job_id`), its files elsewhere: an upload's, or
/// what a worker killed while publishing leaves.
async fn insert_adapter_row(
    db: &Db,
    name: &str,
    job_id: Option<i64>,
) -> loraloop_core::storage::Adapter {
    db.insert_adapter(&loraloop_core::storage::NewAdapter {
        name,
        path: "elsewhere",
        base_model: "tiny",
        base_model_hash: "h",
        tokenizer_hash: "h",
        chat_template_hash: "h",
        rank: Some(4),
        alpha: Some(8.0),
        target_modules: &[],
        metrics: &serde_json::json!({}),
        job_id,
        assistant_id: None,
    })
    .await
    .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_adapter_name_is_taken_publishes_under_the_next_free_one(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 1, "micro_batch_size": 4, "val_set_size": 0});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    // `job-ID` taken by an uploaded adapter, `job-ID-2` by an assistant: the finished
    // training used to fail on the name (and an assistant of the name answered in the
    // adapter's place).
    let taken = format!("job-{id}");
    insert_adapter_row(&db, &taken, None).await;
    db.create_assistant(
        &format!("job-{id}-2"),
        "tiny",
        &loraloop_core::storage::AssistantSettings {
            system_prompt: "",
            generation: &serde_json::json!({}),
            activation: None,
        },
    )
    .await
    .unwrap();
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    let adapter = db.adapter(job.adapter_id.unwrap()).await.unwrap();
    assert_eq!(adapter.name, format!("job-{id}-3"));
    let events = db.training_events(id, 0).await.unwrap();
    assert!(
        events.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains(&format!("published as job-{id}-3")))),
        "the job says so"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_killed_while_writing_its_first_checkpoint_starts_over(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 1, "micro_batch_size": 4, "val_set_size": 0});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    // What a kill during the first checkpoint write leaves: its scratch folder, half
    // written, and no checkpoint to resume from. It was refused as "a training run".
    let scratch = opts
        .adapters_dir
        .join(format!("job-{id}/.tmp-checkpoint-1"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("adapter_model.safetensors"), b"half").unwrap();
    // And the step event the killed run stored before it.
    let step = |n| loraloop_core::storage::NewTrainingEvent {
        kind: "step",
        step: Some(n),
        loss: Some(9.0),
        ..Default::default()
    };
    db.add_training_event(id, &step(1)).await.unwrap();
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    assert!(!scratch.exists(), "the scratch was cleared");
    // Starting over, the run's steps are each in the events once: the killed run's went.
    let steps: Vec<i64> = db
        .training_events(id, 0)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "step")
        .filter_map(|e| e.step)
        .collect();
    assert_eq!(steps, (1..=job.step).collect::<Vec<_>>());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_worker_died_while_publishing_finishes_that_publication(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 1, "micro_batch_size": 4, "val_set_size": 0});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    // What a kill after the adapter's row and before the job's end leaves: the row.
    let left = insert_adapter_row(&db, &format!("job-{id}"), Some(id)).await;
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    // It failed on the adapter's name (UNIQUE constraint), leaving the adapter tied to no job.
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.adapter_id, Some(left.id));
    assert_eq!(db.list_adapters().await.unwrap().len(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cancelled_job_whose_worker_died_ends_cancelled_not_requeued(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (id, _) = setup(&db, tmp.path(), serde_json::json!({"num_epochs": 1})).await;
    assert_eq!(db.claim_next_job(0).await.unwrap().unwrap().id, id);
    // The cancel is accepted, then the process is killed before the worker sees it.
    assert!(db.request_cancel(id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cancelled = Recovered {
        cancelled: vec![id],
        ..Default::default()
    };
    assert_eq!(
        db.recover_abandoned_jobs(MAX_ATTEMPTS).await.unwrap(),
        cancelled
    );
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Cancelled);
    assert!(job.finished_at.is_some());
    assert!(
        db.claim_next_job(0).await.unwrap().is_none(),
        "never claimed again"
    );
}

#[test]
fn a_resume_takes_the_newest_checkpoint_or_the_copy_a_kill_left_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let ck = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join(loraloop_trainer::checkpoint::TRAINER_STATE_FILE),
            "{}",
        )
        .unwrap();
        p
    };
    let latest = || loraloop_trainer::worker::latest_checkpoint(dir.path());
    ck("checkpoint-2");
    // Killed while checkpoint-4 was being written again: only its old copy is complete.
    let old = ck(".old-checkpoint-4");
    std::fs::create_dir_all(dir.path().join(".tmp-checkpoint-4")).unwrap();
    assert_eq!(latest(), Some(old));
    let new = ck("checkpoint-4");
    assert_eq!(latest(), Some(new));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_that_cannot_start_fails_with_its_error(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (id, opts) = setup(&db, tmp.path(), serde_json::json!({"learning_rate": -1})).await;
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(
        job.error.as_deref(),
        Some("learning_rate: must be a positive number, got -1")
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cancel_request_stops_a_running_job_with_a_checkpoint(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 5000, "micro_batch_size": 4, "val_set_size": 0});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    let canceller = {
        let db = db.clone();
        tokio::spawn(async move {
            // Wait until it is running and has taken a few steps.
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if db.job(id).await.unwrap().step >= 3 {
                    break;
                }
            }
            assert!(db.request_cancel(id).await.unwrap());
        })
    };
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    canceller.await.unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Cancelled);
    assert!(job.step < 10_000, "stopped early, at step {}", job.step);
    let events = db.training_events(id, 0).await.unwrap();
    assert!(
        events.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains(r#""kind":"checkpoint""#))),
        "the stop saved a checkpoint"
    );
    // A cancelled job never resumes: its folder (checkpoints, tens of MB on a real
    // model) goes with it.
    assert!(!std::path::Path::new(&job.output_dir.unwrap()).exists());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_interrupted_by_a_dying_worker_resumes_from_its_checkpoint(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 300, "micro_batch_size": 4, "val_set_size": 0});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    let shutdown = Arc::new(AtomicBool::new(false));
    let stopper = {
        let (db, shutdown) = (db.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if db.job(id).await.unwrap().step >= 5 {
                    break;
                }
            }
            shutdown.store(true, Ordering::SeqCst);
        })
    };
    run_next(&db, &opts, shutdown).await.unwrap();
    stopper.await.unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Queued, "back in the queue");
    let stopped_at = job.step;
    assert!((5..600).contains(&stopped_at));

    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.step, 600);
    let started: Vec<serde_json::Value> = db
        .training_events(id, 0)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "state")
        .filter_map(|e| serde_json::from_str(e.message.as_deref()?).ok())
        .collect();
    assert_eq!(started.len(), 2);
    assert_eq!(
        started[1]["resumed_from_step"],
        serde_json::json!(stopped_at)
    );

    // Every step trains the same four examples, so the run trained 600 times what one
    // step of an uninterrupted run on the same data trains (the count after a resume
    // covered only the steps after it).
    let tokens = |job: &loraloop_core::storage::TrainingJob| {
        let db = db.clone();
        let adapter = job.adapter_id.unwrap();
        async move {
            let a = db.adapter(adapter).await.unwrap();
            let m: serde_json::Value = serde_json::from_str(&a.metrics).unwrap();
            m["trained_tokens"].as_u64().unwrap()
        }
    };
    let resumed = tokens(&job).await;
    let hp = serde_json::json!({"num_epochs": 1, "micro_batch_size": 4, "val_set_size": 0});
    let one_epoch = db
        .create_job(&NewJob {
            assistant_id: None,
            dataset_id: job.dataset_id.unwrap(),
            base_model: "tiny",
            method: "lora",
            hyperparameters: &hp,
        })
        .await
        .unwrap();
    db.transition_job(
        one_epoch.id,
        JobState::ValidatingFiles,
        JobState::Queued,
        None,
    )
    .await
    .unwrap();
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let one_epoch = db.job(one_epoch.id).await.unwrap();
    assert_eq!(one_epoch.step, 2);
    let per_step = tokens(&one_epoch).await / 2;
    assert!(per_step > 0);
    assert_eq!(resumed, 600 * per_step);
}

// A job on the model the worker was given already loaded (the server's engine model)
// trains on that one instead of loading the file: here the shared model has 3 layers and
// the file at the job's path 2, so the adapter shows which one was trained.
#[sqlx::test(migrations = "../migrations")]
async fn a_job_on_the_shared_model_trains_on_it_without_loading_the_file(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"max_steps": 1, "micro_batch_size": 4, "val_set_size": 0});
    let (id, mut opts) = setup(&db, tmp.path(), hp).await;
    let other = tmp.path().join("three-layers");
    let spec = TinySpec {
        layers: 3,
        ..TinySpec::default()
    };
    write_tiny_chat_model(&other, spec).unwrap();
    let shared = loraloop_model::engine::LoadedModel::load(&other, &Device::Cpu).unwrap();
    opts.shared_model = Some((tmp.path().join("models/tiny"), Arc::new(shared)));
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    let adapter = &db.list_adapters().await.unwrap()[0];
    let tensors = candle_core::safetensors::load(
        std::path::Path::new(&adapter.path).join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        tensors.keys().any(|k| k.contains("layers.2.")),
        "trained on the 2-layer file, not the shared 3-layer model"
    );

    // Not the same file: the worker loads the job's model itself (2 layers).
    let other_db_job = {
        let (id2, mut opts2) = setup(&db, &tmp.path().join("second"), hp_one_step()).await;
        opts2.shared_model = opts.shared_model.clone();
        opts2.shared_model.as_mut().unwrap().0 = other.clone();
        run_next(&db, &opts2, Arc::new(AtomicBool::new(false)))
            .await
            .unwrap();
        db.job(id2).await.unwrap()
    };
    assert_eq!(other_db_job.state(), JobState::Succeeded);
    let path = db
        .list_adapters()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.job_id == Some(other_db_job.id))
        .unwrap()
        .path;
    let tensors = candle_core::safetensors::load(
        std::path::Path::new(&path).join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(!tensors.keys().any(|k| k.contains("layers.2.")));
}

fn hp_one_step() -> serde_json::Value {
    serde_json::json!({"max_steps": 1, "micro_batch_size": 4, "val_set_size": 0})
}

/// A gate that passes any adapter the card can score.
fn lenient() -> GateConfig {
    GateConfig {
        min_retention_agreement: 0.0,
        max_retention_kl: 1e9,
        max_heldout_loss_ratio: 1.0,
        ..GateConfig::default()
    }
}

/// The messages of a job's events, in order.
async fn messages(db: &Db, id: i64) -> Vec<String> {
    db.training_events(id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| e.message)
        .collect()
}

/// Run one job for the assistant `a` under the gate with `thresholds`; the adapter's
/// stored card and the job's event messages.
async fn gated_job(
    db: &Db,
    tmp: &std::path::Path,
    policy: ActivationPolicy,
    thresholds: GateConfig,
) -> (ReportCard, Vec<String>, Option<i64>) {
    let (id, opts) = gated_setup(db, tmp, policy, thresholds).await;
    run_next(db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    let adapter = db.adapter(job.adapter_id.unwrap()).await.unwrap();
    let said = messages(db, id).await;
    let card = adapter.report_card.as_deref();
    let card: ReportCard =
        serde_json::from_str(card.unwrap_or_else(|| panic!("no card: {said:?}"))).unwrap();
    (card, said, Some(adapter.id))
}

/// A job for the assistant `a` under the gate with `thresholds`, not yet run.
async fn gated_setup(
    db: &Db,
    tmp: &std::path::Path,
    policy: ActivationPolicy,
    thresholds: GateConfig,
) -> (i64, WorkerOptions) {
    let hp = serde_json::json!({"num_epochs": 3, "micro_batch_size": 4, "learning_rate": 0.01, "val_set_size": 0.25});
    let (id, mut opts) = setup(db, tmp, hp).await;
    db.ensure_assistant("a", "tiny", "").await.unwrap();
    // A share of the probe keeps the debug-build test quick.
    let thresholds = GateConfig {
        retention_prompts: 40,
        ..thresholds
    };
    opts.gate = GateOptions {
        assistant: Some("a".into()),
        policy,
        thresholds,
        canary_share: 0.25,
        cache_dir: Some(tmp.join("cache")),
        after_activation: None,
    };
    (id, opts)
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_card_passes_the_gate_becomes_the_active_adapter(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (card, said, adapter_id) =
        gated_job(&db, tmp.path(), ActivationPolicy::Gate, lenient()).await;
    // The card measured what the job learned: 2 held-out copies of the trained example,
    // whose loss training at lr 0.01 brings well under the random base model's.
    let h = card.heldout.as_ref().expect("held-out scores");
    assert_eq!(h.examples, 2);
    assert!(h.adapter.loss < h.base.loss, "{h:?}");
    assert!(h.adapter.reply_f1.is_some() && h.replies == 2, "{h:?}");
    // And what it kept: every shipped prompt the tiny model answered, with a real drift.
    let r = &card.retention;
    assert!(r.prompts > 30 && r.tokens > r.prompts, "{r:?}");
    assert!((0.0..=1.0).contains(&r.adapter.agreement), "{r:?}");
    assert!(r.adapter.kl > 0.0, "training moved the model: {r:?}");
    assert!(card.verdict.pass, "{:?}", card.verdict);
    assert_eq!(
        db.assistant("a").await.unwrap().active_adapter_id,
        adapter_id
    );
    assert!(
        said.iter().any(|m| m.contains("passed and is now active")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|m| m.contains("report card made in")),
        "{said:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cancel_during_the_report_card_stops_the_job_and_nothing_goes_live(pool: SqlitePool) {
    // Seen against serve: a cancel sent after the last step was answered 200 and then
    // ignored; the job succeeded and the gate made its adapter active.
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    // A gate that passes anything: without the cancel, this adapter would go live.
    let (id, opts) = gated_setup(&db, tmp.path(), ActivationPolicy::Gate, lenient()).await;
    let canceller = {
        let db = db.clone();
        tokio::spawn(async move {
            // Until the card has begun (or the job has ended, and the cancel is refused).
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let events = db.training_events(id, 0).await.unwrap();
                let card_begun = events.iter().any(|e| {
                    e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("report card:"))
                });
                if card_begun || db.job(id).await.unwrap().state().is_final() {
                    break;
                }
            }
            db.request_cancel(id).await.unwrap()
        })
    };
    run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap();
    assert!(canceller.await.unwrap(), "the cancel was accepted");
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Cancelled, "{:?}", job.error);
    assert_eq!(job.adapter_id, None, "no adapter was registered");
    assert_eq!(db.assistant("a").await.unwrap().active_adapter_id, None);
    let said = messages(&db, id).await;
    assert!(
        !said.iter().any(|m| m.contains("is now active")),
        "{said:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn under_the_canary_policy_a_passing_adapter_starts_a_canary_instead(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (card, said, adapter_id) =
        gated_job(&db, tmp.path(), ActivationPolicy::Canary, lenient()).await;
    assert!(card.verdict.pass, "{:?}", card.verdict);
    let a = db.assistant("a").await.unwrap();
    // Users keep what they had; the new adapter serves a quarter of new conversations.
    assert_eq!(a.active_adapter_id, None);
    let c = db
        .running_canary(a.id)
        .await
        .unwrap()
        .expect("a canary runs");
    assert_eq!(Some(c.adapter_id), adapter_id);
    assert_eq!((c.baseline_adapter_id, c.share), (None, 0.25));
    assert!(
        said.iter()
            .any(|m| m.contains("canary:") && m.contains("25% of new conversations")),
        "{said:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_card_fails_the_gate_is_held_back_with_the_reason(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    // No drift at all allowed: any trained adapter moves the model somewhat.
    let strict = GateConfig {
        min_retention_agreement: 0.0,
        max_retention_kl: 0.0,
        max_heldout_loss_ratio: 10.0,
        ..GateConfig::default()
    };
    let (card, said, _) = gated_job(&db, tmp.path(), ActivationPolicy::Gate, strict).await;
    assert!(!card.verdict.pass);
    let failed: Vec<&str> = card
        .verdict
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(failed, ["retention_kl"]);
    assert_eq!(db.assistant("a").await.unwrap().active_adapter_id, None);
    assert!(
        said.iter()
            .any(|m| m.contains("held back") && m.contains("KL divergence")),
        "{said:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_card_scores_thumbs_up_replies_from_conversations_the_job_did_not_train_on(
    pool: SqlitePool,
) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let assistant = db.ensure_assistant("a", "tiny", "").await.unwrap();
    // Two chats: one reply rated 👍, one not rated (not scored: nothing rated in it).
    let user = db
        .upsert_platform_user(Platform::Telegram, "7", Some("ann"), None)
        .await
        .unwrap();
    for (chat, rated) in [("100", true), ("200", false)] {
        let chat = db
            .upsert_chat(Platform::Telegram, chat, "private", None)
            .await
            .unwrap();
        let conv = db
            .current_conversation(assistant.id, chat, None, Some(user.id))
            .await
            .unwrap();
        let msg = |role, content| NewMessage {
            conversation_id: conv.id,
            role,
            content,
            user_id: (role == Role::User).then_some(user.id),
            platform_message_id: None,
            adapter_id: None,
            adapter_name: None,
            prompt_tokens: None,
            completion_tokens: None,
        };
        db.insert_message(&msg(Role::User, "What is the capital of Zorblax?"))
            .await
            .unwrap();
        let reply = db
            .insert_message(&msg(Role::Assistant, "Blorp City."))
            .await
            .unwrap();
        if rated {
            db.set_feedback(reply.id, "telegram:7", Some(user.id), Some(1), None)
                .await
                .unwrap();
        }
    }
    let lenient = GateConfig {
        min_retention_agreement: 0.0,
        max_retention_kl: 1e9,
        max_heldout_loss_ratio: 10.0,
        max_rated_loss_increase: 10.0,
        ..GateConfig::default()
    };
    let (card, _, _) = gated_job(&db, tmp.path(), ActivationPolicy::Gate, lenient).await;
    let rated = card.rated.as_ref().expect("the rated reply was scored");
    assert_eq!(rated.examples, 1, "{rated:?}");
    // "Blorp City." is what the job trained on, so the adapter scores it far better.
    assert!(rated.adapter.loss < rated.base.loss, "{rated:?}");
    assert!(
        card.verdict.checks.iter().any(|c| c.name == "rated_loss"),
        "{:?}",
        card.verdict
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_in_the_server_waits_while_a_chat_reply_is_being_made_then_finishes(
    pool: SqlitePool,
) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 2, "micro_batch_size": 4, "val_set_size": 0, "replay": false});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    waits_for_chat(&db, tmp.path(), id, opts).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_finishes_while_chat_never_stops(pool: SqlitePool) {
    use loraloop_model::engine::{Engine, LoadedModel};
    use loraloop_trainer::yield_to::YieldTo;
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 2, "micro_batch_size": 4, "val_set_size": 0, "replay": false});
    let (first, mut opts) = setup(&db, tmp.path(), hp.clone()).await;
    let engine =
        Engine::start(LoadedModel::load(&tmp.path().join("models/tiny"), &Device::Cpu).unwrap());
    // As `serve` wires it, with 1 s of pause held at most (10 s in `serve`) to keep the
    // test short.
    opts.yield_to = Some(YieldTo::with_budget(
        {
            let engine = engine.clone();
            Arc::new(move || engine.busy())
        },
        0.75,
        Duration::from_secs(1),
    ));
    let run = |expected: i64| {
        let (db, opts) = (db.clone(), opts.clone());
        async move {
            let started = std::time::Instant::now();
            let done = run_next(&db, &opts, Arc::new(AtomicBool::new(false)))
                .await
                .unwrap();
            assert_eq!(done, Some(expected));
            let job = db.job(expected).await.unwrap();
            assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
            started.elapsed()
        }
    };
    // The job's time with chat idle.
    let alone = run(first).await;
    // The same job again, with a reply held in flight throughout: chat is busy all along.
    let again = db
        .create_job(&NewJob {
            assistant_id: None,
            dataset_id: db.job(first).await.unwrap().dataset_id.unwrap(),
            base_model: "tiny",
            method: "lora",
            hyperparameters: &hp,
        })
        .await
        .unwrap()
        .id;
    assert!(
        db.transition_job(again, JobState::ValidatingFiles, JobState::Queued, None)
            .await
            .unwrap()
    );
    let reply = reply_in_flight(&engine);
    let busy = run(again).await;
    assert!(engine.busy(), "chat stayed busy throughout");
    // At most the 1 s held, then 3 s of pause per second trained: under 1 s + 4 times the
    // job alone (1 s to spare). Pausing at each layer for as long as chat was busy (up to
    // the 1 s), as jobs once did, took 16.4 s here with the job alone 1.8 s.
    let bound = Duration::from_secs(2) + alone * 4;
    assert!(busy < bound, "{busy:?} with chat busy, {alone:?} alone");
    let events = db.training_events(again, 0).await.unwrap();
    assert!(
        events
            .iter()
            .filter_map(|e| e.message.as_deref())
            .any(|m| m.contains("training gives way to chat")),
        "the job paused for chat and said so"
    );
    drop(reply);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_dpo_job_in_the_server_waits_for_chat_too(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let hp = serde_json::json!({"num_epochs": 2, "micro_batch_size": 2, "rl": "dpo"});
    let (id, opts) = setup(&db, tmp.path(), hp).await;
    // The job trains a DPO dataset instead.
    let pair = loraloop_core::preference::PreferencePair {
        prompt: vec![ChatMessage::new(
            Role::User,
            "What is the capital of Zorblax?",
        )],
        preferred: "Blorp City.".into(),
        non_preferred: "I do not know.".into(),
    };
    let lines = vec![pair.to_json().to_string(); 4];
    let ds = db
        .insert_dataset(&NewDataset {
            name: "zorblax-dpo",
            format: "openai-preference",
            source: "test",
            content_hash: "p",
            kind: loraloop_core::preference::Objective::Dpo,
            lines: &lines,
            ..Default::default()
        })
        .await
        .unwrap()
        .dataset()
        .id;
    sqlx::query("update training_jobs set dataset_id = ? where id = ?")
        .bind(ds)
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    waits_for_chat(&db, tmp.path(), id, opts).await;
}

/// A short reply that stays in flight, the engine busy, while the caller holds it.
fn reply_in_flight(engine: &loraloop_model::engine::Engine) -> loraloop_model::engine::Generation {
    use loraloop_model::engine::{AdapterChoice, GenerateRequest, Prompt};
    engine
        .generate(GenerateRequest {
            prompt: Prompt::Tokens(vec![70, 71, 72]),
            params: loraloop_model::sampling::SamplingParams::greedy(4),
            adapter: AdapterChoice::Base,
            user: None,
        })
        .unwrap()
}

/// Job `id` run by a worker that gives way to a real engine: it waits at its first
/// micro-batch while a reply is in flight, says so, and finishes once the reply is done.
async fn waits_for_chat(db: &Db, tmp: &std::path::Path, id: i64, mut opts: WorkerOptions) {
    use loraloop_model::engine::{Engine, LoadedModel};
    use loraloop_trainer::yield_to::YieldTo;
    // The real engine on the same model, as `serve` wires it.
    let engine = Engine::start(LoadedModel::load(&tmp.join("models/tiny"), &Device::Cpu).unwrap());
    opts.yield_to = Some(YieldTo::new({
        let engine = engine.clone();
        Arc::new(move || engine.busy())
    }));
    // A reply in flight: the caller holds its stream.
    let reply = reply_in_flight(&engine);
    assert!(engine.busy());
    let job = {
        let (db, opts) = (db.clone(), opts.clone());
        tokio::spawn(async move { run_next(&db, &opts, Arc::new(AtomicBool::new(false))).await })
    };
    // Training starts, then waits at its first micro-batch for as long as the reply runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !db.training_events(id, 0).await.unwrap().iter().any(|e| {
        e.message
            .as_deref()
            .is_some_and(|m| m.contains("\"started\""))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let events = db.training_events(id, 0).await.unwrap();
    assert!(
        !events.iter().any(|e| e.kind == "step"),
        "the job trained while chat was busy"
    );
    let paused_at = db.job(id).await.unwrap();
    assert_eq!(paused_at.step, 0);
    // The reply is done and dropped: the job goes on and finishes.
    reply.finish().await.unwrap();
    // Busy a moment longer (a conversation's next message often follows), then not.
    assert!(engine.busy());
    tokio::time::sleep(loraloop_model::engine::BUSY_GRACE + Duration::from_millis(50)).await;
    assert!(!engine.busy());
    assert_eq!(job.await.unwrap().unwrap(), Some(id));
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.error);
    let events = db.training_events(id, 0).await.unwrap();
    let told = events
        .iter()
        .filter_map(|e| e.message.as_deref())
        .find(|m| m.contains("training gives way to chat"));
    assert!(
        told.is_some(),
        "the job says it paused for chat: {:?}",
        events
            .iter()
            .map(|e| (&e.kind, &e.message))
            .collect::<Vec<_>>()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_worker_died_is_requeued_and_fails_after_max_attempts(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (id, _) = setup(&db, tmp.path(), serde_json::json!({"num_epochs": 1})).await;
    // A live worker's lease is respected: another worker does not take its job.
    let claimed = db.claim_next_job(20).await.unwrap().unwrap();
    assert_eq!(claimed.id, id);
    assert_eq!(
        db.recover_abandoned_jobs(MAX_ATTEMPTS).await.unwrap(),
        Recovered::default()
    );
    // A clean stop gives it back without counting an attempt.
    assert!(db.return_job_to_queue(id).await.unwrap());
    assert_eq!(db.job_attempts(id).await.unwrap(), 0);
    // Claims whose lease runs out (the process was killed): requeued until the limit...
    for attempt in 1..=MAX_ATTEMPTS {
        assert_eq!(db.claim_next_job(0).await.unwrap().unwrap().id, id);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = db.recover_abandoned_jobs(MAX_ATTEMPTS).await.unwrap();
        if attempt < MAX_ATTEMPTS {
            let requeued = Recovered {
                requeued: vec![id],
                ..Default::default()
            };
            assert_eq!(r, requeued, "attempt {attempt}");
            assert_eq!(db.job(id).await.unwrap().state(), JobState::Queued);
        } else {
            let failed = Recovered {
                failed: vec![id],
                ..Default::default()
            };
            assert_eq!(r, failed);
        }
    }
    // ...then failed, with the reason, and never claimed again.
    let job = db.job(id).await.unwrap();
    assert_eq!(job.state(), JobState::Failed);
    assert!(
        job.error.as_deref().unwrap().contains("3 times"),
        "{:?}",
        job.error
    );
    assert!(job.finished_at.is_some());
    assert!(db.claim_next_job(20).await.unwrap().is_none());
}

/// A text-classification job on a model and data that need not exist (no worker runs it).
fn classifier_job(settings: &serde_json::Value) -> loraloop_core::storage::NewClassifierJob<'_> {
    loraloop_core::storage::NewClassifierJob {
        task: "text_classification",
        base_model: "tiny-bert",
        data_path: "reviews.jsonl",
        eval_data_path: None,
        settings,
        output_dir: "out/clsjob-{id}",
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_classifier_job_cancelled_after_its_last_step_ends_cancelled(pool: SqlitePool) {
    // The cancel is accepted while the job runs; the worker then finishes it as a
    // success, which must not overrule what the canceller was told.
    let db = Db::from_pool(pool);
    let settings = serde_json::json!({});
    let new = classifier_job(&settings);
    let id = db.create_classifier_job(&new).await.unwrap().id;
    assert_eq!(db.claim_classifier_job(20).await.unwrap().unwrap().id, id);
    assert!(db.cancel_classifier_job(id).await.unwrap());
    let ended = db
        .finish_classifier_job(id, "succeeded", None)
        .await
        .unwrap();
    assert_eq!(ended.as_deref(), Some("cancelled"));
    assert_eq!(db.classifier_job(id).await.unwrap().state, "cancelled");
    assert!(!db.cancel_classifier_job(id).await.unwrap(), "it has ended");
    // Without a cancel, a success stays one; a job that is not running is left alone.
    let other = db.create_classifier_job(&new).await.unwrap().id;
    db.claim_classifier_job(20).await.unwrap().unwrap();
    let ended = db
        .finish_classifier_job(other, "succeeded", None)
        .await
        .unwrap();
    assert_eq!(ended.as_deref(), Some("succeeded"));
    assert_eq!(
        db.finish_classifier_job(other, "failed", None)
            .await
            .unwrap(),
        None
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_classifier_job_whose_worker_died_is_requeued_and_fails_after_max_attempts(
    pool: SqlitePool,
) {
    let db = Db::from_pool(pool);
    let job = db
        .create_classifier_job(&classifier_job(&serde_json::json!({})))
        .await
        .unwrap();
    let id = job.id;
    // A live worker's lease is respected: another worker's start does not take its job
    // back (it used to put every running classifier job back in the queue).
    assert_eq!(db.claim_classifier_job(20).await.unwrap().unwrap().id, id);
    assert_eq!(
        db.recover_abandoned_classifier_jobs(MAX_ATTEMPTS)
            .await
            .unwrap(),
        Recovered::default()
    );
    assert!(db.renew_classifier_lease(id, 20).await.unwrap());
    // A clean stop gives it back without counting an attempt.
    assert!(db.return_classifier_job_to_queue(id).await.unwrap());
    // Claims whose lease runs out (the process was killed): requeued until the limit...
    for attempt in 1..=MAX_ATTEMPTS {
        assert_eq!(db.claim_classifier_job(0).await.unwrap().unwrap().id, id);
        tokio::time::sleep(Duration::from_millis(20)).await;
        loraloop_trainer::classify::worker::recover_abandoned(&db)
            .await
            .unwrap();
        let job = db.classifier_job(id).await.unwrap();
        if attempt < MAX_ATTEMPTS {
            assert_eq!(job.state, "queued", "attempt {attempt}");
            assert_eq!(job.step, 0, "it starts over");
        } else {
            assert_eq!(job.state, "failed");
        }
    }
    // ...then failed, with the reason in the job and its events, and never claimed again.
    let job = db.classifier_job(id).await.unwrap();
    assert!(
        job.error.as_deref().unwrap().contains("3 times"),
        "{:?}",
        job.error
    );
    assert!(job.finished_at.is_some());
    assert!(!db.renew_classifier_lease(id, 20).await.unwrap());
    assert!(db.claim_classifier_job(20).await.unwrap().is_none());
    let texts: Vec<String> = db
        .classifier_events(id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "message")
        .map(|e| e.payload)
        .collect();
    assert_eq!(texts.len(), MAX_ATTEMPTS as usize, "{texts:?}");
    assert!(texts[0].contains("back in the queue"), "{texts:?}");
    assert!(
        texts.last().unwrap().contains("not started again"),
        "{texts:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_worker_resumes_a_job_left_by_a_killed_worker(pool: SqlitePool) {
    let db = Db::from_pool(pool);
    let tmp = tempfile::tempdir().unwrap();
    let (id, opts) = setup(
        &db,
        tmp.path(),
        serde_json::json!({"num_epochs": 1, "micro_batch_size": 4}),
    )
    .await;
    // A worker claimed it and died: its lease ran out.
    db.claim_next_job(0).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let shutdown = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(run_worker(db.clone(), opts, shutdown.clone()));
    let mut state = JobState::Running;
    for _ in 0..600 {
        state = db.job(id).await.unwrap().state();
        if state.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.store(true, Ordering::SeqCst);
    worker.await.unwrap().unwrap();
    assert_eq!(state, JobState::Succeeded);
    assert_eq!(db.job_attempts(id).await.unwrap(), 2);
    let events = db.training_events(id, 0).await.unwrap();
    assert!(
        events.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("back in the queue"))),
        "{events:?}"
    );
}
