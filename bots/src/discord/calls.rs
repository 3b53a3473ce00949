//! Discord REST calls: retries with backoff on transient errors, and nonces.

use crate::backoff::{self, Wait};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Retry a Discord call on transient errors (429, 5xx, network) with backoff; a permanent
/// error (missing permission, unknown channel, bad request) returns at once. (With a proxy
/// serenity's own rate limiter is off, so a 429 reaches this; serenity does not hand over
/// the answer's `retry_after` or `Retry-After`, so a 429 waits at least a second.)
pub async fn retry<T, F, Fut>(what: &str, call: F) -> serenity::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = serenity::Result<T>>,
{
    backoff::retry("discord", what, call, |e| {
        transient(e).then(|| Wait::Backoff {
            at_least: if status(e) == Some(429) {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            },
        })
    })
    .await
}

pub(super) fn status(e: &serenity::Error) -> Option<u16> {
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            Some(r.status_code.as_u16())
        }
        _ => None,
    }
}

/// Discord's JSON error code of a refused request.
pub(super) fn error_code(e: &serenity::Error) -> Option<isize> {
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            Some(r.error.code)
        }
        _ => None,
    }
}

pub(super) fn transient(e: &serenity::Error) -> bool {
    use serenity::http::HttpError;
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
            r.status_code.as_u16() == 429 || r.status_code.is_server_error()
        }
        serenity::Error::Http(HttpError::Request(_)) | serenity::Error::Io(_) => true,
        _ => false,
    }
}

/// The nonce of a reply's message: part 0 is the message recorded as the reply (its first
/// words, a place-in-line notice or a failure notice), 1.. the further parts of a long one.
/// The same in a process started after a crash: a send that Discord took just before the
/// crash, unrecorded, returns that message again instead of a copy (within Discord's few
/// minutes for nonces).
pub(super) fn reply_nonce(update_key: &str, part: usize) -> String {
    match update_key.parse::<u64>() {
        Ok(id) => format!("r{id:x}.{part:x}"),
        Err(_) => new_nonce(),
    }
}

/// A nonce for one message to send (Discord allows 25 characters): with `enforce_nonce`
/// a retried send that Discord had already taken returns that message instead of a copy.
pub(super) fn new_nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    format!(
        "ll{now:x}{:x}",
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}
