//! The preview of a preference dataset: DPO pairs (a conversation, the preferred and the
//! non-preferred reply) or KTO rows (a conversation, a reply, good or bad).

use super::{Params, notice_block, short_time};
use crate::auth::AdminSession;
use crate::console::layout;
use axum::response::Response;
use loraloop_core::domain::ChatMessage;
use loraloop_core::preference::{KtoRow, PreferencePair};
use loraloop_core::storage::Dataset;
use loraloop_trainer::preference::{PreferenceData, parse_stored};
use maud::{Markup, html};

/// Rows the preview shows.
const PREVIEW_ROWS: usize = 50;

pub(super) fn page(
    session: &AdminSession,
    d: &Dataset,
    lines: &[String],
    params: &Params,
) -> Response {
    let shown = lines.len().min(PREVIEW_ROWS);
    let parsed = parse_stored(&lines[..shown], d.objective());
    layout(
        &format!("Dataset {}", d.name),
        Some(session),
        "/datasets",
        html! {
            p { a href="/datasets" { "← Datasets" } }
            h1 { (d.name) " · version " (d.version) }
            (notice_block(params))
            section.card {
                dl id="dataset-info" {
                    dt { "Rows" } dd { (d.example_count) }
                    dt { "Kind" } dd id="dataset-kind" { (d.kind) }
                    dt { "Format" } dd { (d.format) }
                    dt { "Source" } dd { code { (d.source) } }
                    dt { "Created" } dd { (short_time(&d.created_at)) }
                    dt { "Hash" } dd { code { (d.content_hash) } }
                }
                p.hint { "A training job on this dataset trains " (d.kind.to_uppercase()) " (the base model is its reference)." }
                p.row {
                    a.button href=(format!("/datasets/{}/export", d.id)) download { "Export JSONL" }
                }
            }
            @if lines.len() > shown {
                p.muted { "The first " (shown) " of " (lines.len()) " rows:" }
            }
            @match parsed {
                Ok(PreferenceData::Pairs(pairs)) => { @for (i, p) in pairs.iter().enumerate() { (pair(i, p)) } }
                Ok(PreferenceData::Kto(rows)) => { @for (i, r) in rows.iter().enumerate() { (kto(i, r)) } }
                Err(problems) => {
                    p.error role="alert" { "The stored rows do not parse: " (problems.first().map(ToString::to_string).unwrap_or_default()) }
                }
            }
        },
    )
}

fn prompt(messages: &[ChatMessage]) -> Markup {
    html! {
        @for m in messages {
            div class=(format!("msg {}", m.role)) {
                div.meta { strong { (m.role) } }
                (m.content)
            }
        }
    }
}

fn pair(i: usize, p: &PreferencePair) -> Markup {
    html! {
        section.card.example.pair data-position=(i) {
            p.meta { "#" (i + 1) }
            (prompt(&p.prompt))
            div class="msg assistant preferred" {
                div.meta { strong { "preferred" } }
                (p.preferred)
            }
            div class="msg assistant non-preferred" {
                div.meta { strong { "not preferred" } }
                (p.non_preferred)
            }
        }
    }
}

fn kto(i: usize, r: &KtoRow) -> Markup {
    html! {
        section.card.example.kto data-position=(i) data-label=(r.label) {
            p.meta { "#" (i + 1) " · " (if r.label { "👍 desirable" } else { "👎 undesirable" }) }
            (prompt(&r.prompt))
            div class="msg assistant" {
                div.meta { strong { "assistant" } }
                (r.completion)
            }
        }
    }
}
