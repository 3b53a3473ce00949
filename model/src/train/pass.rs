//! One micro-batch's forward and backward through every layer and the output head, and
//! evaluation.

use super::batch::{BaseTrain, Grads, PassOptions, PassStats, TrainBatch};
use super::ctx::Ctx;
use super::dense::DenseLlama;
use super::graph::Saved;
use super::host;
use super::host::Keep;
use super::lora_params::LoraParams;
use super::ops::{mm, rms_norm, rms_norm_bwd};
use super::profile;
use candle_core::Result;
use candle_core::{D, DType, Tensor};

/// Rows of the output head processed at once: bounds the `[rows, vocab]` logits buffer.
pub(super) const HEAD_CHUNK: usize = 256;

impl DenseLlama {
    /// Forward and backward over one micro-batch: gradients (times `opts.grad_scale`) are
    /// accumulated into `grads`; returns the loss statistics.
    pub fn forward_backward(
        &self,
        lora: Option<&LoraParams>,
        train: &BaseTrain,
        batch: &TrainBatch,
        opts: &PassOptions<'_>,
        grads: &mut Grads,
    ) -> Result<PassStats> {
        let ctx = Ctx {
            model: self,
            lora,
            batch,
            dropout_seed: Some(opts.dropout_seed),
        };
        let n_layers = self.blocks.len();
        let host = host::applies(self, lora, batch);
        if host {
            self.host_bufs.begin((batch.batch, batch.seq));
        }
        let mut x = self.embed.index_select(&batch.input_ids, 0)?;
        let mut inputs = Vec::with_capacity(n_layers);
        let mut caches = Vec::with_capacity(n_layers);
        let pause = || {
            if let Some(p) = opts.pause {
                (p.0)()
            }
        };
        for i in 0..n_layers {
            pause();
            // Under checkpointing a layer keeps only its input and recomputes the rest in
            // the backward; not the top layer, whose backward follows the head at once:
            // recomputing it would cost a layer's forward to save memory the backward
            // needs again right away.
            let keep = if !opts.checkpointing || i + 1 == n_layers {
                Keep::All
            } else {
                Keep::Mid
            };
            let (next, cache, ckpt) = profile::time("layer forward (total)", || {
                ctx.any_layer_fwd(i, &x, keep, host, train)
            })?;
            match ckpt {
                Some(c) => inputs.push(c),
                None => caches.push(cache),
            }
            x = next;
        }
        let hf = rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
        let (stats, dhf) = profile::time("head (total)", || {
            if host && !train.embeddings {
                host::head(self, &hf, batch, Some(opts.grad_scale))
            } else {
                self.head(&hf, batch, Some((opts.grad_scale, train, &mut *grads)))
            }
        })?;
        let dhf = dhf.ok_or_else(|| candle_core::Error::Msg("no head gradient".into()))?;
        let (mut dx, dg) = rms_norm_bwd(
            &x,
            &self.norm,
            &dhf,
            self.config.rms_norm_eps,
            train.final_norm,
        )?;
        if let Some(g) = dg {
            grads.accumulate("model.norm.weight".into(), g)?;
        }
        drop((x, hf, dhf));

        // The lowest layer whose backward matters: the first with a trainable parameter.
        let lowest = if train.embeddings {
            0
        } else {
            (0..n_layers)
                .find(|&i| {
                    i >= train.first_layer
                        || lora.is_some_and(|l| l.layers[i].iter().any(Option::is_some))
                })
                .unwrap_or(n_layers)
        };
        for i in (lowest..n_layers).rev() {
            pause();
            let cache = if opts.checkpointing && i + 1 < n_layers {
                let ckpt = inputs
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("lost input".into()))?;
                profile::time("layer recompute (total)", || {
                    ctx.layer_recompute(i, ckpt, host, train)
                })?
            } else {
                caches.pop().flatten()
            };
            let cache = cache.ok_or_else(|| candle_core::Error::Msg("lost layer cache".into()))?;
            let need_dx = i > lowest || train.embeddings;
            match profile::time("layer backward (total)", || match cache {
                Saved::Generic(c) => ctx.layer_bwd(i, &c, &dx, train, need_dx, grads),
                Saved::Host(c) => host::layer_bwd(&ctx, i, *c, &dx, need_dx, grads),
            })? {
                Some(d) => dx = d,
                None => break,
            }
        }
        if train.embeddings {
            let ge = self
                .embed
                .zeros_like()?
                .index_add(&batch.input_ids, &dx, 0)?;
            grads.accumulate("model.embed_tokens.weight".into(), ge)?;
        }
        Ok(stats)
    }

    /// Loss statistics without gradients (evaluation; no dropout).
    pub fn evaluate(&self, lora: Option<&LoraParams>, batch: &TrainBatch) -> Result<PassStats> {
        let (hf, host) = self.final_hidden(lora, batch)?;
        if host {
            return Ok(host::head(self, &hf, batch, None)?.0);
        }
        Ok(self.head(&hf, batch, None)?.0)
    }

    /// Log-probabilities over the vocabulary at the batch's scored positions (`[n_scored,
    /// vocab]`, f32): what a KL divergence between two adapters on the same text needs.
    pub fn scored_log_probs(
        &self,
        lora: Option<&LoraParams>,
        batch: &TrainBatch,
    ) -> Result<Tensor> {
        let (hf, _) = self.final_hidden(lora, batch)?;
        let n = batch.scored_idx.len();
        let idx = Tensor::from_slice(&batch.scored_idx, n, &self.device)?;
        let hs = hf.index_select(&idx, 0)?;
        let logits = mm("head logits", &hs, &self.head_weight().t()?)?.to_dtype(DType::F32)?;
        let z = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
        z.broadcast_sub(&lse)
    }

    /// Each row's summed log-probability of its scored targets (`log p(completion |
    /// prompt)` for a row whose weights mark the completion), without gradients: what
    /// DPO and KTO compare between the policy and the reference.
    pub fn row_log_probs(&self, lora: Option<&LoraParams>, batch: &TrainBatch) -> Result<Vec<f64>> {
        let (hf, _) = self.final_hidden(lora, batch)?;
        let w = self.head_weight();
        let mut sums = vec![0f64; batch.batch];
        let n = batch.scored_idx.len();
        let mut start = 0;
        while start < n {
            let len = HEAD_CHUNK.min(n - start);
            let rows = &batch.scored_idx[start..start + len];
            let idx = Tensor::from_slice(rows, len, &self.device)?;
            let tgt = Tensor::from_slice(
                &batch.scored_targets[start..start + len],
                (len, 1),
                &self.device,
            )?;
            let logits =
                mm("head logits", &hf.index_select(&idx, 0)?, &w.t()?)?.to_dtype(DType::F64)?;
            let z = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
            let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let lp: Vec<f64> = (z.gather(&tgt, D::Minus1)? - lse)?
                .flatten_all()?
                .to_vec1()?;
            for (k, l) in lp.into_iter().enumerate() {
                sums[rows[k] as usize / batch.seq] += l;
            }
            start += len;
        }
        Ok(sums)
    }

    /// The hidden states after the final norm (`[batch * seq, hidden]`), without keeping
    /// anything for a backward pass; and whether the f32 host path ran.
    fn final_hidden(
        &self,
        lora: Option<&LoraParams>,
        batch: &TrainBatch,
    ) -> Result<(Tensor, bool)> {
        let ctx = Ctx {
            model: self,
            lora,
            batch,
            dropout_seed: None,
        };
        let host = host::applies(self, lora, batch);
        if host {
            self.host_bufs.begin((batch.batch, batch.seq));
        }
        let frozen = BaseTrain::frozen(self.blocks.len());
        let mut x = self.embed.index_select(&batch.input_ids, 0)?;
        for i in 0..self.blocks.len() {
            x = ctx.any_layer_fwd(i, &x, Keep::Nothing, host, &frozen)?.0;
        }
        Ok((rms_norm(&x, &self.norm, self.config.rms_norm_eps)?, host))
    }

    /// Cross-entropy over the scored rows of `hf` (`[n, hidden]`, after the final norm),
    /// `HEAD_CHUNK` rows at a time; with `backward`, the gradient w.r.t. `hf`.
    pub(super) fn head(
        &self,
        hf: &Tensor,
        batch: &TrainBatch,
        mut backward: Option<(f64, &BaseTrain, &mut Grads)>,
    ) -> Result<(PassStats, Option<Tensor>)> {
        let w = self.head_weight();
        let dev = &self.device;
        let mut stats = PassStats::default();
        let mut dhf = match backward {
            Some(_) => Some(hf.zeros_like()?),
            None => None,
        };
        let head_name = if self.lm_head.is_some() {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        // Softmax in f32 at least (f64 for the gradient checks).
        let cdt = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let n = batch.scored_idx.len();
        let mut start = 0;
        while start < n {
            let len = HEAD_CHUNK.min(n - start);
            let idx = Tensor::from_slice(&batch.scored_idx[start..start + len], len, dev)?;
            // Each position's targets and their probabilities, `[len, k]`: one target with
            // probability 1, or a soft target's tokens (padded with probability 0).
            let (tgt, q, neg_entropy) = head_targets(batch, start, len);
            let k = tgt.len() / len;
            let tgt = Tensor::from_vec(tgt, (len, k), dev)?;
            let wts = &batch.scored_weights[start..start + len];
            let hs = hf.index_select(&idx, 0)?;
            let logits = mm("head logits", &hs, &w.t()?)?.to_dtype(cdt)?;
            let mx = logits.max_keepdim(D::Minus1)?;
            let z = logits.broadcast_sub(&mx)?;
            drop(logits);
            let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let qt = Tensor::from_slice(&q, (len, k), dev)?.to_dtype(cdt)?;
            // sum q (lse - z_target), plus sum q log q for soft targets: the KL divergence.
            let nll: Vec<f64> = (lse.broadcast_sub(&z.gather(&tgt, D::Minus1)?)? * &qt)?
                .sum(D::Minus1)?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            let argmax: Vec<u32> = z.argmax(D::Minus1)?.to_vec1()?;
            for (k, &l) in nll.iter().enumerate() {
                stats.weighted_nll += wts[k] as f64 * (l + neg_entropy[k]);
                stats.weight_sum += wts[k] as f64;
                stats.scored += 1;
                if argmax[k] == batch.scored_targets[start + k] {
                    stats.correct += 1;
                }
            }
            if let Some((grad_scale, train, grads)) = backward.as_mut() {
                // d loss / d logits = w (softmax - q), times the step's 1 / sum(w); q is
                // one-hot for a plain target.
                let ws: Vec<f32> = wts
                    .iter()
                    .map(|&w| (w as f64 * *grad_scale) as f32)
                    .collect();
                let ws = Tensor::from_vec(ws, (len, 1), dev)?.to_dtype(cdt)?;
                let p = z.broadcast_sub(&lse)?.exp()?;
                drop(z);
                let target =
                    p.zeros_like()?
                        .scatter_add(&tgt, &qt.broadcast_mul(&ws)?, D::Minus1)?;
                let dlogits = (p.broadcast_mul(&ws)? - target)?.to_dtype(self.dtype)?;
                let dhs = mm("head dlogits W", &dlogits, w)?;
                if let Some(d) = dhf.as_mut() {
                    *d = d.index_add(&idx, &dhs, 0)?;
                }
                if train.embeddings {
                    grads.accumulate(head_name.into(), mm("head dW", &dlogits.t()?, &hs)?)?;
                }
            }
            start += len;
        }
        Ok((stats, dhf))
    }
}

/// The targets of scored positions `start..start + len` as `[len, k]` token ids and
/// probabilities (`k` = the most tokens any of them has), and each position's `sum q log q`
/// (0 for a plain target).
pub(super) fn head_targets(
    batch: &TrainBatch,
    start: usize,
    len: usize,
) -> (Vec<u32>, Vec<f32>, Vec<f64>) {
    let soft = &batch.scored_soft[start..start + len];
    let k = soft
        .iter()
        .map(|s| s.as_ref().map_or(1, |s| s.tokens.len()))
        .max()
        .unwrap_or(1);
    let mut tgt = vec![0u32; len * k];
    let mut q = vec![0f32; len * k];
    let mut neg_entropy = vec![0f64; len];
    for i in 0..len {
        match &soft[i] {
            Some(s) => {
                tgt[i * k..i * k + s.tokens.len()].copy_from_slice(&s.tokens);
                q[i * k..i * k + s.probs.len()].copy_from_slice(&s.probs);
                neg_entropy[i] = s.neg_entropy();
            }
            None => {
                tgt[i * k] = batch.scored_targets[start + i];
                q[i * k] = 1.0;
            }
        }
    }
    (tgt, q, neg_entropy)
}
