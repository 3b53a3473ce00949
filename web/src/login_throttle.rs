//! Failed console logins per client address, and one password check at a time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins allowed per client address in [`WINDOW`] before it must wait.
pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_TRACKED: usize = 10_000;

/// Failed logins per client address, and one password check at a time: argon2 costs
/// 19 MiB and tens of milliseconds, and a flood of guesses must not take the cores.
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
    pub hashing: tokio::sync::Semaphore,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LoginThrottle {
    pub fn new() -> Self {
        Self {
            failures: Mutex::default(),
            hashing: tokio::sync::Semaphore::new(1),
        }
    }

    /// How long `ip` must wait before its next attempt (None: it may try now).
    pub fn wait(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut all = self.failures.lock().unwrap();
        let times = all.get_mut(&ip)?;
        times.retain(|t| now.duration_since(*t) < WINDOW);
        if times.len() < MAX_FAILURES {
            return None;
        }
        Some(WINDOW - now.duration_since(times[0]))
    }

    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut all = self.failures.lock().unwrap();
        if all.len() >= MAX_TRACKED && !all.contains_key(&ip) {
            all.retain(|_, t| t.last().is_some_and(|l| now.duration_since(*l) < WINDOW));
            if all.len() >= MAX_TRACKED {
                let oldest = all
                    .iter()
                    .min_by_key(|(_, t)| t.last().copied())
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    all.remove(&k);
                }
            }
        }
        all.entry(ip).or_default().push(now);
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().unwrap().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_waits_after_max_failures_and_a_success_clears_it() {
        let t = LoginThrottle::new();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            t.failed(ip);
        }
        assert!(t.wait(ip).is_none());
        t.failed(ip);
        let w = t.wait(ip).expect("the 5th failure makes it wait");
        assert!(w <= WINDOW && w > WINDOW - Duration::from_secs(5), "{w:?}");
        assert!(t.wait(other).is_none(), "other addresses are not affected");
        t.succeeded(ip);
        assert!(t.wait(ip).is_none());
    }
}
