//! Training jobs and their progress events. States follow OpenAI's fine-tuning jobs:
//! validating_files -> queued -> running -> succeeded | failed | cancelled.

use super::{Db, Result, sql};
use serde::Serialize;

/// A job created from files whose validation is still to come. A job created on a
/// dataset passes through `validating_files` too, on its way to `queued` (the state's
/// default), but has its dataset from the start: file validation must not take it.
const FILE_JOB_TO_VALIDATE: &str = "state = 'validating_files' and dataset_id is null";
/// A requeued job trains again and publishes again: until then, a cancel may stop it.
const UNPUBLISHED: &str = "publishing = 0, ";

crate::keywords! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum JobState ("job state") {
        ValidatingFiles = "validating_files",
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// The jobs of dead workers, by what became of them (ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Back in the queue.
    pub requeued: Vec<i64>,
    /// Failed: claimed too many times.
    pub failed: Vec<i64>,
    /// Cancelled: a cancel was accepted before the worker died.
    pub cancelled: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TrainingJob {
    pub id: i64,
    pub state: String,
    /// None only while a job created from a file is validating it (or failed to).
    pub dataset_id: Option<i64>,
    pub base_model: String,
    pub method: String,
    pub hyperparameters: String,
    pub output_dir: Option<String>,
    pub adapter_id: Option<i64>,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub cancel_requested: bool,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The assistant the adapter is for: its activation policy decides what happens to it.
    pub assistant_id: Option<i64>,
    /// The uploaded files an OpenAI-style job was created from.
    pub training_file_id: Option<i64>,
    pub validation_file_id: Option<i64>,
    /// The held-out examples its validation file became.
    pub validation_dataset_id: Option<i64>,
    /// Which file a failed validation refused (`training_file`, `validation_file`).
    pub error_param: Option<String>,
    /// OpenAI's `suffix`: part of the adapter's name.
    pub suffix: Option<String>,
    /// The sweep this job is a trial of: the sweep, not the job, decides its adapter.
    pub sweep_id: Option<i64>,
    /// A succeeded job's step metrics as a CSV file (OpenAI's `result_files`).
    pub result_file_id: Option<i64>,
}

impl TrainingJob {
    pub fn state(&self) -> JobState {
        self.state.parse().unwrap_or(JobState::Failed)
    }
}

#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub dataset_id: i64,
    pub base_model: &'a str,
    pub method: &'a str,
    pub hyperparameters: &'a serde_json::Value,
    pub assistant_id: Option<i64>,
}

/// A job created from uploaded files; see [`Db::create_file_job`].
#[derive(Debug, Clone)]
pub struct NewFileJob<'a> {
    pub base_model: &'a str,
    pub method: &'a str,
    pub hyperparameters: &'a serde_json::Value,
    pub assistant_id: Option<i64>,
    pub training_file_id: i64,
    pub validation_file_id: Option<i64>,
    pub suffix: Option<&'a str>,
}

#[derive(Debug, Clone, Default)]
pub struct NewTrainingEvent<'a> {
    pub kind: &'a str,
    pub step: Option<i64>,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub message: Option<&'a str>,
}

