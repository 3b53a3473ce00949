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

/// The routes that take files: a dataset, an adapter or an OpenAI file upload.
fn is_upload(method: &Method, path: &str) -> bool {
    method == Method::POST
        && matches!(
            path,
            "/api/v1/datasets" | "/datasets/import" | "/adapters/upload" | "/v1/files"
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
        return if is_upload(req.method(), req.uri().path()) {
            ApiError::too_large(limit)
        } else {
            ApiError::body_too_large(Some(limit))
        }
        .into_response();
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, limit as usize)));
    next.run(req).await
}

/// The client's address: the TCP peer, or, when the peer is one of `trusted` proxies,
/// the nearest address in `X-Forwarded-For` that is not a trusted proxy (the entries
/// before it could be written by the client).
pub fn client_ip(
    req_extensions: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    trusted: &[IpAddr],
) -> IpAddr {
    let peer = req_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(peer: &str, forwarded: Option<&str>, trusted: &[&str]) -> IpAddr {
        let mut ext = axum::http::Extensions::new();
        ext.insert(ConnectInfo(SocketAddr::new(peer.parse().unwrap(), 1234)));
        let mut headers = axum::http::HeaderMap::new();
        if let Some(f) = forwarded {
            headers.insert("x-forwarded-for", f.parse().unwrap());
        }
        let trusted: Vec<IpAddr> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_ip(&ext, &headers, &trusted)
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_it() {
        // No proxy trusted: the header is the client's to forge, and ignored.
        assert_eq!(
            from("203.0.113.9", Some("1.2.3.4"), &[]).to_string(),
            "203.0.113.9"
        );
        // Through a trusted proxy: the address it appended.
        assert_eq!(
            from("10.0.0.2", Some("1.2.3.4, 198.51.100.7"), &["10.0.0.2"]).to_string(),
            "198.51.100.7"
        );
        // Two trusted hops: the nearest untrusted one.
        assert_eq!(
            from(
                "10.0.0.2",
                Some("198.51.100.7, 10.0.0.3"),
                &["10.0.0.2", "10.0.0.3"]
            )
            .to_string(),
            "198.51.100.7"
        );
        // A trusted proxy that sent no header: the proxy itself.
        assert_eq!(
            from("10.0.0.2", None, &["10.0.0.2"]).to_string(),
            "10.0.0.2"
        );
    }
}
