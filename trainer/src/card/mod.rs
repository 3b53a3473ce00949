//! The report card of a new adapter, beside the base model and the adapter users have now:
//! what it learned (held-out examples of its data, generated replies scored against the
//! references, 👍-rated conversations kept out of training) and what it kept (the
//! retention probe), with a verdict against the gate's thresholds.

pub mod probe;
pub mod reply_score;
pub mod verdict;

use crate::evaluate::evaluate_tokenized;
use crate::events::EvalMetrics;
use crate::generate::greedy_reply;
use crate::tokenize::{TokenizeError, tokenize_dataset};
use crate::trainable::read_adapter;
use loraloop_core::domain::{ChatExample, Role};
use loraloop_core::gate::GateConfig;
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::LoraAdapter;
use loraloop_model::template::TemplateMessage;
use loraloop_model::train::{DenseLlama, LoraParams};
use probe::{Drift, Probe};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
pub use verdict::{Check, Verdict};

/// One model's scores on a set of examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub loss: f64,
    /// The share of reference tokens the model predicts (teacher-forced argmax).
    pub accuracy: f64,
    /// Mean token F1 of its greedy replies against the references (when replies were
    /// generated).
    pub reply_f1: Option<f64>,
}

/// The new adapter beside the base model and the current adapter on one set of examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compared {
    pub examples: usize,
    /// Scored reference tokens.
    pub tokens: usize,
    /// Examples whose generated reply was scored.
    pub replies: usize,
    pub base: Scores,
    pub current: Option<Scores>,
    pub adapter: Scores,
}

/// What the adapter kept: its drift from the base model on the probe, and the current
/// adapter's for comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retention {
    pub prompts: usize,
    pub tokens: usize,
    pub adapter: Drift,
    pub current: Option<Drift>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportCard {
    pub adapter: String,
    /// The adapter users had when the card was made (None: the base model).
    pub current: Option<String>,
    /// Held-out examples of the job's data.
    pub heldout: Option<Compared>,
    /// Recent replies rated 👍 in conversations the job did not train on.
    pub rated: Option<Compared>,
    pub retention: Retention,
    pub verdict: Verdict,
    /// What making the card took.
    pub seconds: f64,
}

/// An adapter read two ways: for teacher-forced scoring on the dense model, and for
/// generation on the served (possibly quantized) model.
pub struct AdapterUnderTest {
    pub name: String,
    pub params: LoraParams,
    pub adapter: LoraAdapter,
}

impl AdapterUnderTest {
    pub fn load(
        name: &str,
        dir: &Path,
        model: &LoadedModel,
        dense: &DenseLlama,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            params: read_adapter(dir, dense, 0.0)?,
            adapter: LoraAdapter::load(dir, &model.llama.config, &model.llama.device)?,
        })
    }
}

/// What a card is made from.
pub struct CardInputs<'a> {
    pub model: &'a LoadedModel,
    pub dense: &'a DenseLlama,
    pub adapter: &'a AdapterUnderTest,
    pub current: Option<&'a AdapterUnderTest>,
    pub heldout: &'a [ChatExample],
    pub rated: &'a [ChatExample],
    /// The base model's weights hash (keys the probe's cached answers).
    pub base_model_hash: &'a str,
    /// Where the probe's base answers are cached.
    pub cache_dir: Option<PathBuf>,
    pub sequence_len: usize,
    pub gate: &'a GateConfig,
    /// Set when the job is cancelled: the card stops at its next reply or phase.
    pub cancel: &'a AtomicBool,
}

impl CardInputs<'_> {
    fn go_on(&self) -> anyhow::Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }
}

