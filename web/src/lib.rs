//! loraloop's web surface: the console, the REST API (`/api/v1`), the OpenAI-compatible
//! endpoint (`/v1`), Prometheus metrics and the Telegram webhook, as one axum router over
//! the core services. Binding and serving it is the binary's job.
//!
//! Routes: `/healthz` is open; `/api/v1/*`, `/v1/*` and `/metrics` need the API key as a
//! bearer token; every console page needs an admin session (and a CSRF token for
//! anything that changes state), except the login page and the static assets.

pub mod adapter_views;
pub mod api;
pub mod assistant_api;
pub mod audit;
pub mod auth;
pub mod build_api;
pub mod canary_views;
pub mod classifier_api;
pub mod console;
pub mod dataset_object;
pub mod dataset_url;
pub mod error;
pub mod export_api;
pub mod fetched;
pub mod files;
pub mod fine_tuning;
pub mod job_files;
pub mod job_model;
pub mod limits;
pub mod login_throttle;
pub mod openai;
pub mod openai_files;
pub mod operations;
pub mod paging;
pub mod path_params;
pub mod state;
pub mod sweep_api;
pub mod telegram_webhook;

pub use state::AppState;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use std::sync::Arc;

/// A bot alone: health check, and the Telegram webhook when one is configured.
pub fn bot_router(state: AppState) -> Router {
    let r = Router::new().route("/healthz", axum::routing::get(healthz));
    with_webhook(r, &state)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::limit_body,
        ))
        .with_state(state)
}

fn with_webhook(r: Router<AppState>, state: &AppState) -> Router<AppState> {
    let path = state
        .core
        .config
        .raw
        .telegram
        .webhook_url
        .as_deref()
        .and_then(|u| reqwest::Url::parse(u).ok())
        .map(|u| u.path().to_string());
    match path {
        Some(p) => r.route(&p, axum::routing::post(telegram_webhook::webhook_route)),
        None => r,
    }
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    let (api, doc) = api::router(&state).split_for_parts();
    let doc = Arc::new(doc);
    let api = api
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let open = Router::new().route("/healthz", axum::routing::get(healthz));
    with_webhook(open, &state)
        .merge(api)
        .merge(console::router(state.clone()))
        .fallback(|| async {
            error::ApiError::not_found("there is no page or endpoint at this address")
        })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this address does not take this method (its Allow header lists those it takes)",
            )
        })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.max_upload_bytes as usize,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::limit_body,
        ))
        .with_state(state)
}

/// `ok` (200) while every supervised part runs, `degraded` (503) while one waits to
/// restart after a failure; each part's state, restarts and last error.
async fn healthz(State(state): State<AppState>) -> Response {
    use axum::response::IntoResponse;
    let health = &state.core.health;
    let ok = health.ok();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "degraded" },
        "parts": health.parts(),
    });
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn record_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    state
        .core
        .metrics
        .record_request(&method, &route, resp.status().as_u16());
    resp
}
