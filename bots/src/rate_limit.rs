//! A per-user limit of messages per minute, shared by the bots.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A per-user limit of messages per minute that answers a flood with one notice.
pub struct RateLimiter {
    per_minute: u32,
    /// Message times per user in the last minute, and whether the flood notice went out.
    seen: Mutex<HashMap<String, (VecDeque<Instant>, bool)>>,
}

impl RateLimiter {
    /// `per_minute` 0 means no limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `user` may send another message now; on the first refusal in a flood the
    /// second value says to send the notice (later refusals stay silent until the user
    /// is under the limit again).
    pub fn check(&self, user: impl ToString) -> (bool, bool) {
        let limit = self.per_minute as usize;
        let mut map = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (times, notified) = map.entry(user.to_string()).or_default();
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            times.pop_front();
        }
        if limit == 0 || times.len() < limit {
            times.push_back(now);
            *notified = false;
            (true, false)
        } else {
            let first = !*notified;
            *notified = true;
            (false, first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_one_notice_and_other_users_are_not_affected() {
        let r = RateLimiter::new(2);
        assert_eq!(r.check(1), (true, false));
        assert_eq!(r.check(1), (true, false));
        // Third in the minute: refused, with the notice once; then refused silently.
        assert_eq!(r.check(1), (false, true));
        assert_eq!(r.check(1), (false, false));
        assert_eq!(r.check(2), (true, false));
        // 0 means no limit.
        let open = RateLimiter::new(0);
        assert!((0..100).all(|_| open.check(7).0));
    }
}
