//! Training that gives way to chat in the same process: before each layer of its forward
//! and backward passes, a job pauses while the inference engine has replies to make, so
//! the cores go to the people waiting within one layer's time. Pauses are paid for with
//! time the job ran: it earns [`CHAT_SHARE`] / (1 - [`CHAT_SHARE`]) seconds of pause per
//! second of training and holds at most [`MAX_PAUSE`]. A burst of chat after a quiet spell
//! gets the cores for up to that long; chat that never stops gets three quarters of the
//! time and the job the rest, so a busy server slows training down but cannot stop it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most pause time a job holds: the longest it waits for chat in one go.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The share of the time chat gets while it has work without a break.
pub const CHAT_SHARE: f64 = 0.75;

/// How often a paused job looks again.
const POLL: Duration = Duration::from_millis(5);

/// Whether chat has work now (the engine's `busy`), and the pause time the job has in hand.
#[derive(Clone)]
pub struct YieldTo {
    busy: Arc<dyn Fn() -> bool + Send + Sync>,
    budget: Arc<Mutex<Budget>>,
}

/// Pause time in hand, in seconds. A wait can overshoot it by a poll; the debt is paid
/// from the next time earned.
struct Budget {
    credit: f64,
    cap: f64,
    /// Seconds of pause earned per second of training.
    earn: f64,
    /// When the last wait ended (the job has trained since).
    since: Instant,
}

impl std::fmt::Debug for YieldTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("YieldTo(..)")
    }
}

impl YieldTo {
    /// Gives way while `busy()`, with [`CHAT_SHARE`] and [`MAX_PAUSE`] (held in full at
    /// the start).
    pub fn new(busy: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        Self::with_budget(busy, CHAT_SHARE, MAX_PAUSE)
    }

    /// Gives way while `busy()`: `chat_share` of the time (below 1) when it is busy
    /// throughout, at most `max_pause` in one go.
    pub fn with_budget(
        busy: Arc<dyn Fn() -> bool + Send + Sync>,
        chat_share: f64,
        max_pause: Duration,
    ) -> Self {
        let cap = max_pause.as_secs_f64();
        Self {
            busy,
            budget: Arc::new(Mutex::new(Budget {
                credit: cap,
                cap,
                earn: chat_share / (1.0 - chat_share),
                since: Instant::now(),
            })),
        }
    }

    /// Wait while chat is busy, as long as the pause time in hand lasts and not past
    /// `stop()`; the time waited.
    pub fn wait(&self, stop: impl Fn() -> bool) -> Duration {
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        b.credit = (b.credit + start.duration_since(b.since).as_secs_f64() * b.earn).min(b.cap);
        while (self.busy)() && !stop() {
            let left = b.credit - start.elapsed().as_secs_f64();
            if left <= 0.0 {
                break;
            }
            std::thread::sleep(POLL.min(Duration::from_secs_f64(left)));
        }
        let waited = start.elapsed();
        b.credit -= waited.as_secs_f64();
        b.since = Instant::now();
        waited
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
            YieldTo::new(Arc::new(move || busy.load(Ordering::SeqCst)))
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

    #[test]
    fn chat_that_never_stops_gets_its_share_and_the_job_the_rest() {
        // Busy throughout: after the pause time held at the start (0.2 s here), the job
        // waits 3 s (0.75 / 0.25) for each second it trained, whatever a sleep overshoots.
        let y = YieldTo::with_budget(Arc::new(|| true), 0.75, Duration::from_millis(200));
        let start = Instant::now();
        let mut paused = Duration::ZERO;
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(20)); // a layer's work
            paused += y.wait(|| false);
        }
        let trained = start.elapsed() - paused;
        let expected = 0.2 + 3.0 * trained.as_secs_f64();
        let got = paused.as_secs_f64();
        assert!(
            (got - expected).abs() < 0.1,
            "paused {got:.3} s for {:.3} s of training, expected {expected:.3} s",
            trained.as_secs_f64()
        );
    }
}
