//! Retrying a platform call: transient failures (rate limits, 5xx, network) are tried again
//! with exponential backoff, up to [`ATTEMPTS`] calls; a permanent one returns at once.

use std::fmt::Display;
use std::future::IntoFuture;
use std::time::Duration;

/// Calls made before a transient failure is given up on.
pub const ATTEMPTS: u32 = 8;

/// How a failed call is to be tried again (None from the classifier: not at all).
pub enum Wait {
    /// After exactly this long (the platform said when), without growing the backoff.
    Exactly(Duration),
    /// After the current backoff delay, at least this long; the delay doubles (to 8 s).
    Backoff { at_least: Duration },
}

/// `call` until it succeeds, `classify` says a failure is permanent, or [`ATTEMPTS`] calls
/// failed. `platform` and `what` name the call in the debug log.
pub async fn retry<T, E, F, Fut>(
    platform: &str,
    what: &str,
    mut call: F,
    classify: impl Fn(&E) -> Option<Wait>,
) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: IntoFuture<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let e = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let wait = match classify(&e) {
            Some(w) if attempt < ATTEMPTS => w,
            _ => return Err(e),
        };
        let pause = match wait {
            Wait::Exactly(d) => d,
            Wait::Backoff { at_least } => {
                let d = delay.max(at_least);
                delay = (delay * 2).min(Duration::from_secs(8));
                d
            }
        };
        tracing::debug!("{platform} {what}: {e}; retrying in {pause:?}");
        tokio::time::sleep(pause).await;
    }
}
