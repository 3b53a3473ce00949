//! The retention probe: general prompts shipped with the project (`data/
//! retention_prompts.txt`, none of them among the replay prompts), the base model's own
//! greedy answers to them, and how far an adapter has moved from the base model on those
//! answers.
//!
//! The answers are generated once per base model and cached: they depend only on the
//! model, its tokenizer and template, and the prompts. So are the base model's next-token
//! distributions over them (its top `BASE_TOP_K` tokens at each position, per training
//! dtype and device), so a card runs only the adapters over the probe.

use crate::batch::{BatchPlan, batches_in_order};
use crate::generate::greedy_tokens;
use crate::tokenize::TokenizedExample;
use crate::topk::base_top_k;
use candle_core::{D, DType, Tensor};
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

/// What the base model's answers to `prompts` depend on, as one key.
pub fn answers_key(model: &LoadedModel, base_model_hash: &str, prompts: &[&str]) -> String {
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
    let key = answers_key(model, base_model_hash, prompts);
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
        write_cache(
            f,
            &Cached {
                key,
                answers: answers.clone(),
            },
        );
    }
    Ok(answers)
}

/// The base model's next-token distributions are kept as their most likely tokens, the
/// rest as one bucket.
pub const BASE_TOP_K: usize = 64;

/// The base model's next-token distribution at one probe position.
pub use crate::topk::TopTokens as BaseTop;

#[derive(Serialize, Deserialize)]
struct CachedTops {
    key: String,
    tops: Vec<BaseTop>,
}

/// How far one adapter is from the base model on the base model's answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// The share of answer positions where the adapter's most likely next token is the
    /// base model's (1 for the base model itself).
    pub agreement: f64,
    /// Mean KL(base || adapter) over those positions, in nats per token, over the base
    /// model's `BASE_TOP_K` most likely tokens and the rest as one bucket (a lower bound
    /// of the KL over the whole vocabulary, and close to it: the rest holds a few percent).
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
                    ..Default::default()
                }
            })
            .collect();
        Self {
            prompts: examples.len(),
            tokens: examples.iter().map(TokenizedExample::scored).sum(),
            examples,
        }
    }

    fn plan(sequence_len: usize) -> BatchPlan {
        BatchPlan {
            micro_batch_size: 8,
            sequence_len,
            sample_packing: false,
            seed: 0,
        }
    }

    /// The base model's distribution at every scored position, in order: from
    /// `cache_dir` when an earlier card computed them for this model, dtype, device and
    /// probe (`answers_key`), computed (and written there) otherwise.
    pub fn base_tops(
        &self,
        dense: &DenseLlama,
        sequence_len: usize,
        answers_key: &str,
        cache_dir: Option<&Path>,
    ) -> candle_core::Result<Vec<BaseTop>> {
        let key = format!(
            "{answers_key}/{:?}/{}/{sequence_len}/{BASE_TOP_K}",
            dense.dtype,
            if dense.device.is_cpu() { "cpu" } else { "gpu" }
        );
        let file = cache_dir.map(|d| {
            use sha2::{Digest, Sha256};
            let h = hex::encode(Sha256::digest(key.as_bytes()));
            d.join(format!("retention-base-{}.json", &h[..16]))
        });
        let cached = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<CachedTops>(&b).ok())
            .filter(|c| c.key == key && c.tops.len() == self.tokens);
        if let Some(c) = cached {
            return Ok(c.tops);
        }
        let refs: Vec<&TokenizedExample> = self.examples.iter().collect();
        let tops = base_top_k(dense, &refs, sequence_len, BASE_TOP_K)?;
        if let Some(f) = &file {
            // A cache: a card that cannot write it computes the distributions again.
            write_cache(
                f,
                &CachedTops {
                    key,
                    tops: tops.clone(),
                },
            );
        }
        Ok(tops)
    }

    /// The drift of each of `adapters` from the base model's distributions `base` (from
    /// `base_tops`): one pass per adapter and batch.
    pub fn drift(
        &self,
        dense: &DenseLlama,
        base: &[BaseTop],
        adapters: &[&LoraParams],
        sequence_len: usize,
    ) -> candle_core::Result<Vec<Drift>> {
        let refs: Vec<&TokenizedExample> = self.examples.iter().collect();
        let mut sums = vec![(0usize, 0usize, 0f64); adapters.len()];
        let mut at = 0;
        for rows in batches_in_order(&refs, &Self::plan(sequence_len)) {
            let batch = TrainBatch::new(&rows, dense)?;
            let n = batch.scored_tokens();
            let tops = base.get(at..at + n).ok_or_else(|| {
                candle_core::Error::Msg("the base distributions do not fit the probe".into())
            })?;
            at += n;
            let k = tops.iter().map(|t| t.tokens.len()).max().unwrap_or(1);
            let mut idx = vec![0u32; n * k];
            for (i, t) in tops.iter().enumerate() {
                idx[i * k..i * k + t.tokens.len()].copy_from_slice(&t.tokens);
            }
            let idx = Tensor::from_vec(idx, (n, k), &dense.device)?;
            for (a, sum) in adapters.iter().zip(sums.iter_mut()) {
                let lp = dense.scored_log_probs(Some(a), &batch)?;
                let top: Vec<u32> = lp.argmax(D::Minus1)?.to_vec1()?;
                let picked: Vec<Vec<f32>> = lp
                    .gather(&idx, D::Minus1)?
                    .to_dtype(DType::F32)?
                    .to_vec2()?;
                for (i, t) in tops.iter().enumerate() {
                    sum.0 += 1;
                    sum.1 += usize::from(t.tokens.first() == Some(&top[i]));
                    sum.2 += bucketed_kl(&t.log_probs, &picked[i][..t.tokens.len()]);
                }
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

/// KL(q || p) over the same tokens plus one bucket for the rest of the vocabulary: `q` and
/// `p` as log-probabilities of those tokens.
pub fn bucketed_kl(q: &[f32], p: &[f32]) -> f64 {
    let (mut kl, mut q_top, mut p_top) = (0f64, 0f64, 0f64);
    for (&lq, &lp) in q.iter().zip(p) {
        let (lq, lp) = (lq as f64, lp as f64);
        kl += lq.exp() * (lq - lp);
        q_top += lq.exp();
        p_top += lp.exp();
    }
    let q_rest = (1.0 - q_top).max(0.0);
    if q_rest > 1e-12 {
        kl += q_rest * (q_rest.ln() - (1.0 - p_top).max(1e-12).ln());
    }
    kl
}

/// Write a cache file whole (a temporary file renamed), ignoring failures.
fn write_cache<T: Serialize>(f: &Path, value: &T) {
    if let Some(dir) = f.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_vec(value) {
        let tmp = f.with_extension("tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, f);
        }
    }
}
