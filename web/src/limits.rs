//! How much a request may cost before anyone is known: a body limit per kind of route
//! (uploads get `server.max_upload_mb`, a login a few kilobytes, everything else a
//! megabyte), and the client address the login throttle counts by.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};

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

/// The client's address: the TCP peer (a proxy in front makes all clients one).
pub fn client_ip(req_extensions: &axum::http::Extensions) -> IpAddr {
    req_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}
