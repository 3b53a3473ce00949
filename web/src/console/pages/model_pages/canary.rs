//! The canary on the adapters page: the running one with the ratings of both sides and
//! where the decision stands (and a button to stop it), the last few that ended, and each
//! adapter's ratings over the last two weeks.

use super::{fail, short_time};
use crate::adapter_views::{AdapterView, RATING_DAYS};
use crate::auth::AdminSession;
use crate::canary_views::CanaryView;
use crate::console::Console;
use crate::console::csrf_field;
use crate::error::ApiError;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

/// Canaries the page lists (the running one first).
pub const SHOWN: i64 = 5;

fn time(unix: i64) -> String {
    short_time(
        &chrono::DateTime::from_timestamp(unix, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    )
}

fn rate(up: u64, rated: u64) -> String {
    match rated {
        0 => format!("{up} of 0 rated"),
        n => format!("{up} of {n} 👍 ({:.0}%)", up as f64 * 100.0 / n as f64),
    }
}

/// The canary section; empty when no canary has ever run.
/// The canary card of an assistant's adapters page (`q`: its `?assistant=` query).
pub fn section(
    session: &AdminSession,
    canaries: &[CanaryView],
    views: &[AdapterView],
    q: &str,
) -> Markup {
    let name = |id: Option<i64>| match id {
        None => "the base model".to_string(),
        Some(id) => views
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.name.clone())
            .unwrap_or_else(|| format!("adapter {id} (deleted)")),
    };
    let running = canaries.iter().find(|c| c.status == "running");
    let ended: Vec<&CanaryView> = canaries.iter().filter(|c| c.status != "running").collect();
    html! {
        @if let Some(c) = running {
            section.card id="canary" data-status="running" {
                h2 { "Canary" }
                p {
                    strong { (name(Some(c.adapter_id))) }
                    " serves " (format!("{:.0}%", c.share * 100.0)) " of new conversations since " (time(c.started_at))
                    "; the rest stay on " (name(c.baseline_adapter_id)) "."
                }
                p id="canary-ratings" {
                    "New: " (rate(c.candidate_up, c.candidate_rated)) ". Current: " (rate(c.baseline_up, c.baseline_rated)) "."
                }
                @if let Some(r) = &c.reason { p.hint id="canary-standing" { (r) } }
                form.inline method="post" action=(format!("/adapters/canary/stop{q}")) {
                    (csrf_field(session))
                    button.secondary type="submit" id="stop-canary" { "Stop and roll back" }
                }
            }
        }
        @if !ended.is_empty() {
            section.card id="canary-history" {
                h2 { "Past canaries" }
                div.table-wrap {
                    table {
                        thead { tr { th { "Adapter" } th { "Outcome" } th { "Why" } th { "Ended" } } }
                        tbody {
                            @for c in &ended {
                                tr data-outcome=(c.status) {
                                    td { (name(Some(c.adapter_id))) }
                                    td { (c.status.replace('_', " ")) }
                                    td.small { (c.reason.as_deref().unwrap_or("")) }
                                    td { (c.ended_at.map(time).unwrap_or_default()) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An adapter's 👍 and 👎 per day as small bars (green 👍 over red 👎), newest right, with
/// the totals.
pub fn ratings(a: &AdapterView) -> Markup {
    let (up, down) = a
        .ratings
        .iter()
        .fold((0, 0), |(u, d), r| (u + r.up, d + r.down));
    let most = a
        .ratings
        .iter()
        .map(|r| r.up + r.down)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let today = chrono::Utc::now().date_naive();
    let days: Vec<(String, i64, i64)> = (0..RATING_DAYS)
        .rev()
        .map(|back| {
            let day = (today - chrono::Days::new(back as u64)).to_string();
            let r = a.ratings.iter().find(|r| r.day == day);
            (day, r.map_or(0, |r| r.up), r.map_or(0, |r| r.down))
        })
        .collect();
    const H: f64 = 16.0;
    html! {
        @if up + down == 0 {
            span.muted { "–" }
        } @else {
            span.ratings data-up=(up) data-down=(down) title=(format!("last {RATING_DAYS} days")) {
                (format!("👍 {up} 👎 {down} "))
                svg width=(RATING_DAYS * 4) height=(H) role="img" aria-label=(format!("{up} 👍 and {down} 👎 over {RATING_DAYS} days")) {
                    @for (i, (day, u, d)) in days.iter().enumerate() {
                        @let hu = *u as f64 / most * H;
                        @let hd = *d as f64 / most * H;
                        g { title { (format!("{day}: {u} 👍, {d} 👎")) }
                            rect x=(i * 4) y=(H - hu - hd) width="3" height=(hd) fill="#c0392b" {}
                            rect x=(i * 4) y=(H - hu) width="3" height=(hu) fill="#27ae60" {}
                        }
                    }
                }
            }
        }
    }
}

/// `POST /adapters/canary/stop?assistant=NAME`.
pub async fn stop(
    Console { state, session }: Console,
    super::ChosenAssistant(assistant): super::ChosenAssistant,
) -> Response {
    match state.core.canary.stop(assistant.id, "operator").await {
        Ok(_) => Redirect::to(&format!(
            "/adapters?assistant={}&ok=canarystopped",
            assistant.name
        ))
        .into_response(),
        Err(e) => fail(&session, &ApiError::from(e)),
    }
}
