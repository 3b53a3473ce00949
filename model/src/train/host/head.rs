//! The frozen output head on the host path: logits, softmax, loss, accuracy and the
//! gradient, one pass per row over a chunk of rows' logits.

use super::layer::missing;
use crate::kernels::exp::exp_sub;
use crate::kernels::gemm::{dy_w, x_wt};
use crate::kernels::pool::par_rows;
use crate::kernels::reduce::max_f32;
use crate::train::batch::{PassStats, TrainBatch};
use crate::train::dense::DenseLlama;
use crate::train::fused;
use crate::train::profile;
use candle_core::{Result, Tensor};
use std::sync::Mutex;

/// Scored rows of the output head at once (bounds the `[rows, vocab]` logits buffer).
pub(super) const HEAD_CHUNK: usize = 512;

/// Cross-entropy over the scored rows of `hf` (`[n, hidden]`, after the final norm),
/// `HEAD_CHUNK` rows at a time, with the frozen head; with `grad_scale`, the gradient
/// w.r.t. `hf` (the head's own gradient is not computed: it is frozen here).
pub(crate) fn head(
    model: &DenseLlama,
    hf: &Tensor,
    batch: &TrainBatch,
    grad_scale: Option<f64>,
) -> Result<(PassStats, Option<Tensor>)> {
    let w = model.head_weight();
    let vocab = model.config.vocab_size;
    let h = model.config.hidden_size;
    let n = batch.scored_idx.len();
    let hf = hf.contiguous()?;
    let out = fused::host_f32(&[&hf, w], |sl| -> Result<_> {
        let [hf, w] = sl else {
            unreachable!("two tensors in, two slices out")
        };
        let mut stats = PassStats::default();
        let mut dhf = grad_scale.map(|_| vec![0f32; hf.len()]);
        let rows = HEAD_CHUNK.min(n);
        let mut logits = model.head_scratch.take(rows * vocab);
        let mut hs = vec![0f32; rows * h];
        let mut dhs = vec![0f32; rows * h];
        let mut per_row = vec![(0f64, 0u32); rows];
        for start in (0..n).step_by(HEAD_CHUNK) {
            let len = HEAD_CHUNK.min(n - start);
            let idx = &batch.scored_idx[start..start + len];
            let tgt = &batch.scored_targets[start..start + len];
            let wts = &batch.scored_weights[start..start + len];
            let soft = &batch.scored_soft[start..start + len];
            for (k, &row) in idx.iter().enumerate() {
                let row = row as usize;
                hs[k * h..(k + 1) * h].copy_from_slice(&hf[row * h..(row + 1) * h]);
            }
            let lg = &mut logits[..len * vocab];
            profile::time("head logits", || x_wt(lg, false, &hs, w, len, vocab, h));
            // Per row: the loss and the argmax; with a gradient, the row becomes
            // `w (softmax - q)` in place (q: one-hot, or a soft target's distribution, whose
            // loss is the KL divergence from it).
            let per = Mutex::new(&mut per_row[..len]);
            profile::time("head softmax", || {
                par_rows(lg, vocab, |k, z| {
                    let (target, ws) = (
                        tgt[k] as usize,
                        grad_scale.map(|g| (wts[k] as f64 * g) as f32),
                    );
                    // sum q z_t (and sum q) before exp_sub overwrites the logits.
                    let (qz, qsum, neg_entropy) = match &soft[k] {
                        Some(s) => s.tokens.iter().zip(&s.probs).fold(
                            (0f64, 0f64, s.neg_entropy()),
                            |(a, b, e), (&t, &q)| {
                                (a + q as f64 * z[t as usize] as f64, b + q as f64, e)
                            },
                        ),
                        None => (z[target] as f64, 1.0, 0.0),
                    };
                    let mx = max_f32(z);
                    let arg = z.iter().position(|&v| v == mx).unwrap_or(0);
                    let sum = exp_sub(z, mx);
                    let nll = qsum * (mx + sum.ln()) as f64 - qz + neg_entropy;
                    if let Some(ws) = ws {
                        let inv = ws / sum;
                        z.iter_mut().for_each(|v| *v *= inv);
                        match &soft[k] {
                            Some(s) => {
                                for (&t, &q) in s.tokens.iter().zip(&s.probs) {
                                    z[t as usize] -= ws * q;
                                }
                            }
                            None => z[target] -= ws,
                        }
                    }
                    per.lock().unwrap_or_else(|e| e.into_inner())[k] = (nll, arg as u32);
                })
            });
            for (k, &(nll, arg)) in per_row[..len].iter().enumerate() {
                stats.weighted_nll += wts[k] as f64 * nll;
                stats.weight_sum += wts[k] as f64;
                stats.scored += 1;
                if arg == tgt[k] {
                    stats.correct += 1;
                }
            }
            if let Some(dhf) = dhf.as_mut() {
                let dh = &mut dhs[..len * h];
                profile::time("head dlogits W", || dy_w(dh, lg, w, len, vocab, h));
                for (k, &row) in idx.iter().enumerate() {
                    let row = row as usize;
                    for (o, v) in dhf[row * h..(row + 1) * h]
                        .iter_mut()
                        .zip(&dh[k * h..(k + 1) * h])
                    {
                        *o += v;
                    }
                }
            }
        }
        model.head_scratch.put(logits);
        Ok((stats, dhf))
    })
    .ok_or_else(|| missing("head not contiguous f32 on the CPU"))??;
    let (stats, dhf) = out;
    let dev = &model.device;
    Ok((
        stats,
        dhf.map(|v| Tensor::from_vec(v, (hf.dim(0)?, h), dev))
            .transpose()?,
    ))
}