/// Make the card. `progress` hears what is being measured.
pub fn report_card(
    i: &CardInputs<'_>,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<ReportCard> {
    let start = std::time::Instant::now();
    progress("report card: scoring held-out examples");
    let heldout = compare(i, i.heldout, i.gate.heldout_replies)?;
    i.go_on()?;
    progress("report card: scoring rated conversations kept out of training");
    let rated = compare(i, i.rated, 0)?;
    i.go_on()?;
    progress("report card: retention probe");
    let prompts = probe::prompts(i.gate.retention_prompts);
    let answers = probe::base_answers(i.model, i.base_model_hash, &prompts, i.cache_dir.as_deref())
        .map_err(anyhow::Error::msg)?;
    let probe = Probe::new(&answers, i.sequence_len);
    let mut adapters = vec![&i.adapter.params];
    if let Some(c) = i.current {
        adapters.push(&c.params);
    }
    let key = probe::answers_key(i.model, i.base_model_hash, &prompts);
    let base = probe.base_tops(i.dense, i.sequence_len, &key, i.cache_dir.as_deref())?;
    i.go_on()?;
    let drift = probe.drift(i.dense, &base, &adapters, i.sequence_len)?;
    let retention = Retention {
        prompts: probe.prompts,
        tokens: probe.tokens,
        adapter: drift[0],
        current: drift.get(1).copied(),
    };
    let verdict = Verdict::of(heldout.as_ref(), rated.as_ref(), &retention, i.gate);
    Ok(ReportCard {
        adapter: i.adapter.name.clone(),
        current: i.current.map(|c| c.name.clone()),
        heldout,
        rated,
        retention,
        verdict,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The three models on `examples`; `None` when nothing in them can be scored.
fn compare(
    i: &CardInputs<'_>,
    examples: &[ChatExample],
    replies: usize,
) -> anyhow::Result<Option<Compared>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let tok = match tokenize_dataset(
        examples,
        &i.model.tokenizer,
        &i.model.template,
        i.sequence_len,
        false,
    ) {
        Ok((t, _)) => t,
        Err(TokenizeError::NothingToTrain { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let eval = |lora: Option<&LoraParams>| -> anyhow::Result<EvalMetrics> {
        Ok(evaluate_tokenized(i.dense, lora, &tok, 4, i.sequence_len)?)
    };
    let (base, adapter) = (eval(None)?, eval(Some(&i.adapter.params))?);
    let current = i.current.map(|c| eval(Some(&c.params))).transpose()?;
    let samples: Vec<(Vec<TemplateMessage>, &str)> = examples
        .iter()
        .filter_map(reply_sample)
        .take(replies)
        .collect();
    let f1 = |a: Option<&LoraAdapter>| -> anyhow::Result<Option<f64>> {
        if samples.is_empty() {
            return Ok(None);
        }
        let mut sum = 0.0;
        for (prompt, reference) in &samples {
            i.go_on()?;
            let budget = reply_budget(i.model, reference);
            let got = greedy_reply(i.model, a, prompt, budget).map_err(anyhow::Error::msg)?;
            sum += reply_score::token_f1(&got, reference);
        }
        Ok(Some(sum / samples.len() as f64))
    };
    let scores = |m: EvalMetrics, reply_f1: Option<f64>| Scores {
        loss: m.loss,
        accuracy: m.accuracy,
        reply_f1,
    };
    Ok(Some(Compared {
        examples: tok.len(),
        tokens: base.tokens,
        replies: samples.len(),
        base: scores(base, f1(None)?),
        current: match (current, i.current) {
            (Some(m), Some(c)) => Some(scores(m, f1(Some(&c.adapter))?)),
            _ => None,
        },
        adapter: scores(adapter, f1(Some(&i.adapter.adapter))?),
    }))
}

/// The messages up to an example's last user message, and the reply that follows it.
fn reply_sample(e: &ChatExample) -> Option<(Vec<TemplateMessage>, &str)> {
    let last_user = e.messages.iter().rposition(|m| m.role == Role::User)?;
    let reply = e.messages[last_user + 1..]
        .iter()
        .find(|m| m.role == Role::Assistant)?;
    let prompt = e.messages[..=last_user]
        .iter()
        .map(|m| TemplateMessage::new(m.role.as_str(), m.content.clone()))
        .collect();
    Some((prompt, reply.content.as_str()))
}

/// Tokens a scored reply may use: the reference's length and some slack, at most 64, so
/// a rambling model does not make the card slow.
fn reply_budget(model: &LoadedModel, reference: &str) -> usize {
    let n = model
        .tokenizer
        .encode(reference, false)
        .map(|t| t.len())
        .unwrap_or(48);
    (n + 8).clamp(8, 64)
}
