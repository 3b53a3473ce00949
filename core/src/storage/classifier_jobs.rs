//! Classifier fine-tuning jobs and their events.

use super::{Db, Recovered, Result, sql};
use serde::Serialize;

/// What a classifier job put back in the queue resets: it starts over from step 0.
const RESTART: &str = "step = 0, started_at = null, ";

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ClassifierJob {
    pub id: i64,
    pub state: String,
    pub task: String,
    pub base_model: String,
    pub data_path: String,
    pub eval_data_path: Option<String>,
    pub settings: String,
    pub output_dir: String,
    pub best_checkpoint: Option<String>,
    pub best_metric: Option<f64>,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub cancel_requested: bool,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct ClassifierJobEvent {
    pub id: i64,
    pub job_id: i64,
    pub kind: String,
    pub payload: String,
    pub created_at: String,
}

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewClassifierJob<'a> {
    pub task: &'a str,
    pub base_model: &'a str,
    pub data_path: &'a str,
    pub eval_data_path: Option<&'a str>,
    pub settings: &'a serde_json::Value,
    /// Where checkpoints go; `{id}` is replaced by the job's id.
    pub output_dir: &'a str,
}

const COLUMNS: &str = "id, state, task, base_model, data_path, eval_data_path, settings, output_dir, best_checkpoint, best_metric, step, total_steps, cancel_requested, error, created_at, started_at, finished_at";

impl Db {
    pub async fn create_classifier_job(&self, job: &NewClassifierJob<'_>) -> Result<ClassifierJob> {
        let mut tx = self.pool().begin().await?;
        let created: ClassifierJob = sql::one(
            &mut *tx,
            &format!(
                "insert into classifier_jobs (task, base_model, data_path, eval_data_path, settings, output_dir) values (?, ?, ?, ?, ?, '') returning {COLUMNS}"
            ),
            (job.task, job.base_model, job.data_path, job.eval_data_path, job.settings.to_string()),
        )
        .await?;
        let out = job.output_dir.replace("{id}", &created.id.to_string());
        let created: ClassifierJob = sql::one(
            &mut *tx,
            &format!("update classifier_jobs set output_dir = ? where id = ? returning {COLUMNS}"),
            (out, created.id),
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn classifier_job(&self, id: i64) -> Result<ClassifierJob> {
        self.row_by_id("classifier_jobs", COLUMNS, id, "classifier job ")
            .await
    }

    /// Jobs newest first, `limit` of them, older than the job `before` when given.
    pub async fn list_classifier_jobs(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ClassifierJob>> {
        sql::all(
            self.pool(),
            &format!("select {COLUMNS} from classifier_jobs where id < ? order by id desc limit ?"),
            (before.unwrap_or(i64::MAX), limit),
        )
        .await
    }

    /// Take the oldest queued job (it becomes `running`) with a lease of `lease_secs` that
    /// the worker renews while it runs; `None` when none waits.
    pub async fn claim_classifier_job(&self, lease_secs: i64) -> Result<Option<ClassifierJob>> {
        self.claim_oldest("classifier_jobs", COLUMNS, lease_secs)
            .await
    }

    /// Extend a running job's lease; false when the job is no longer running.
    pub async fn renew_classifier_lease(&self, id: i64, lease_secs: i64) -> Result<bool> {
        self.renew_lease("classifier_jobs", id, lease_secs).await
    }

    /// A clean stop (shutdown): back to the queue to start over, the claim not counted.
    pub async fn return_classifier_job_to_queue(&self, id: i64) -> Result<bool> {
        self.return_to_queue("classifier_jobs", RESTART, id).await
    }

    /// Jobs whose worker died (running, lease run out): cancelled when a cancel was
    /// accepted, else back to the queue to start over, or failed after `max_attempts`
    /// claims.
    pub async fn recover_abandoned_classifier_jobs(&self, max_attempts: i64) -> Result<Recovered> {
        self.recover_abandoned("classifier_jobs", RESTART, max_attempts)
            .await
    }

    pub async fn set_classifier_job_progress(&self, id: i64, step: i64, total: i64) -> Result<()> {
        sql::execute(
            self.pool(),
            "update classifier_jobs set step = ?, total_steps = ? where id = ?",
            (step, total, id),
        )
        .await?;
        Ok(())
    }

    pub async fn set_classifier_job_best(
        &self,
        id: i64,
        checkpoint: &str,
        metric: Option<f64>,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update classifier_jobs set best_checkpoint = ?, best_metric = ? where id = ?",
            (checkpoint, metric, id),
        )
        .await?;
        Ok(())
    }

    /// End a running job in `state` (succeeded, failed, cancelled); the state it ended in,
    /// None when it was not running. A success whose cancel was accepted (after its last
    /// step) ends cancelled, as the canceller was told: one statement, so no cancel
    /// lands between the look and the write.
    pub async fn finish_classifier_job(
        &self,
        id: i64,
        state: &str,
        error: Option<&str>,
    ) -> Result<Option<String>> {
        sql::value(
            self.pool(),
            "update classifier_jobs
                set state = case when ?1 = 'succeeded' and cancel_requested then 'cancelled' else ?1 end,
                    error = ?2, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), lease_until = null
              where id = ?3 and state = 'running'
              returning state",
            (state, error, id),
        )
        .await
    }

    /// Cancel: a queued job ends now, a running one is asked to stop. False when it had
    /// already ended.
    pub async fn cancel_classifier_job(&self, id: i64) -> Result<bool> {
        let job = self.classifier_job(id).await?;
        let statement = match job.state.as_str() {
            "queued" => {
                "update classifier_jobs set state = 'cancelled', finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ? and state = 'queued'"
            }
            "running" => {
                "update classifier_jobs set cancel_requested = 1 where id = ? and state = 'running'"
            }
            _ => return Ok(false),
        };
        let changed = sql::execute(self.pool(), statement, (id,))
            .await?
            .rows_affected();
        if changed > 0 && job.state == "queued" {
            // A queued job never reaches the worker, which records the other endings.
            self.add_classifier_event(
                id,
                "state",
                &serde_json::json!({"state": "cancelled", "error": null}),
            )
            .await?;
        }
        Ok(changed > 0)
    }

    pub async fn classifier_cancel_requested(&self, id: i64) -> Result<bool> {
        Ok(
            sqlx::query_scalar("select cancel_requested from classifier_jobs where id = ?")
                .bind(id)
                .fetch_optional(self.pool())
                .await?
                .unwrap_or(false),
        )
    }

    pub async fn add_classifier_event(
        &self,
        job_id: i64,
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "insert into classifier_job_events (job_id, kind, payload) values (?, ?, ?)",
            (job_id, kind, payload.to_string()),
        )
        .await?;
        Ok(())
    }

    /// A job's events in order, after event `after` (0: from the start).
    pub async fn classifier_events(
        &self,
        job_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ClassifierJobEvent>> {
        sql::all(
            self.pool(),
            "select id, job_id, kind, payload, created_at from classifier_job_events where job_id = ? and id > ? order by id limit ?",
            (job_id, after, limit),
        )
        .await
    }
}
