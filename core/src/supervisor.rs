//! The long-running parts of a process (the bots, the training worker) under a
//! supervisor: an error is logged with its cause, the part restarts after a backoff that
//! grows while it keeps failing, and `/healthz` reads each part's state from [`Health`].
//! Nothing ends silently: a part is `stopped` only when asked to stop.

use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a part is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartState {
    Running,
    /// It failed and waits for its restart.
    Restarting,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartHealth {
    pub state: PartState,
    /// Restarts after a failure since the process started.
    pub restarts: u64,
    /// The last failure, with its cause.
    pub last_error: Option<String>,
    /// Seconds since the state last changed.
    pub for_secs: u64,
    #[serde(skip)]
    since: Instant,
}

/// The state of each supervised part of the process.
#[derive(Debug, Default)]
pub struct Health {
    parts: Mutex<BTreeMap<String, PartHealth>>,
}

impl Health {
    fn set(&self, part: &str, state: PartState, error: Option<String>) {
        let mut parts = self.parts.lock().unwrap();
        let p = parts.entry(part.to_string()).or_insert(PartHealth {
            state,
            restarts: 0,
            last_error: None,
            for_secs: 0,
            since: Instant::now(),
        });
        if state == PartState::Restarting {
            p.restarts += 1;
        }
        if p.state != state {
            p.since = Instant::now();
        }
        p.state = state;
        if error.is_some() {
            p.last_error = error;
        }
    }

    /// Report a part that is not a supervised loop (the active adapter): running, or
    /// failing with this error (logged by the caller). True when the state changed.
    pub fn report(&self, part: &str, outcome: Result<(), String>) -> bool {
        let before = self.parts.lock().unwrap().get(part).map(|p| p.state);
        match outcome {
            Ok(()) => {
                self.set(part, PartState::Running, None);
                before != Some(PartState::Running)
            }
            Err(e) => {
                let changed = before != Some(PartState::Restarting);
                if changed {
                    self.set(part, PartState::Restarting, Some(e));
                }
                changed
            }
        }
    }

    /// Every part, by name.
    pub fn parts(&self) -> BTreeMap<String, PartHealth> {
        let mut parts = self.parts.lock().unwrap().clone();
        for p in parts.values_mut() {
            p.for_secs = p.since.elapsed().as_secs();
        }
        parts
    }

    /// True when no part is failing (stopped parts were asked to stop).
    pub fn ok(&self) -> bool {
        self.parts
            .lock()
            .unwrap()
            .values()
            .all(|p| p.state != PartState::Restarting)
    }
}

/// `first` doubled `n` times, at most `cap`: the wait before a retry.
pub fn doubling(first: Duration, n: u32, cap: Duration) -> Duration {
    first.saturating_mul(1 << n.min(16)).min(cap)
}

/// The wait before restart number `failures` (1-based): 1 s doubling to 60 s.
pub fn backoff(failures: u32) -> Duration {
    doubling(
        Duration::from_secs(1),
        failures.saturating_sub(1),
        Duration::from_secs(60),
    )
}

/// A run this long counts as healthy: the next failure starts the backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(120);

/// Run `part` until it returns `Ok` (it was asked to stop) or `stopping` is set; restart
/// it after each error. `part` is called once per run.
pub async fn supervise<F, Fut, E>(health: &Health, name: &str, stopping: &AtomicBool, mut part: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut failures = 0u32;
    loop {
        health.set(name, PartState::Running, None);
        let started = tokio::time::Instant::now();
        let error = match part().await {
            Ok(()) => break,
            Err(e) => format!("{e:#}"),
        };
        if stopping.load(Ordering::SeqCst) {
            tracing::warn!("{name}: ended with an error while stopping: {error}");
            break;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures += 1;
        let wait = backoff(failures);
        tracing::error!("{name} failed: {error}; restarting in {}s", wait.as_secs());
        health.set(name, PartState::Restarting, Some(error));
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            if stopping.load(Ordering::SeqCst) {
                health.set(name, PartState::Stopped, None);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    health.set(name, PartState::Stopped, None);
    tracing::info!("{name}: stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn the_backoff_doubles_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // A reply's retries (bots' `retry_wait`): 5 s doubling to 5 minutes.
        let five = Duration::from_secs(5);
        let secs: Vec<u64> = (0..9)
            .map(|n| doubling(five, n, Duration::from_secs(300)).as_secs())
            .collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(
            doubling(five, u32::MAX, Duration::from_secs(300)).as_secs(),
            300
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_part_is_restarted_with_its_error_recorded_until_it_stops() {
        let health = Health::default();
        let stopping = AtomicBool::new(false);
        let runs = AtomicU32::new(0);
        supervise(&health, "worker", &stopping, || {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 | 1 => Err(format!("database is locked (run {n})")),
                    _ => Ok(()),
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let parts = health.parts();
        let w = &parts["worker"];
        assert_eq!(w.state, PartState::Stopped);
        assert_eq!(w.restarts, 2);
        assert_eq!(w.last_error.as_deref(), Some("database is locked (run 1)"));
        assert!(health.ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_waiting_to_restart_is_reported_and_a_stop_ends_the_wait() {
        let health = std::sync::Arc::new(Health::default());
        let stopping = std::sync::Arc::new(AtomicBool::new(false));
        let task = {
            let (health, stopping) = (health.clone(), stopping.clone());
            tokio::spawn(async move {
                supervise(&health, "telegram", &stopping, || async {
                    Err::<(), _>("network down")
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!health.ok());
        assert_eq!(health.parts()["telegram"].state, PartState::Restarting);
        stopping.store(true, Ordering::SeqCst);
        task.await.unwrap();
        assert_eq!(health.parts()["telegram"].state, PartState::Stopped);
    }
}
