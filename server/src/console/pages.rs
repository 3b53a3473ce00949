//! Console pages: conversations, datasets, training jobs, adapters, playground.

use crate::state::AppState;
use axum::Router;

pub fn routes() -> Router<AppState> {
    Router::new()
}
