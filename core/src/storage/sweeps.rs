//! Hyperparameter sweeps: their trials are ordinary jobs carrying the sweep's id.

use super::jobs::JOB_COLUMNS;
use super::{Db, Result, TrainingJob, sql};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Sweep {
    pub id: i64,
    pub name: String,
    pub spec: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub best_job_id: Option<i64>,
    pub decision: Option<String>,
}

const SWEEP_COLUMNS: &str = "id, name, spec, created_at, finished_at, best_job_id, decision";

impl Db {
    pub async fn create_sweep(&self, name: &str, spec: &serde_json::Value) -> Result<Sweep> {
        sql::one(
            self.pool(),
            &format!("insert into sweeps (name, spec) values (?, ?) returning {SWEEP_COLUMNS}"),
            (name, spec.to_string()),
        )
        .await
    }

    pub async fn sweep(&self, id: i64) -> Result<Sweep> {
        self.row_by_id("sweeps", SWEEP_COLUMNS, id, "sweep ").await
    }

    /// Sweeps newest first.
    pub async fn list_sweeps(&self, limit: i64) -> Result<Vec<Sweep>> {
        sql::all(
            self.pool(),
            &format!("select {SWEEP_COLUMNS} from sweeps order by id desc limit ?"),
            (limit,),
        )
        .await
    }

    /// Make job `job_id` a trial of `sweep_id` (before it is queued).
    pub async fn set_job_sweep(&self, job_id: i64, sweep_id: i64) -> Result<()> {
        sql::execute(
            self.pool(),
            "update training_jobs set sweep_id = ? where id = ?",
            (sweep_id, job_id),
        )
        .await?;
        Ok(())
    }

    /// A sweep's trials, in the order they were created.
    pub async fn sweep_jobs(&self, sweep_id: i64) -> Result<Vec<TrainingJob>> {
        sql::all(
            self.pool(),
            &format!("select {JOB_COLUMNS} from training_jobs where sweep_id = ? order by id"),
            (sweep_id,),
        )
        .await
    }

    /// Close a sweep with its best trial; false when it was closed already (another
    /// worker finished it first).
    pub async fn finish_sweep(
        &self,
        id: i64,
        best_job_id: Option<i64>,
        decision: &str,
    ) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            "update sweeps set finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                best_job_id = ?, decision = ? where id = ? and finished_at is null",
            (best_job_id, decision, id),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Open sweeps with trials, every one of which has ended.
    pub async fn sweeps_ended_unranked(&self) -> Result<Vec<i64>> {
        let ids: Vec<(i64,)> = sql::all(
            self.pool(),
            "select s.id from sweeps s where s.finished_at is null
               and exists (select 1 from training_jobs j where j.sweep_id = s.id)
               and not exists (select 1 from training_jobs j where j.sweep_id = s.id
                               and j.state not in ('succeeded', 'failed', 'cancelled'))",
            (),
        )
        .await?;
        Ok(ids.into_iter().map(|r| r.0).collect())
    }

    /// What became of a finished sweep's best adapter.
    pub async fn set_sweep_decision(&self, id: i64, decision: &str) -> Result<()> {
        sql::execute(
            self.pool(),
            "update sweeps set decision = ? where id = ?",
            (decision, id),
        )
        .await?;
        Ok(())
    }
}
