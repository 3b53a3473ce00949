//! How much a request may cost before anyone is known: a body limit per kind of route
//! (uploads get `server.max_upload_mb`, a login a few kilobytes, everything else a
//! megabyte), and failed logins throttled per client address with the password hashing
//! done one at a time.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A JSON request, a console form, a webhook update.
pub const BODY_LIMIT: u64 = 1024 * 1024;
/// The login form: a user name and a password.
pub const LOGIN_BODY_LIMIT: u64 = 16 * 1024;

/// The routes that take files: a dataset or an adapter upload.
fn is_upload(method: &Method, path: &str) -> bool {
    method == Method::POST
        && matches!(
            path,
            "/api/v1/datasets" | "/datasets/import" | "/adapters/upload"
        )
}

/// The limit for a request, by what its route takes.
pub fn body_limit_for(state: &AppState, method: &Method, path: &str) -> u64 {
    if is_upload(method, path) {
        state.max_upload_bytes
    } else if path == "/login" {
        LOGIN_BODY_LIMIT
    } else {
        BODY_LIMIT
    }
}

/// Refuse a declared length over the route's limit before reading anything, and cut a
/// body that grows past it (the extractors answer 413).
pub async fn limit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = body_limit_for(&state, req.method(), req.uri().path());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return ApiError::too_large(limit).into_response();
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, limit as usize)));
    next.run(req).await
}

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

/// The client's address: the TCP peer (a proxy in front makes all clients one).
pub fn client_ip(req_extensions: &axum::http::Extensions) -> IpAddr {
    req_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
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
