//! The console's model pages: training jobs (`jobs`), adapters (`adapters`), assistants
//! (`assistants`) and the playground (`playground`), plus the vendored uPlot chart library they use.

mod adapters;
mod assistants;
mod audit;
mod canary;
mod classifiers;
mod jobs;
mod playground;
mod report_card;
mod sweeps;

use crate::auth::AdminSession;
use crate::console::error_page;
use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const UPLOT_JS: &str = include_str!("../../../assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../../assets/uPlot.min.css");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| async { asset(UPLOT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| async { asset(UPLOT_CSS, "text/css; charset=utf-8") }),
        )
        .merge(jobs::routes())
        .merge(adapters::routes())
        .merge(assistants::routes())
        .merge(playground::routes())
        .merge(audit::routes())
        .merge(sweeps::routes())
        .merge(classifiers::routes())
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// An error as a console page with its status (a 500 shows no internal detail).
fn fail(session: &AdminSession, e: &ApiError) -> Response {
    error_page(session, e.status, &e.message)
}

/// The assistant a console page or action is about: `?assistant=NAME`, else the default
/// one; an error page when no assistant has that name.
pub(super) struct ChosenAssistant(pub loraloop_core::storage::Assistant);

impl axum::extract::FromRequestParts<AppState> for ChosenAssistant {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        let session = AdminSession::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let pairs = crate::auth::url_decode_pairs(parts.uri.query().unwrap_or(""));
        let name = field(&pairs, "assistant");
        crate::assistant_api::assistant_named(state, Some(name), "assistant")
            .await
            .map(Self)
            .map_err(|e| fail(&session, &e))
    }
}

/// The id in a page's path; a 404 page when the path holds none.
pub(super) struct PageId(pub i64);

impl axum::extract::FromRequestParts<AppState> for PageId {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        if let Ok(axum::extract::Path(id)) =
            axum::extract::Path::<i64>::from_request_parts(parts, state).await
        {
            return Ok(Self(id));
        }
        // The session only to draw the error page (the handler extracts its own).
        let session = AdminSession::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Err(fail(
            &session,
            &ApiError::not_found("there is nothing at this address"),
        ))
    }
}

use crate::console::short_time;

/// Seconds as `2 h 5 min`, `3 min 20 s` or `12 s`.
fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "unknown".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A number in a short, readable form (losses, learning rates).
fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() < 1e-3 || x.abs() >= 1e5 {
        format!("{x:.2e}")
    } else {
        format!("{:.4}", x)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// The form's value of `key` (the first), or "".
fn field<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_numbers_read_well() {
        assert_eq!(duration(12.4), "12 s");
        assert_eq!(duration(200.0), "3 min 20 s");
        assert_eq!(duration(7500.0), "2 h 5 min");
        assert_eq!(duration(f64::NAN), "unknown");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(0.0002), "2.00e-4");
        assert_eq!(num(1.23456), "1.2346");
        assert_eq!(short_time("2026-11-22T10:31:05.123Z"), "2026-11-22 10:31");
    }
}
