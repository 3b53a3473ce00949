//! An adapter's report card in the console: in full on its job's page, as a verdict badge
//! in the adapter list.

use loraloop_trainer::card::{Compared, ReportCard, Scores};
use maud::{Markup, html};

/// The stored card, when the adapter has one that this version reads.
pub fn parse(json: Option<&str>) -> Option<ReportCard> {
    serde_json::from_str(json?).ok()
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn f1(s: &Scores) -> String {
    s.reply_f1.map_or("–".into(), |f| format!("{f:.2}"))
}

fn rows(label: &str, c: &Compared) -> Markup {
    let sides: Vec<(&str, &Scores)> = [
        Some(("base model", &c.base)),
        c.current.as_ref().map(|s| ("current adapter", s)),
        Some(("this adapter", &c.adapter)),
    ]
    .into_iter()
    .flatten()
    .collect();
    html! {
        tr { th colspan="4" { (label) " (" (c.examples) " examples, " (c.tokens) " tokens, " (c.replies) " replies)" } }
        @for (who, s) in sides {
            tr { td { (who) } td { (format!("{:.3}", s.loss)) } td { (pct(s.accuracy)) } td { (f1(s)) } }
        }
    }
}

/// The whole card.
pub fn full(card: &ReportCard) -> Markup {
    let r = &card.retention;
    html! {
        section.card id="report-card" data-pass=(card.verdict.pass) {
            h2 { "Report card" }
            p id="card-verdict" class=(if card.verdict.pass { "ok" } else { "error" }) {
                strong { @if card.verdict.pass { "Passes the gate." } @else { "Held back by the gate." } }
                " Compared with " (card.current.as_deref().unwrap_or("the base model")) "; the card took "
                (format!("{:.1}", card.seconds)) " s."
            }
            ul id="card-checks" {
                @for c in &card.verdict.checks {
                    li data-check=(c.name) data-pass=(c.pass) {
                        span class=(if c.pass { "ok" } else { "error" }) { @if c.pass { "✓ " } @else { "✗ " } }
                        (c.says)
                    }
                }
            }
            h3 { "Learned" }
            @if card.heldout.is_none() && card.rated.is_none() {
                p.muted { "No held-out examples and no rated conversations outside the training data." }
            } @else {
                table id="card-learned" {
                    thead { tr { th { "" } th { "loss" } th { "token accuracy" } th { "reply F1" } } }
                    tbody {
                        @if let Some(h) = &card.heldout { (rows("Held-out examples", h)) }
                        @if let Some(x) = &card.rated { (rows("👍 replies kept out of training", x)) }
                    }
                }
            }
            h3 { "Kept" }
            p id="card-kept" {
                "On " (r.prompts) " general prompts (" (r.tokens) " tokens of the base model's own answers), this adapter predicts "
                strong { (pct(r.adapter.agreement)) } " of the base model's next tokens, KL divergence "
                strong { (format!("{:.3}", r.adapter.kl)) } " nats/token"
                @if let Some(c) = &r.current { " (the current adapter: " (pct(c.agreement)) ", " (format!("{:.3}", c.kl)) ")" }
                "."
            }
        }
    }
}

/// A one-word verdict with the failed checks as its title.
pub fn badge(card: &ReportCard) -> Markup {
    let reasons = card.verdict.reasons().join("; ");
    html! {
        @if card.verdict.pass {
            span.badge.gate-pass title="passes the gate" { "gate ✓" }
        } @else {
            span.badge.gate-fail title=(reasons) { "held back" }
        }
    }
}
