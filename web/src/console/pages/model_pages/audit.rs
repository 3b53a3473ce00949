//! The audit log page: who activated, rolled back, deleted, uploaded, forgot what.

use crate::console::Console;
use crate::console::layout;
use crate::state::AppState;
use axum::Router;
use axum::response::Response;
use axum::routing::get;
use maud::html;

pub fn routes() -> Router<AppState> {
    Router::new().route("/audit", get(show))
}

/// The newest 200 entries.
async fn show(Console { state, session }: Console) -> Response {
    let entries = match state.core.db.audit_entries(None, 200).await {
        Ok(e) => e,
        Err(e) => return super::fail(&session, &e.into()),
    };
    layout(
        "Audit log",
        Some(&session),
        "/audit",
        html! {
            h1 { "Audit log" }
            p.hint { "Who changed what users see or what is kept about them: activations and rollbacks (by the console, the API, the gate, a canary), deletions, uploads, jobs, assistants, /forget, logins. Kept for retention.audit_days." }
            @if entries.is_empty() {
                p { "Nothing yet." }
            } @else {
                table {
                    thead { tr { th { "When (UTC)" } th { "Who" } th { "What" } th { "On" } th { "Details" } } }
                    tbody {
                        @for e in &entries {
                            tr {
                                td { (e.at.get(..19).unwrap_or(&e.at).replace('T', " ")) }
                                td { (e.actor) }
                                td { (e.action) }
                                td { (e.target.as_deref().unwrap_or("")) }
                                td { (e.details.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        },
    )
}
