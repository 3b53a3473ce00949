//! The lease a worker holds on the job it runs: claimed for `LEASE_SECS`, renewed every
//! `RENEW_EVERY` while the job runs. A job whose lease ran out was left by a worker that
//! died; it goes back to the queue, or fails after `MAX_ATTEMPTS` claims so a job that
//! crashes the process is not retried forever. Chat-model and classifier jobs alike.

use loraloop_core::storage::{Db, StorageError};
use std::future::Future;
use std::time::Duration;

/// How long a claim holds a job without a renewal.
pub const LEASE_SECS: i64 = 20;
/// How often a running job's lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(4);
/// Claims of one job that may end without a clean stop before it fails.
pub const MAX_ATTEMPTS: i64 = 3;

/// Renew a lease in the background until `renew` (given the database) answers false (the
/// job is no longer running) or the returned handle is aborted.
pub fn keep_renewed<F, Fut>(db: &Db, job: String, renew: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Db) -> Fut + Send + 'static,
    Fut: Future<Output = Result<bool, StorageError>> + Send,
{
    let db = db.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match renew(db.clone()).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => tracing::warn!("{job}: cannot renew its lease: {e}"),
            }
        }
    })
}
