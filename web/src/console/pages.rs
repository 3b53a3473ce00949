//! Console pages beyond the dashboard: conversations and datasets (`data_pages`), training
//! jobs, adapters and the playground (`model_pages`).

mod data_pages;
mod model_pages;

use crate::state::AppState;
use axum::Router;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(data_pages::routes())
        .merge(model_pages::routes())
}
