//! Training that gives way to chat in the same process: before each layer of its forward
//! and backward passes, a job pauses while the inference engine has replies to make, so
//! the cores go to the people waiting within one layer's time. It never pauses longer
//! than [`MAX_PAUSE`] in a row (then one layer runs), so a busy server slows training
//! down but cannot stop it.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The longest a job waits for chat in one go.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// How often a paused job looks again.
const POLL: Duration = Duration::from_millis(5);

/// Whether chat has work now (the engine's `busy`).
#[derive(Clone)]
pub struct YieldTo(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for YieldTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("YieldTo(..)")
    }
}

impl YieldTo {
    /// Wait while chat is busy (at most [`MAX_PAUSE`], and not past `stop()`); the time
    /// waited.
    pub fn wait(&self, stop: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        while (self.0)() && !stop() && start.elapsed() < MAX_PAUSE {
            std::thread::sleep(POLL);
        }
        start.elapsed()
    }
}

/// A job's waits inside one optimizer step (before each layer of its passes), and their
/// total.
pub struct Waiter<'a> {
    to: Option<&'a YieldTo>,
    cancel: &'a AtomicBool,
    paused: Cell<Duration>,
}

impl<'a> Waiter<'a> {
    pub fn new(to: Option<&'a YieldTo>, cancel: &'a AtomicBool) -> Self {
        Self {
            to,
            cancel,
            paused: Cell::new(Duration::ZERO),
        }
    }

    /// Wait while chat is busy (see [`YieldTo::wait`]).
    pub fn wait(&self) {
        if let Some(y) = self.to {
            let waited = y.wait(|| self.cancel.load(Ordering::SeqCst));
            self.paused.set(self.paused.get() + waited);
        }
    }

    /// The time waited so far.
    pub fn paused(&self) -> Duration {
        self.paused.get()
    }
}

/// What a job says about the time it gave way to chat: at the first second paused, then
/// every further 30 s of pauses.
#[derive(Debug, Default)]
pub struct PauseReport {
    told: f64,
}

impl PauseReport {
    /// The message to log now, if one is due, for `paused` in a run `elapsed` long.
    pub fn due(&mut self, paused: Duration, elapsed: Duration) -> Option<String> {
        let paused = paused.as_secs_f64();
        let next = self.told + if self.told == 0.0 { 1.0 } else { 30.0 };
        (paused >= next).then(|| {
            self.told = paused;
            format!(
                "training gives way to chat: paused {paused:.0} s so far while replies were being written ({:.0}% of the time)",
                100.0 * paused / elapsed.as_secs_f64().max(1e-9)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_job_waits_while_chat_is_busy_and_goes_on_when_it_is_not() {
        let busy = Arc::new(AtomicBool::new(true));
        let y = {
            let busy = busy.clone();
            YieldTo(Arc::new(move || busy.load(Ordering::SeqCst)))
        };
        let b = busy.clone();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            b.store(false, Ordering::SeqCst);
        });
        let waited = y.wait(|| false);
        release.join().unwrap();
        assert!(waited >= Duration::from_millis(60), "{waited:?}");
        assert!(waited < MAX_PAUSE);
        // Not busy: no wait at all; busy but stopping (a cancel): no wait either.
        assert!(y.wait(|| false) < Duration::from_millis(5));
        busy.store(true, Ordering::SeqCst);
        assert!(y.wait(|| true) < Duration::from_millis(5));
    }
}
