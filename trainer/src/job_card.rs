//! A finished job's report card and what the assistant's activation policy does with it:
//! the data the card needs from the database (👍-rated conversations the job did not
//! train on, the adapter users have now), and the gate's decision afterwards.

use crate::card::{AdapterUnderTest, CardInputs, ReportCard, report_card};
use loraloop_core::domain::ChatExample;
use loraloop_core::gate::{ActivationPolicy, GateConfig};
use loraloop_core::storage::{BuildFilter, Db};
use loraloop_model::engine::LoadedModel;
use loraloop_model::train::DenseLlama;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// Which assistant a job's adapter is for, and how it reaches users.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// The assistant (by name) whose users the adapter would serve; None: no assistant
    /// (the card compares with the base model only and nothing is activated).
    pub assistant: Option<String>,
    pub policy: ActivationPolicy,
    pub thresholds: GateConfig,
    /// The share of new conversations a canary serves (`canary.share`).
    pub canary_share: f64,
    /// Where the retention probe's base answers are cached.
    pub cache_dir: Option<PathBuf>,
    /// Run after the gate activates an adapter, before the job reports success: a server
    /// running this worker swaps its engine here.
    pub after_activation: Option<AfterActivation>,
}

/// What the gate awaits after an activation (see [`GateOptions::after_activation`]).
#[derive(Clone)]
pub struct AfterActivation(pub std::sync::Arc<ActivationHook>);

/// An async callback: the future it returns is awaited.
pub type ActivationHook =
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync;

impl std::fmt::Debug for AfterActivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterActivation(..)")
    }
}

impl GateOptions {
    /// The configured assistant's policy and thresholds; the probe's cache in
    /// `data_dir/cache`.
    pub fn from_config(config: &loraloop_core::Config) -> Self {
        Self {
            assistant: Some(config.raw.assistant.name.clone()),
            policy: config.raw.assistant.activation,
            thresholds: config.raw.gate.clone(),
            canary_share: config.raw.canary.share,
            cache_dir: Some(config.raw.data_dir.join("cache")),
            after_activation: None,
        }
    }
}

/// What the card needs from the database, read before training starts.
#[derive(Debug, Clone, Default)]
pub struct CardData {
    pub rated: Vec<ChatExample>,
    /// The active adapter's name and folder, when the assistant has one.
    pub current: Option<(String, PathBuf)>,
    pub assistant_id: Option<i64>,
    /// The assistant's activation policy (its own, else the config's).
    pub policy: ActivationPolicy,
}

/// The card's data for a job for `assistant_id` (None: `opts.assistant`): the newest
/// `limit` of that assistant's conversations with a 👍-rated reply that are not among
/// `trained_on` (the conversations the job's dataset came from), as examples scored on the
/// rated replies only.
pub async fn card_data(
    db: &Db,
    opts: &GateOptions,
    assistant_id: Option<i64>,
    trained_on: &HashSet<i64>,
) -> anyhow::Result<CardData> {
    let assistant = match (assistant_id, &opts.assistant) {
        (Some(id), _) => Some(db.assistant_by_id(id).await?),
        (None, Some(name)) => Some(db.assistant(name).await?),
        (None, None) => None,
    };
    let limit = opts.thresholds.rated_replies;
    let mut rated: Vec<ChatExample> = if limit == 0 {
        Vec::new()
    } else {
        db.conversation_examples(&BuildFilter {
            only_upvoted: true,
            assistant: assistant.as_ref().map(|a| a.id),
            ..Default::default()
        })
        .await?
        .into_iter()
        .filter(|e| !trained_on.contains(&e.conversation_id))
        .map(|e| e.example)
        .collect()
    };
    // Oldest first: keep the newest.
    rated.drain(..rated.len().saturating_sub(limit));
    let mut data = CardData {
        rated,
        policy: opts.policy,
        ..Default::default()
    };
    if let Some(a) = assistant {
        data.assistant_id = Some(a.id);
        if let Some(p) = a.activation.as_deref().and_then(|p| p.parse().ok()) {
            data.policy = p;
        }
        if let Some(id) = a.active_adapter_id {
            let row = db.adapter(id).await?;
            data.current = Some((row.name, PathBuf::from(row.path)));
        }
    }
    Ok(data)
}

/// Make the card of the adapter in `dir` (compared with the current adapter when that one
/// loads on this model).
#[allow(clippy::too_many_arguments)]
pub fn make_card(
    model: &LoadedModel,
    dense: &DenseLlama,
    name: &str,
    dir: &std::path::Path,
    heldout: &[ChatExample],
    data: &CardData,
    base_model_hash: &str,
    sequence_len: usize,
    opts: &GateOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<ReportCard> {
    let adapter = AdapterUnderTest::load(name, dir, model, dense)?;
    let current = match &data.current {
        Some((n, d)) => match AdapterUnderTest::load(n, d, model, dense) {
            Ok(c) => Some(c),
            Err(e) => {
                progress(&format!(
                    "report card: the current adapter {n} does not load on this model ({e}); comparing with the base model only"
                ));
                None
            }
        },
        None => None,
    };
    report_card(
        &CardInputs {
            model,
            dense,
            adapter: &adapter,
            current: current.as_ref(),
            heldout,
            rated: &data.rated,
            base_model_hash,
            cache_dir: opts.cache_dir.clone(),
            sequence_len,
            gate: &opts.thresholds,
            cancel,
        },
        progress,
    )
}

/// Apply the policy to a stored adapter's card; returns what happened, in words.
pub async fn decide(
    db: &Db,
    opts: &GateOptions,
    data: &CardData,
    adapter_id: i64,
    card: &ReportCard,
) -> anyhow::Result<String> {
    let reasons = card.verdict.reasons().join("; ");
    let Some(assistant_id) = data.assistant_id else {
        return Ok(match card.verdict.pass {
            true => "report card: passes the gate".to_string(),
            false => format!("report card: does not pass the gate: {reasons}"),
        });
    };
    Ok(match (data.policy, card.verdict.pass) {
        (ActivationPolicy::Gate, true) => {
            db.activate_adapter(assistant_id, Some(adapter_id), "gate")
                .await?;
            if let Some(after) = &opts.after_activation {
                (after.0)().await;
            }
            format!("gate: {} passed and is now active", card.adapter)
        }
        (ActivationPolicy::Canary, true) => {
            db.start_canary(assistant_id, adapter_id, opts.canary_share)
                .await?;
            format!(
                "canary: {} passed the gate and now serves {:.0}% of new conversations; its users' ratings promote it or roll it back",
                card.adapter,
                opts.canary_share * 100.0
            )
        }
        (ActivationPolicy::Gate | ActivationPolicy::Canary, false) => {
            format!("gate: {} held back: {reasons}", card.adapter)
        }
        (ActivationPolicy::Manual, true) => format!(
            "report card: {} passes the gate; activation is manual: activate it from the console or the API",
            card.adapter
        ),
        (ActivationPolicy::Manual, false) => format!(
            "report card: {} does not pass the gate ({reasons}); activation is manual",
            card.adapter
        ),
    })
}
