//! `POST <path of telegram.webhook_url>`: an update from Telegram, checked against the
//! secret the running bot registered, stored, and handed to the bot through the inbox.

use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use loraloop_core::storage::Platform;
use loraloop_core::token::constant_time_eq;

/// The header in which Telegram sends the webhook's secret token.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// The update is stored before the 200 answer (Telegram delivers it again until it gets
/// one), then handled by the bot.
pub async fn webhook_route(
    State(state): State<AppState>,
    req: Request,
) -> (StatusCode, &'static str) {
    let headers: &HeaderMap = req.headers();
    let Some((expected, source)) = state.telegram_inbox.secret() else {
        // The bot has not registered the webhook yet (or is not running): Telegram retries.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the bot is not running yet",
        );
    };
    let given = headers
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !constant_time_eq(given, &expected) {
        tracing::warn!("telegram webhook: a request without the right secret token, refused");
        return (StatusCode::UNAUTHORIZED, "wrong secret token");
    }
    // The body is read only once the secret matched: a stranger's upload costs nothing.
    let Ok(body) = axum::body::to_bytes(req.into_body(), crate::limits::BODY_LIMIT as usize).await
    else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "too large for an update");
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return (StatusCode::BAD_REQUEST, "not a Telegram update");
    };
    let id = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("update_id").and_then(|i| i.as_i64()));
    let Some(id) = id else {
        return (StatusCode::BAD_REQUEST, "not a Telegram update");
    };
    match state
        .core
        .db
        .store_update(Platform::Telegram, &format!("{source}:{id}"), text)
        .await
    {
        Ok(_) => {
            state.telegram_inbox.stored();
            (StatusCode::OK, "")
        }
        Err(e) => {
            tracing::error!("telegram webhook: cannot store update {id}: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot store the update")
        }
    }
}
