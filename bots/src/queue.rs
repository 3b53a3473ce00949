//! The update queue both bots use. A bot stores every update it is going to answer in
//! `inbound_updates` before it is handled; the queue hands the stored ones to one worker
//! per conversation, so a conversation's updates run in order and different
//! conversations in parallel. Each update is handed out once; a worker records how it
//! ended (done, failed with the error, or still pending when the failure was passing) and ends when its conversation has nothing
//! queued. On stop, workers finish the update in hand (within a grace period) and take no
//! other: what is left stays pending in the database for the next start.

use crate::lock;
use crate::streaming::finish_update;
use loraloop_core::storage::{Db, PendingUpdate, Platform};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// What a bot does with one stored update.
pub trait UpdateHandler: Send + Sync + 'static {
    fn handle(&self, update: &PendingUpdate) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Whether a failure was passing (the platform or the network down, a busy
    /// database): the update is tried again later instead of failing.
    fn retryable(&self, error: &anyhow::Error) -> bool;
}

pub struct UpdateQueue<K> {
    platform: Platform,
    db: Db,
    /// One worker per conversation with queued updates.
    workers: Mutex<HashMap<K, mpsc::UnboundedSender<PendingUpdate>>>,
    /// Updates handed to a worker and not finished.
    queued: Mutex<HashSet<String>>,
    /// The workers, waited for on stop.
    tasks: Mutex<JoinSet<()>>,
    /// Set on stop: nothing new is handed out or started.
    stopping: AtomicBool,
}

impl<K: Copy + Eq + Hash + Send + Sync + 'static> UpdateQueue<K> {
    pub fn new(platform: Platform, db: Db) -> Self {
        Self {
            platform,
            db,
            workers: Mutex::new(HashMap::new()),
            queued: Mutex::new(HashSet::new()),
            tasks: Mutex::new(JoinSet::new()),
            stopping: AtomicBool::new(false),
        }
    }

    /// Whether the queue is stopping (nothing more is handed out).
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Claim a pending update for handing out: false when it was handed out already (and
    /// is not finished yet), or the queue is stopping.
    pub fn claim(&self, key: &str) -> bool {
        !self.stopping() && lock(&self.queued).insert(key.to_string())
    }

    /// Hand a claimed update to the worker of conversation `target`, starting one if
    /// none runs.
    pub fn push<H: UpdateHandler>(
        self: &Arc<Self>,
        target: K,
        update: PendingUpdate,
        handler: &Arc<H>,
    ) {
        let mut workers = lock(&self.workers);
        // A worker that has just retired dropped its receiver: start another.
        let update = match workers.get(&target) {
            Some(tx) => match tx.send(update) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => update,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(update);
        workers.insert(target, tx);
        let mut tasks = lock(&self.tasks);
        // Finished workers' entries go.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(self.clone().worker(target, rx, handler.clone()));
    }

    /// Handle one conversation's updates in order; ends when its queue is empty, or on
    /// stop after the update in hand.
    async fn worker<H: UpdateHandler>(
        self: Arc<Self>,
        target: K,
        mut rx: mpsc::UnboundedReceiver<PendingUpdate>,
        handler: Arc<H>,
    ) {
        loop {
            let next = match rx.try_recv() {
                Ok(p) if !self.stopping() => p,
                _ => {
                    // Ended under the lock `push` sends under: nothing is lost.
                    let mut workers = lock(&self.workers);
                    match rx.try_recv() {
                        Ok(p) if !self.stopping() => p,
                        _ => {
                            workers.remove(&target);
                            return;
                        }
                    }
                }
            };
            let key = next.update_key.clone();
            // A reader of the pending updates may have claimed it just before an earlier
            // pass of this worker finished it.
            let status = self
                .db
                .update_status(self.platform, &key)
                .await
                .unwrap_or(None);
            if status.is_none_or(|s| s == "pending") {
                let outcome = handler.handle(&next).await;
                let retry = outcome.as_ref().err().is_some_and(|e| handler.retryable(e));
                finish_update(&self.db, self.platform, &key, &outcome, retry).await;
            }
            lock(&self.queued).remove(&key);
        }
    }

    /// Stop: workers take no further update; wait up to `grace` for the ones in hand,
    /// then cut them off (their updates stay pending and are answered after the next
    /// start).
    pub async fn stop(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "{}: {} repl(ies) still in progress after {grace:?}: cut off (answered after the next start)",
                self.platform.as_str(),
                tasks.len()
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}
