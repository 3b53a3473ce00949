//! The lease a worker holds on the job it runs: claimed for `LEASE_SECS`, renewed every
//! `RENEW_EVERY` while the job runs. A job whose lease ran out was left by a worker that
//! died; it goes back to the queue, or fails after `MAX_ATTEMPTS` claims so a job that
//! crashes the process is not retried forever. Chat-model and classifier jobs alike.

use loraloop_core::storage::{Db, Recovered, StorageError};
use std::future::Future;
use std::time::Duration;

/// How long a claim holds a job without a renewal.
pub const LEASE_SECS: i64 = 20;
/// How often a running job's lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(4);
/// Claims of one job that may end without a clean stop before it fails.
pub const MAX_ATTEMPTS: i64 = 3;
/// What a job's events say when it failed after `MAX_ATTEMPTS` claims.
const GAVE_UP: &str =
    "the process stopped while running this job too many times; not started again";

/// What a job's events say when its worker died after a cancel was accepted.
const CANCELLED: &str = "cancelled as requested (the worker running this job had stopped)";

/// The line each recovered job's events get: `requeued_text` for the jobs back in the
/// queue, the same lines for every kind of job for the ones failed or cancelled.
pub fn recovery_lines(r: Recovered, requeued_text: &str) -> impl Iterator<Item = (i64, &str)> {
    let requeued = r.requeued.into_iter().map(move |id| (id, requeued_text));
    let failed = r.failed.into_iter().map(|id| (id, GAVE_UP));
    requeued
        .chain(failed)
        .chain(r.cancelled.into_iter().map(|id| (id, CANCELLED)))
}

/// Run `work` while its job's lease is renewed in the background, `every` so often (the
/// workers: [`RENEW_EVERY`]), until `renew` (given the database) answers false (the job is
/// no longer running). The renewal stops with `work`, also when `work` is dropped before
/// it ends (a worker cancelled mid-job, or a panic unwinding through it): a lease must not
/// outlive the work it stands for.
pub async fn while_renewed<F, Fut, T>(
    every: Duration,
    db: &Db,
    job: String,
    renew: F,
    work: impl Future<Output = T>,
) -> T
where
    F: Fn(Db) -> Fut + Send + 'static,
    Fut: Future<Output = Result<bool, StorageError>> + Send,
{
    let db = db.clone();
    let _renewing = AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match renew(db.clone()).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => tracing::warn!("{job}: cannot renew its lease: {e}"),
            }
        }
    }));
    work.await
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    type Renewal = std::future::Ready<Result<bool, StorageError>>;

    /// A renewal that only counts itself.
    fn counting(n: &Arc<AtomicUsize>) -> impl Fn(Db) -> Renewal + Send + 'static {
        let n = n.clone();
        move |_| {
            n.fetch_add(1, SeqCst);
            std::future::ready(Ok(true))
        }
    }

    #[tokio::test]
    async fn a_lease_is_renewed_while_its_work_runs_and_not_once_it_ended_or_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let every = Duration::from_millis(20);
        let settle = || tokio::time::sleep(Duration::from_millis(150));

        let ended = Arc::new(AtomicUsize::new(0));
        let work = tokio::time::sleep(Duration::from_millis(200));
        while_renewed(every, &db, "job 1".into(), counting(&ended), work).await;
        let at_end = ended.load(SeqCst);
        assert!(at_end >= 2, "renewed {at_end} times in 200 ms of work");
        settle().await;
        assert_eq!(ended.load(SeqCst), at_end, "renewed after the work ended");

        // A worker cancelled mid-job drops its work: the renewals stop with it.
        let dropped = Arc::new(AtomicUsize::new(0));
        let forever = std::future::pending::<()>();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(200),
            while_renewed(every, &db, "job 2".into(), counting(&dropped), forever),
        )
        .await;
        assert!(cancelled.is_err());
        let at_drop = dropped.load(SeqCst);
        assert!(at_drop >= 2, "renewed {at_drop} times before the drop");
        settle().await;
        assert_eq!(
            dropped.load(SeqCst),
            at_drop,
            "renewed after the work was dropped"
        );
    }
}