impl<'a> NewTrainingEvent<'a> {
    /// An event that is only a message (`state` and `log` events).
    pub fn message(kind: &'a str, message: &'a str) -> Self {
        Self {
            kind,
            message: Some(message),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TrainingEvent {
    pub id: i64,
    pub job_id: i64,
    pub kind: String,
    pub step: Option<i64>,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub message: Option<String>,
    pub created_at: String,
}

pub(super) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
/// Now plus the first bound parameter, in seconds.
pub(super) const LEASE: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?1 || ' seconds')";

pub(super) const JOB_COLUMNS: &str = "id, state, dataset_id, base_model, method, hyperparameters, output_dir, adapter_id, step, total_steps, cancel_requested, error, created_at, started_at, finished_at, assistant_id, training_file_id, validation_file_id, validation_dataset_id, error_param, suffix, sweep_id, result_file_id";

impl Db {
    pub async fn create_job(&self, job: &NewJob<'_>) -> Result<TrainingJob> {
        sql::one(
            self.pool(),
            &format!(
                "insert into training_jobs (dataset_id, base_model, method, hyperparameters, assistant_id)
                 values (?, ?, ?, ?, ?) returning {JOB_COLUMNS}"
            ),
            (
                job.dataset_id,
                job.base_model,
                job.method,
                job.hyperparameters.to_string(),
                job.assistant_id,
            ),
        )
        .await
    }

    /// A job from uploaded files (OpenAI's API): `validating_files`, with no dataset until
    /// [`Db::validated_job`] gives it the one its training file became.
    pub async fn create_file_job(&self, job: &NewFileJob<'_>) -> Result<TrainingJob> {
        sql::one(
            self.pool(),
            &format!(
                "insert into training_jobs (base_model, method, hyperparameters, assistant_id,
                    training_file_id, validation_file_id, suffix)
                 values (?, ?, ?, ?, ?, ?, ?) returning {JOB_COLUMNS}"
            ),
            (
                job.base_model,
                job.method,
                job.hyperparameters.to_string(),
                job.assistant_id,
                job.training_file_id,
                job.validation_file_id,
                job.suffix,
            ),
        )
        .await
    }

    /// A validated job: its datasets, and `validating_files` -> `queued`. False when the
    /// job had left `validating_files` (cancelled meanwhile).
    pub async fn validated_job(
        &self,
        id: i64,
        dataset_id: i64,
        validation_dataset_id: Option<i64>,
    ) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            "update training_jobs set dataset_id = ?, validation_dataset_id = ?, state = 'queued'
             where id = ? and state = 'validating_files'",
            (dataset_id, validation_dataset_id, id),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A job whose file did not validate: failed, with the file (`param`) and why.
    pub async fn job_file_refused(&self, id: i64, param: &str, message: &str) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            &format!(
                "update training_jobs set state = 'failed', error = ?, error_param = ?, finished_at = {NOW}
                 where id = ? and {FILE_JOB_TO_VALIDATE}"
            ),
            (message, param, id),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Jobs waiting for their files to be validated, oldest first.
    pub async fn jobs_validating_files(&self) -> Result<Vec<i64>> {
        let ids: Vec<(i64,)> = sql::all(
            self.pool(),
            &format!("select id from training_jobs where {FILE_JOB_TO_VALIDATE} order by id"),
            (),
        )
        .await?;
        Ok(ids.into_iter().map(|r| r.0).collect())
    }

    pub async fn job(&self, id: i64) -> Result<TrainingJob> {
        self.row_by_id("training_jobs", JOB_COLUMNS, id, "training job ")
            .await
    }

    /// Move a job to `to` if it is in `from`; false if it was not (another worker moved it).
    pub async fn transition_job(
        &self,
        id: i64,
        from: JobState,
        to: JobState,
        error: Option<&str>,
    ) -> Result<bool> {
        let now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
        let done = sql::execute(
            self.pool(),
            &format!(
                "update training_jobs set state = ?1, error = coalesce(?2, error),
                    started_at = case when ?1 = 'running' then {now} else started_at end,
                    finished_at = case when ?1 in ('succeeded', 'failed', 'cancelled') then {now} else finished_at end
                 where id = ?3 and state = ?4"
            ),
            (to.as_str(), error, id, from.as_str()),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A running job succeeded: it ends with its results file (`filename`, `csv`, purpose
    /// `fine-tune-results`) in one transaction; false (nothing written) when the job was
    /// no longer running.
    pub async fn succeed_job(&self, id: i64, filename: &str, csv: &[u8]) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        let (file_id,): (i64,) = sql::one(
            &mut *tx,
            "insert into files (filename, purpose, bytes, content)
             values (?, 'fine-tune-results', ?, ?) returning id",
            (filename, csv.len() as i64, csv),
        )
        .await?;
        let done = sql::execute(
            &mut *tx,
            &format!(
                "update training_jobs set state = 'succeeded', finished_at = {NOW}, result_file_id = ?
                 where id = ? and state = 'running'"
            ),
            (file_id, id),
        )
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Claim the oldest queued job for a worker (queued -> running), atomically, with a
    /// lease of `lease_secs` that the worker renews while it runs.
    pub async fn claim_next_job(&self, lease_secs: i64) -> Result<Option<TrainingJob>> {
        self.claim_oldest("training_jobs", JOB_COLUMNS, lease_secs)
            .await
    }

    /// `claim_next_job` for a jobs table (`training_jobs`, `classifier_jobs`), returning
    /// the claimed row's `columns`.
    pub(super) async fn claim_oldest<T>(
        &self,
        table: &'static str,
        columns: &'static str,
        lease_secs: i64,
    ) -> Result<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        sql::optional(
            self.pool(),
            &format!(
                "update {table} set state = 'running', started_at = {NOW},
                    attempts = attempts + 1, lease_until = {LEASE}
                 where id = (select id from {table} where state = 'queued' order by id limit 1)
                   and state = 'queued'
                 returning {columns}"
            ),
            (lease_secs,),
        )
        .await
    }

    /// Extend a running job's lease; false when the job is no longer running.
    pub async fn renew_job_lease(&self, id: i64, lease_secs: i64) -> Result<bool> {
        self.renew_lease("training_jobs", id, lease_secs).await
    }

    /// Extend the lease of the running row `id` of a jobs table (`training_jobs`,
    /// `classifier_jobs`); false when that row is no longer running.
    pub(super) async fn renew_lease(
        &self,
        table: &'static str,
        id: i64,
        lease_secs: i64,
    ) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            &format!(
                "update {table} set lease_until = {LEASE} where id = ?2 and state = 'running'"
            ),
            (lease_secs, id),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A clean stop (shutdown): back to the queue, the claim not counted as an attempt.
    pub async fn return_job_to_queue(&self, id: i64) -> Result<bool> {
        self.return_to_queue("training_jobs", UNPUBLISHED, id).await
    }

    /// `return_job_to_queue` for a jobs table; `reset` as in `recover_abandoned`.
    pub(super) async fn return_to_queue(
        &self,
        table: &'static str,
        reset: &'static str,
        id: i64,
    ) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            &format!(
                "update {table} set state = 'queued', {reset}lease_until = null,
                    attempts = max(attempts - 1, 0)
                 where id = ? and state = 'running'"
            ),
            (id,),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Jobs whose worker died (running, lease run out): cancelled when a cancel was
    /// accepted, else back to the queue, or failed after `max_attempts` claims.
    pub async fn recover_abandoned_jobs(&self, max_attempts: i64) -> Result<Recovered> {
        self.recover_abandoned("training_jobs", UNPUBLISHED, max_attempts)
            .await
    }

    /// `recover_abandoned_jobs` for the rows of a jobs table (`training_jobs`,
    /// `classifier_jobs`); `reset` holds more `column = value, ` assignments a requeued row
    /// gets (a classifier job starts over from step 0).
    pub(super) async fn recover_abandoned(
        &self,
        table: &'static str,
        reset: &'static str,
        max_attempts: i64,
    ) -> Result<Recovered> {
        let abandoned =
            format!("state = 'running' and (lease_until is null or lease_until < {NOW})");
        // One transaction: a second process starting at the same moment sees the jobs all
        // recovered or none, never a job counted by both.
        let mut tx = self.pool().begin().await?;
        // A cancel accepted before the worker died is the job's end: running it again to
        // its next step only to stop there cost a claim, its setup and a step.
        let cancelled = sql::column(
            &mut *tx,
            &format!(
                "update {table} set state = 'cancelled', finished_at = {NOW}, lease_until = null
                 where {abandoned} and cancel_requested returning id"
            ),
            (),
        )
        .await?;
        let failed = sql::column(
            &mut *tx,
            &format!(
                "update {table} set state = 'failed', finished_at = {NOW}, lease_until = null,
                    error = 'the process stopped while running this job ' || attempts || ' times (a crash or an out-of-memory kill?): not started again; create a new job to retry'
                 where {abandoned} and attempts >= ?1 returning id"
            ),
            (max_attempts,),
        )
        .await?;
        let requeued = sql::column(
            &mut *tx,
            &format!(
                "update {table} set state = 'queued', {reset}lease_until = null where {abandoned} returning id"
            ),
            (),
        )
        .await?;
        tx.commit().await?;
        Ok(Recovered {
            requeued,
            failed,
            cancelled,
        })
    }

    /// How many times a job has been claimed without a clean stop.
    pub async fn job_attempts(&self, id: i64) -> Result<i64> {
        let (n,): (i64,) = sql::one(
            self.pool(),
            "select attempts from training_jobs where id = ?",
            (id,),
        )
        .await?;
        Ok(n)
    }

    /// Record where a job writes and/or how many steps it has (`None` keeps the value).
    pub async fn set_job_progress_target(
        &self,
        id: i64,
        output_dir: Option<&str>,
        total_steps: Option<i64>,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update training_jobs set output_dir = coalesce(?, output_dir),
                total_steps = coalesce(?, total_steps) where id = ?",
            (output_dir, total_steps, id),
        )
        .await?;
        Ok(())
    }

    /// Ask a job to stop: a queued job is cancelled at once, a running one at its next step
    /// (or during its report card). False when the job has already finished or has begun
    /// publishing its adapter ([`Db::begin_publishing`]).
    pub async fn request_cancel(&self, id: i64) -> Result<bool> {
        // One statement, so it cannot pass a job that finishes or starts publishing
        // between a read and the write.
        let marked = sql::execute(
            self.pool(),
            "update training_jobs set cancel_requested = 1
              where id = ? and publishing = 0
                and state in ('validating_files', 'queued', 'running')",
            (id,),
        )
        .await?
        .rows_affected()
            == 1;
        if !marked {
            // Not found stays an error; a finished or publishing job is refused.
            self.job(id).await?;
            return Ok(false);
        }
        for from in [JobState::Queued, JobState::ValidatingFiles] {
            self.transition_job(id, from, JobState::Cancelled, None)
                .await?;
        }
        Ok(true)
    }

    /// Mark a running job as publishing its result (storing its adapter, the gate's
    /// decision), after which a cancel is refused; false when a cancel came first.
    pub async fn begin_publishing(&self, id: i64) -> Result<bool> {
        let marked = sql::execute(
            self.pool(),
            "update training_jobs set publishing = 1
              where id = ? and state = 'running' and cancel_requested = 0",
            (id,),
        )
        .await?;
        Ok(marked.rows_affected() == 1)
    }

    /// Link the adapter a job produced.
    pub async fn set_job_adapter(&self, id: i64, adapter_id: i64) -> Result<()> {
        sql::execute(
            self.pool(),
            "update training_jobs set adapter_id = ? where id = ?",
            (adapter_id, id),
        )
        .await?;
        Ok(())
    }

    pub async fn add_training_event(&self, job_id: i64, e: &NewTrainingEvent<'_>) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sql::execute(
            &mut *tx,
            "insert into training_events (job_id, kind, step, loss, eval_loss, learning_rate, tokens_per_sec, message)
             values (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                e.kind,
                e.step,
                e.loss,
                e.eval_loss,
                e.learning_rate,
                e.tokens_per_sec,
                e.message,
            ),
        )
        .await?;
        if let Some(step) = e.step {
            sql::execute(
                &mut *tx,
                "update training_jobs set step = max(step, ?) where id = ?",
                (step, job_id),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Jobs newest first, `limit` of them, older than the job `before` when given.
    pub async fn list_jobs(&self, before: Option<i64>, limit: i64) -> Result<Vec<TrainingJob>> {
        sql::all(
            self.pool(),
            &format!(
                "select {JOB_COLUMNS} from training_jobs where id < ? order by id desc limit ?"
            ),
            (before.unwrap_or(i64::MAX), limit),
        )
        .await
    }

    /// How many jobs are queued and how many run.
    pub async fn active_job_counts(&self) -> Result<(i64, i64)> {
        let counts: Vec<(String, i64)> = sql::all(
            self.pool(),
            "select state, count(*) from training_jobs where state in ('queued', 'running') group by state",
            (),
        )
        .await?;
        let count = |s: &str| counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        Ok((count("queued"), count("running")))
    }

    /// Drop a job's step and eval events after `step`: a run that starts again from the
    /// checkpoint of `step` (or from 0) writes them again, and a kill between checkpoints
    /// left the first run's copies (its chart and events showed those steps twice).
    pub async fn drop_training_events_after(&self, job_id: i64, step: i64) -> Result<u64> {
        Ok(sql::execute(
            self.pool(),
            "delete from training_events where job_id = ? and kind in ('step', 'eval') and step > ?",
            (job_id, step),
        )
        .await?
        .rows_affected())
    }

    /// The running jobs' last two step events, newest first: (created_at, tokens/s).
    pub async fn last_running_steps(&self) -> Result<Vec<(String, Option<f64>)>> {
        sql::all(
            self.pool(),
            "select e.created_at, e.tokens_per_sec from training_events e join training_jobs j on j.id = e.job_id
             where j.state = 'running' and e.kind = 'step' order by e.id desc limit 2",
            (),
        )
        .await
    }

    /// Events of a job older than `before_id`, newest first, `limit` of them (OpenAI's order).
    pub async fn training_events_newest_first(
        &self,
        job_id: i64,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TrainingEvent>> {
        sql::all(
            self.pool(),
            "select id, job_id, kind, step, loss, eval_loss, learning_rate, tokens_per_sec, message, created_at
             from training_events where job_id = ? and id < ? order by id desc limit ?",
            (job_id, before_id.unwrap_or(i64::MAX), limit),
        )
        .await
    }

    /// A job's last event of `kind` (`step`, `eval`).
    pub async fn last_training_event(
        &self,
        job_id: i64,
        kind: &str,
    ) -> Result<Option<TrainingEvent>> {
        sql::optional(
            self.pool(),
            "select id, job_id, kind, step, loss, eval_loss, learning_rate, tokens_per_sec, message, created_at
             from training_events where job_id = ? and kind = ? order by id desc limit 1",
            (job_id, kind),
        )
        .await
    }

    pub async fn training_events(&self, job_id: i64, after_id: i64) -> Result<Vec<TrainingEvent>> {
        sql::all(
            self.pool(),
            "select id, job_id, kind, step, loss, eval_loss, learning_rate, tokens_per_sec, message, created_at
             from training_events where job_id = ? and id > ? order by id",
            (job_id, after_id),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatExample, ChatMessage, Role};
    use crate::storage::NewDataset;
    use sqlx::SqlitePool;

    async fn dataset(db: &Db) -> i64 {
        let ex = vec![ChatExample {
            messages: vec![
                ChatMessage::new(Role::User, "q"),
                ChatMessage::new(Role::Assistant, "a"),
            ],
        }];
        db.insert_dataset(&NewDataset {
            assistant_id: None,
            name: "d",
            format: "openai",
            source: "t",
            content_hash: "h",
            examples: &ex,
            ..Default::default()
        })
        .await
        .unwrap()
        .dataset()
        .id
    }

    /// A LoRA job on a one-example dataset, as created (`validating_files`).
    async fn new_job(db: &Db, hp: &serde_json::Value) -> TrainingJob {
        let ds = dataset(db).await;
        db.create_job(&NewJob {
            dataset_id: ds,
            assistant_id: None,
            base_model: "m",
            method: "lora",
            hyperparameters: hp,
        })
        .await
        .unwrap()
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn file_validation_never_takes_a_job_created_on_a_dataset(pool: SqlitePool) {
        // Seen in the web tests: serve's start-up validation listed a dataset job in the
        // moment between its insert and its move to `queued`, and failed it for having
        // no training file.
        let db = Db::from_pool(pool);
        let job = new_job(&db, &serde_json::json!({})).await;
        assert_eq!(job.state(), JobState::ValidatingFiles);
        assert!(db.jobs_validating_files().await.unwrap().is_empty());
        assert!(
            !db.job_file_refused(job.id, "training_file", "no file")
                .await
                .unwrap()
        );
        assert_eq!(
            db.job(job.id).await.unwrap().state(),
            JobState::ValidatingFiles
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_job_succeeds_with_its_results_file_only_while_running(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let job = new_job(&db, &serde_json::json!({})).await;
        // Not running (a new job validates first): nothing is written.
        assert!(!db.succeed_job(job.id, "r.csv", b"step\n").await.unwrap());
        assert!(
            db.list_files(None, None, 10, true)
                .await
                .unwrap()
                .is_empty()
        );
        db.transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
            .await
            .unwrap();
        db.claim_next_job(20).await.unwrap().unwrap();
        assert!(db.succeed_job(job.id, "r.csv", b"step\n1\n").await.unwrap());
        let done = db.job(job.id).await.unwrap();
        assert_eq!(done.state(), JobState::Succeeded);
        assert!(done.finished_at.is_some());
        let file = db.file(done.result_file_id.unwrap()).await.unwrap();
        assert_eq!(
            (file.purpose.as_str(), file.bytes),
            ("fine-tune-results", 7)
        );
        assert_eq!(db.file_content(file.id).await.unwrap(), b"step\n1\n");
    }

    /// A running job (claimed from the queue).
    async fn running_job(db: &Db) -> i64 {
        let job = new_job(db, &serde_json::json!({})).await;
        db.transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
            .await
            .unwrap();
        db.claim_next_job(20).await.unwrap().unwrap().id
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_cancel_and_the_start_of_publishing_exclude_each_other(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        // The cancel first: the worker may not publish.
        let id = running_job(&db).await;
        assert!(db.request_cancel(id).await.unwrap());
        assert!(!db.begin_publishing(id).await.unwrap());
        assert!(db.job(id).await.unwrap().cancel_requested);
        db.transition_job(id, JobState::Running, JobState::Cancelled, None)
            .await
            .unwrap();
        // Publishing first: the cancel is refused and not recorded.
        let id = running_job(&db).await;
        assert!(db.begin_publishing(id).await.unwrap());
        assert!(!db.request_cancel(id).await.unwrap());
        let job = db.job(id).await.unwrap();
        assert!(!job.cancel_requested);
        assert_eq!(job.state(), JobState::Running);
        // A job sent back to the queue publishes again later: until then a cancel holds.
        assert!(db.return_job_to_queue(id).await.unwrap());
        assert!(db.request_cancel(id).await.unwrap());
        assert_eq!(db.job(id).await.unwrap().state(), JobState::Cancelled);
        // No such job is an error, not a refusal.
        assert!(db.request_cancel(424242).await.is_err());
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_job_moves_through_its_states_and_is_claimed_once(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let hp = serde_json::json!({"learning_rate": 5e-5});
        let job = new_job(&db, &hp).await;
        assert_eq!(job.state(), JobState::ValidatingFiles);
        assert!(
            db.claim_next_job(20).await.unwrap().is_none(),
            "not queued yet"
        );
        assert!(
            db.transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
                .await
                .unwrap()
        );
        let claimed = db.claim_next_job(20).await.unwrap().unwrap();
        assert_eq!((claimed.id, claimed.state()), (job.id, JobState::Running));
        assert!(claimed.started_at.is_some());
        assert!(
            db.claim_next_job(20).await.unwrap().is_none(),
            "claimed once"
        );
        assert!(
            !db.transition_job(job.id, JobState::Queued, JobState::Cancelled, None)
                .await
                .unwrap()
        );
        assert!(
            db.transition_job(
                job.id,
                JobState::Running,
                JobState::Failed,
                Some("out of memory")
            )
            .await
            .unwrap()
        );
        let done = db.job(job.id).await.unwrap();
        assert_eq!(done.error.as_deref(), Some("out of memory"));
        assert!(done.finished_at.is_some());
        // A dataset used by a job cannot be deleted from under it, and the error says so
        // (SQLite reports the failed cascade as a trigger's constraint, code 1811).
        let refused = db.delete_dataset("d", None).await.unwrap_err();
        assert!(
            refused.to_string().contains("a training job uses it"),
            "{refused}"
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn events_are_stored_in_order_and_advance_the_step(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let ds = dataset(&db).await;
        let hp = serde_json::json!({});
        let job = db
            .create_job(&NewJob {
                dataset_id: ds,
                assistant_id: None,
                base_model: "m",
                method: "lora",
                hyperparameters: &hp,
            })
            .await
            .unwrap();
        for step in 1..=3 {
            db.add_training_event(
                job.id,
                &NewTrainingEvent {
                    kind: "step",
                    step: Some(step),
                    loss: Some(2.0 / step as f64),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        let events = db.training_events(job.id, 0).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.step).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
        assert_eq!(
            db.training_events(job.id, events[1].id)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(db.job(job.id).await.unwrap().step, 3);
    }
}
