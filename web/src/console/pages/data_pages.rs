//! The console's data pages: conversations (search, read, rate, correct, exclude from
//! training, delete) and datasets (list, import, build from conversations, preview,
//! export, delete).
//!
//! Forms post URL-encoded bodies (the import form: multipart, with the CSRF token in the
//! query); a change that worked redirects back to a page (POST/redirect/GET) with a
//! fixed notice, one that did not renders the page again with the error and its status.

mod conversations;
mod datasets;
mod preference_preview;

use crate::auth::{self, AdminSession};
use crate::console::{QueryPairs, error_page};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{get, post};
use loraloop_core::storage::StorageError;
use maud::{Markup, html};
use std::convert::Infallible;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/conversations", get(conversations::list))
        .route("/conversations/{id}", get(conversations::show))
        .route(
            "/conversations/{id}/exclude",
            post(conversations::toggle_excluded),
        )
        .route("/conversations/{id}/delete", post(conversations::delete))
        .route("/messages/{id}/rate", post(conversations::rate))
        .route("/messages/{id}/correct", post(conversations::correct))
        .route("/datasets", get(datasets::list))
        .route("/datasets/import", post(datasets::import))
        .route("/datasets/build", post(datasets::build))
        .route("/datasets/{id}", get(datasets::preview))
        .route("/datasets/{id}/export", get(datasets::export))
        .route("/datasets/{id}/delete", post(datasets::delete))
}

/// Decoded `key=value` pairs of a query string or a URL-encoded form body.
#[derive(Debug, Clone, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(s: &str) -> Self {
        Self(auth::url_decode_pairs(s))
    }

    /// The trimmed value of `key`; `None` when absent or blank.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The value of `key` as given (not trimmed), `""` when absent.
    fn raw(&self, key: &str) -> &str {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    /// A ticked checkbox.
    fn checked(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v != "0" && v != "off")
    }
}

/// As a handler argument: the query string's pairs.
impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        let QueryPairs(pairs) = QueryPairs::from_request_parts(parts, state).await?;
        Ok(Self(pairs))
    }
}

/// A path id; `None` unless a positive integer.
fn parse_id(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|id| *id > 0)
}

/// A `YYYY-MM-DD` form field.
fn parse_date(params: &Params, key: &str) -> Result<Option<chrono::NaiveDate>, String> {
    params
        .get(key)
        .map(|v| {
            chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map_err(|_| format!("{key}: {v:?} is not a date (use YYYY-MM-DD)"))
        })
        .transpose()
}

use crate::console::short_time;

/// Percent-encoding of a query-string value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The message a redirect's `?ok=` code stands for (fixed texts: nothing from the URL is
/// echoed into the page).
fn notice(params: &Params) -> Option<&'static str> {
    Some(match params.get("ok")? {
        "rated" => "Rating saved.",
        "corrected" => "Correction saved.",
        "correction-cleared" => "Correction removed.",
        "excluded" => "The conversation is now excluded from training.",
        "included" => "The conversation is now included in training.",
        "deleted" => "The conversation was deleted.",
        "built" => "Dataset built from the conversations.",
        "unchanged" => {
            "The conversations give exactly the examples of this existing version: nothing new was stored."
        }
        "dataset-deleted" => "The dataset version was deleted.",
        _ => return None,
    })
}

fn notice_block(params: &Params) -> Markup {
    html! { @if let Some(n) = notice(params) { p.ok.notice role="status" { (n) } } }
}

/// A storage error as the status and message a page shows.
fn storage_failure(e: StorageError) -> (StatusCode, String) {
    let e = ApiError::from(e);
    (e.status, e.message)
}

/// A page for a storage error that leaves nothing to show.
fn storage_error_page(session: &AdminSession, e: StorageError) -> Response {
    let (status, message) = storage_failure(e);
    error_page(session, status, &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_trim_and_find_the_last_value() {
        let p = Params::parse("a=1&b=+x+&a=2&c=&box=on&no=0");
        assert_eq!(p.get("a"), Some("2"));
        assert_eq!(p.get("b"), Some("x"));
        assert_eq!(p.raw("b"), " x ");
        assert_eq!(p.get("c"), None);
        assert!(p.checked("box"));
        assert!(!p.checked("no"));
        assert!(!p.checked("missing"));
    }

    #[test]
    fn ids_dates_and_times() {
        assert_eq!(parse_id("12"), Some(12));
        assert_eq!(parse_id("-1"), None);
        assert_eq!(parse_id("1x"), None);
        let p = Params::parse("from=2026-02-30&to=2026-03-01");
        assert!(parse_date(&p, "from").unwrap_err().contains("YYYY-MM-DD"));
        assert_eq!(
            parse_date(&p, "to").unwrap(),
            chrono::NaiveDate::from_ymd_opt(2026, 3, 1)
        );
        assert_eq!(short_time("2026-11-22T10:31:05.123Z"), "2026-11-22 10:31");
        assert_eq!(encode("a b&c=ü"), "a%20b%26c%3D%C3%BC");
    }
}
