//! The retention probe: general prompts shipped with the project (`data/
//! retention_prompts.txt`, none of them among the replay prompts), the base model's own
//! greedy answers to them, and how far an adapter has moved from the base model on those
//! answers.
//!
//! The answers are generated once per base model and cached: they depend only on the
//! model, its tokenizer and template, and the prompts.

use crate::batch::{BatchPlan, batches_in_order};
use crate::generate::greedy_tokens;
use crate::tokenize::TokenizedExample;
use candle_core::{D, DType};
use loraloop_model::engine::LoadedModel;
use loraloop_model::template::TemplateMessage;
use loraloop_model::train::{DenseLlama, LoraParams, TrainBatch};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The shipped general prompts, one a line.
pub const PROMPTS: &str = include_str!("../../data/retention_prompts.txt");

/// Answers are short: the probe measures the first tokens of each answer, where a model
/// that has drifted shows it.
pub const ANSWER_TOKENS: usize = 16;

/// The shipped prompts (the first `limit`; 0: all).
pub fn prompts(limit: usize) -> Vec<&'static str> {
    let all = PROMPTS.lines().map(str::trim).filter(|l| !l.is_empty());
    if limit == 0 {
        all.collect()
    } else {
        all.take(limit).collect()
    }
}

/// One prompt and the base model's greedy answer, as token ids (the probe scores the
/// answer's own tokens: no round trip through text).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseAnswer {
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub answer_tokens: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    answers: Vec<BaseAnswer>,
}

fn cache_key(model: &LoadedModel, base_model_hash: &str, prompts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        base_model_hash,
        &model.tokenizer.fingerprint(),
        &model.template.fingerprint(),
        &ANSWER_TOKENS.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for p in prompts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The base model's greedy answers to `prompts`, from `cache_dir` when an earlier run
/// wrote them for this model (and written there otherwise). Empty answers are left out.
pub fn base_answers(
    model: &LoadedModel,
    base_model_hash: &str,
    prompts: &[&str],
    cache_dir: Option<&Path>,
) -> Result<Vec<BaseAnswer>, String> {
    let key = cache_key(model, base_model_hash, prompts);
    let file = cache_dir.map(|d| d.join(format!("retention-{}.json", &key[..16])));
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(|c| c.key == key);
    if let Some(c) = cached {
        return Ok(c.answers);
    }
    let mut answers = Vec::with_capacity(prompts.len());
    for p in prompts {
        let (prompt_tokens, answer_tokens) = greedy_tokens(
            model,
            None,
            &[TemplateMessage::new("user", p.to_string())],
            ANSWER_TOKENS,
        )?;
        if !answer_tokens.is_empty() {
            answers.push(BaseAnswer {
                prompt: p.to_string(),
                prompt_tokens,
                answer_tokens,
            });
        }
    }
    if let Some(f) = &file {
        // A cache: a run that cannot write it generates the answers again.
        let c = Cached {
            key,
            answers: answers.clone(),
        };
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(json) = serde_json::to_vec(&c) {
            let tmp = f.with_extension("tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
    }
    Ok(answers)
}

/// How far one adapter is from the base model on the base model's answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// The share of answer positions where the adapter's most likely next token is the
    /// base model's (1 for the base model itself).
    pub agreement: f64,
    /// Mean KL(base || adapter) over those positions, in nats per token.
    pub kl: f64,
}

/// The answers, tokenized for the probe.
pub struct Probe {
    pub examples: Vec<TokenizedExample>,
    pub prompts: usize,
    pub tokens: usize,
}

impl Probe {
    /// The answers as scored examples (answers that do not fit `sequence_len` are cut).
    pub fn new(answers: &[BaseAnswer], sequence_len: usize) -> Self {
        let examples: Vec<TokenizedExample> = answers
            .iter()
            .filter(|a| a.prompt_tokens.len() < sequence_len)
            .map(|a| {
                let mut tokens = a.prompt_tokens.clone();
                tokens.extend_from_slice(&a.answer_tokens);
                tokens.truncate(sequence_len);
                let mut weights = vec![0.0; a.prompt_tokens.len()];
                weights.resize(tokens.len(), 1.0);
                TokenizedExample {
                    tokens,
                    weights,
                    soft: Vec::new(),
                }
            })
            .collect();
        Self {
            prompts: examples.len(),
            tokens: examples.iter().map(TokenizedExample::scored).sum(),
            examples,
        }
    }

    /// The drift of each of `adapters` from the base model, in one pass of the base model
    /// per batch.
    pub fn drift(
        &self,
        dense: &DenseLlama,
        adapters: &[&LoraParams],
        sequence_len: usize,
    ) -> candle_core::Result<Vec<Drift>> {
        let refs: Vec<&TokenizedExample> = self.examples.iter().collect();
        let plan = BatchPlan {
            micro_batch_size: 8,
            sequence_len,
            sample_packing: false,
            seed: 0,
        };
        let mut sums = vec![(0usize, 0usize, 0f64); adapters.len()];
        for rows in batches_in_order(&refs, &plan) {
            let batch = TrainBatch::new(&rows, dense)?;
            let base = dense.scored_log_probs(None, &batch)?;
            let base_top = base.argmax(D::Minus1)?;
            let p_base = base.exp()?;
            for (a, sum) in adapters.iter().zip(sums.iter_mut()) {
                let lp = dense.scored_log_probs(Some(a), &batch)?;
                let same: Vec<u8> = lp.argmax(D::Minus1)?.eq(&base_top)?.to_vec1()?;
                let kl = (&p_base * (&base - &lp)?)?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                sum.0 += same.len();
                sum.1 += same.iter().filter(|s| **s != 0).count();
                sum.2 += kl;
            }
        }
        Ok(sums
            .into_iter()
            .map(|(n, same, kl)| Drift {
                agreement: if n > 0 {
                    same as f64 / n as f64
                } else {
                    f64::NAN
                },
                kl: if n > 0 { kl / n as f64 } else { f64::NAN },
            })
            .collect())
    }
}
