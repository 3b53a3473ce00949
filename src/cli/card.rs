//! The report card on the command line: made after `fine-tune` and by `evaluate`, printed
//! as a short table and written as `report_card.json` beside the adapter.

use loraloop_core::Config;
use loraloop_core::domain::ChatExample;
use loraloop_model::engine::LoadedModel;
use loraloop_model::train::DenseLlama;
use loraloop_trainer::card::{Compared, ReportCard};
use loraloop_trainer::job_card::{CardData, GateOptions, make_card};
use std::path::Path;

/// The card of the adapter in `dir` against the base model, on `heldout` and the
/// retention probe, under the configured gate.
pub fn make(
    config: &Config,
    model: &LoadedModel,
    dense: &DenseLlama,
    dir: &Path,
    heldout: &[ChatExample],
    base_model_hash: &str,
    sequence_len: usize,
) -> anyhow::Result<ReportCard> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let gate = GateOptions {
        assistant: None,
        ..GateOptions::from_config(config)
    };
    make_card(
        model,
        dense,
        &name,
        dir,
        heldout,
        &CardData::default(),
        base_model_hash,
        sequence_len,
        &gate,
        // The CLI's card runs to its end (Ctrl-C ends the process).
        &std::sync::atomic::AtomicBool::new(false),
        &mut |m| eprintln!("{m} ..."),
    )
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn learned_line(label: &str, c: &Compared) -> String {
    let mut s = format!(
        "{label} ({} examples, {} tokens): loss {:.3} -> {:.3}, token accuracy {} -> {}",
        c.examples,
        c.tokens,
        c.base.loss,
        c.adapter.loss,
        pct(c.base.accuracy),
        pct(c.adapter.accuracy)
    );
    if let (Some(b), Some(a)) = (c.base.reply_f1, c.adapter.reply_f1) {
        s += &format!(", reply F1 {b:.2} -> {a:.2} ({} replies)", c.replies);
    }
    s
}

/// The card as the terminal shows it (base model -> adapter).
pub fn render(card: &ReportCard) -> String {
    let mut out = format!(
        "report card for {} (against {})\n",
        card.adapter,
        card.current.as_deref().unwrap_or("the base model")
    );
    match &card.heldout {
        Some(h) => out += &format!("  learned  {}\n", learned_line("held-out", h)),
        None => out += "  learned  no held-out examples (set val_set_size or --eval-data-path)\n",
    }
    if let Some(r) = &card.rated {
        out += &format!(
            "  learned  {}\n",
            learned_line("👍 replies kept out of training", r)
        );
    }
    let d = &card.retention.adapter;
    out += &format!(
        "  kept     {} general prompts ({} tokens): agrees with the base model on {} of next tokens, KL {:.3} nats/token\n",
        card.retention.prompts,
        card.retention.tokens,
        pct(d.agreement),
        d.kl
    );
    out += &format!(
        "  verdict  {}\n",
        if card.verdict.pass {
            "passes the gate"
        } else {
            "held back by the gate"
        }
    );
    for c in &card.verdict.checks {
        out += &format!("    {} {}\n", if c.pass { "ok  " } else { "FAIL" }, c.says);
    }
    out += &format!("  (the card took {:.1} s)", card.seconds);
    out
}

/// Print the card and write it beside the adapter.
pub fn report(card: &ReportCard, dir: &Path) -> anyhow::Result<()> {
    println!("{}", render(card));
    std::fs::write(
        dir.join("report_card.json"),
        serde_json::to_string_pretty(card)?,
    )?;
    Ok(())
}
