//! A micro-batch as the graph takes it, what a pass trains, its loss statistics and
//! the gradients it accumulates.

use super::dense::DenseLlama;
use candle_core::Result;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// Which base parameters train (besides LoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseTrain {
    /// Layers `first_layer..` train all their weights (`num_layers`: none).
    pub first_layer: usize,
    /// Embeddings and the output head.
    pub embeddings: bool,
    /// The final norm.
    pub final_norm: bool,
}

impl BaseTrain {
    pub fn frozen(num_layers: usize) -> Self {
        Self {
            first_layer: num_layers,
            embeddings: false,
            final_norm: false,
        }
    }

    pub fn full() -> Self {
        Self {
            first_layer: 0,
            embeddings: true,
            final_norm: true,
        }
    }
}

/// One padded row of a batch. All vectors but `soft` have the batch's sequence length.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub tokens: Vec<u32>,
    /// Rotary position of each token (restarts at 0 for each packed example).
    pub positions: Vec<u32>,
    /// Which packed example a token belongs to: tokens attend only within their segment,
    /// causally. 0 marks padding.
    pub segments: Vec<u32>,
    /// The token to predict at each position (already shifted), or -1.
    pub targets: Vec<i32>,
    /// Loss weight of each target (0 excludes it; a negative weight's gradient raises
    /// the target's loss, as DPO and KTO need for unwanted replies).
    pub weights: Vec<f32>,
    /// Scored positions that learn a distribution instead of their one target
    /// (distillation): the loss there is the KL divergence from it, with the position's
    /// weight. Accuracy still compares with `targets`.
    pub soft: Vec<SoftTarget>,
}

/// A next-token distribution to learn at one position: the most likely tokens of a
/// reference model (each once) and their probabilities (summing to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct SoftTarget {
    pub position: u32,
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl SoftTarget {
    /// `sum q log q`: the loss is `KL(q || p) = sum q (log q - log p)`, so the cross-entropy
    /// less the target's entropy.
    pub(super) fn neg_entropy(&self) -> f64 {
        self.probs
            .iter()
            .filter(|&&q| q > 0.0)
            .map(|&q| q as f64 * (q as f64).ln())
            .sum()
    }
}

/// A batch on the device.
#[derive(Debug)]
pub struct TrainBatch {
    pub(super) batch: usize,
    pub(super) seq: usize,
    /// Non-padding positions.
    pub(super) real_tokens: usize,
    pub(super) input_ids: Tensor,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// `-sin`: the backward of a rotation is the rotation by the opposite angle.
    pub(super) neg_sin: Tensor,
    /// `[b, 1, n_rep * t, t]` additive.
    pub(super) mask: Tensor,
    /// Flat indices of scored positions, their targets and weights.
    pub(super) scored_idx: Vec<u32>,
    pub(super) scored_targets: Vec<u32>,
    pub(super) scored_weights: Vec<f32>,
    /// Per scored position, the distribution it learns instead of its target, if any.
    pub(super) scored_soft: Vec<Option<SoftTarget>>,
    /// What the f32 host path needs (f32 on the CPU, each token's visible keys one
    /// contiguous range).
    pub(super) host: Option<HostBatch>,
}

impl TrainBatch {
    pub fn new(rows: &[Row], model: &DenseLlama) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.tokens.len());
        if b == 0 || t == 0 {
            candle_core::bail!("empty batch");
        }
        let cfg = &model.config;
        let n_rep = cfg.num_heads / cfg.num_kv_heads;
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * n_rep * t * t);
        let (mut scored_idx, mut scored_targets, mut scored_weights, mut scored_soft) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (ri, r) in rows.iter().enumerate() {
            if [
                r.positions.len(),
                r.segments.len(),
                r.targets.len(),
                r.weights.len(),
            ] != [t; 4]
                || r.tokens.len() != t
            {
                candle_core::bail!("row {ri}: every field must have {t} entries");
            }
            ids.extend_from_slice(&r.tokens);
            for &p in &r.positions {
                if p as usize >= cfg.max_position_embeddings {
                    candle_core::bail!(
                        "position {p} is beyond the model's context of {}",
                        cfg.max_position_embeddings
                    );
                }
                pos.push(p);
            }
            let mut row_mask = Vec::with_capacity(t * t);
            for i in 0..t {
                let si = r.segments[i];
                row_mask.extend((0..t).map(|j| {
                    let visible = if si == 0 {
                        j == i
                    } else {
                        j <= i && r.segments[j] == si
                    };
                    if visible { 0f32 } else { f32::NEG_INFINITY }
                }));
            }
            for _ in 0..n_rep {
                mask.extend_from_slice(&row_mask);
            }
            let mut soft_at: std::collections::HashMap<u32, &SoftTarget> =
                std::collections::HashMap::new();
            for st in &r.soft {
                let ok = (st.position as usize) < t
                    && r.targets[st.position as usize] >= 0
                    && st.tokens.len() == st.probs.len()
                    && !st.tokens.is_empty()
                    && st.tokens.iter().all(|&k| (k as usize) < cfg.vocab_size)
                    && st
                        .tokens
                        .iter()
                        .collect::<std::collections::HashSet<_>>()
                        .len()
                        == st.tokens.len();
                if !ok {
                    candle_core::bail!(
                        "row {ri}: a soft target at position {} must be a scored position with distinct tokens in the vocabulary",
                        st.position
                    );
                }
                soft_at.insert(st.position, st);
            }
            for i in 0..t {
                // Negative weights push a target's probability down (preference objectives).
                if r.targets[i] >= 0 && r.weights[i] != 0.0 && r.segments[i] != 0 {
                    if r.targets[i] as usize >= cfg.vocab_size {
                        candle_core::bail!(
                            "target token {} is outside the vocabulary",
                            r.targets[i]
                        );
                    }
                    scored_idx.push((ri * t + i) as u32);
                    scored_targets.push(r.targets[i] as u32);
                    scored_weights.push(r.weights[i]);
                    scored_soft.push(soft_at.get(&(i as u32)).map(|s| (*s).clone()));
                }
            }
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            candle_core::bail!("token {bad} is outside the vocabulary");
        }
        let dev = &model.device;
        let pos_t = Tensor::from_vec(pos, b * t, dev)?;
        let half = cfg.head_dim / 2;
        let cos = model.cos.index_select(&pos_t, 0)?.reshape((b, t, half))?;
        let sin = model.sin.index_select(&pos_t, 0)?.reshape((b, t, half))?;
        let real_tokens = rows
            .iter()
            .map(|r| r.segments.iter().filter(|&&s| s != 0).count())
            .sum();
        let host = if dev.is_cpu() && model.dtype == DType::F32 {
            HostBatch::new(rows, &cos, &sin)?
        } else {
            None
        };
        Ok(Self {
            batch: b,
            seq: t,
            real_tokens,
            input_ids: Tensor::from_vec(ids, b * t, dev)?,
            cos,
            neg_sin: sin.neg()?,
            sin,
            mask: Tensor::from_vec(mask, (b, 1, n_rep * t, t), dev)?.to_dtype(model.dtype)?,
            scored_idx,
            scored_targets,
            scored_weights,
            scored_soft,
            host,
        })
    }

    /// Sum of the weights of scored tokens.
    pub fn weight_sum(&self) -> f64 {
        self.scored_weights.iter().map(|&w| w as f64).sum()
    }

    pub fn scored_tokens(&self) -> usize {
        self.scored_idx.len()
    }

    /// Positions holding a real token (not padding): what tokens/s counts.
    pub fn tokens(&self) -> usize {
        self.real_tokens
    }
}

/// Loss statistics of a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// `sum(weight * nll)` over scored tokens.
    pub weighted_nll: f64,
    pub weight_sum: f64,
    /// Scored tokens and how many of them the argmax predicts.
    pub scored: usize,
    pub correct: usize,
}

impl PassStats {
    pub fn add(&mut self, o: &PassStats) {
        self.weighted_nll += o.weighted_nll;
        self.weight_sum += o.weight_sum;
        self.scored += o.scored;
        self.correct += o.correct;
    }

    /// Weighted mean negative log-likelihood.
    pub fn loss(&self) -> f64 {
        if self.weight_sum > 0.0 {
            self.weighted_nll / self.weight_sum
        } else {
            f64::NAN
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.scored > 0 {
            self.correct as f64 / self.scored as f64
        } else {
            f64::NAN
        }
    }
}

/// Gradients by parameter name (PEFT names for LoRA, Hugging Face names for the base),
/// accumulated over micro-batches.
#[derive(Debug, Default)]
pub struct Grads {
    pub map: HashMap<String, Tensor>,
}

impl Grads {
    pub fn accumulate(&mut self, name: String, g: Tensor) -> Result<()> {
        match self.map.get_mut(&name) {
            Some(acc) => *acc = (&*acc + g)?,
            None => {
                self.map.insert(name, g);
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Called before each layer of a pass, forward and backward: where a training job may
/// wait mid-micro-batch (for chat replies) instead of only between micro-batches.
#[derive(Clone, Copy)]
pub struct Pause<'a>(pub &'a dyn Fn());

impl std::fmt::Debug for Pause<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pause(..)")
    }
}

/// Options of a forward + backward pass.
#[derive(Debug, Clone, Copy)]
pub struct PassOptions<'a> {
    /// Multiplies every gradient: `1 / (sum of scored weights over the optimizer step)`
    /// makes the gradient that of the step's weighted mean loss.
    pub grad_scale: f64,
    /// Keep only each layer's input (and on the f32 host path the residual between its
    /// attention and MLP) and recompute the layer in the backward pass.
    pub checkpointing: bool,
    /// LoRA dropout masks come from this seed (the same masks on recomputation).
    pub dropout_seed: u64,
    pub pause: Option<Pause<'a>>,
}

/// Per-batch data of the host path.
#[derive(Debug)]
pub(super) struct HostBatch {
    /// `[tokens, head_dim / 2]` rotary tables at each token's position.
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    /// Per token, the first position (within its row) it may attend to: it sees
    /// `lo..=i`. Padding sees only itself.
    pub(super) lo: Vec<u32>,
}

impl HostBatch {
    /// `None` when some token's visible keys are not one contiguous range (a packed
    /// example split in two): the generic path's mask handles that.
    pub(super) fn new(rows: &[Row], cos: &Tensor, sin: &Tensor) -> Result<Option<Self>> {
        let mut lo = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.tokens.len()));
        for r in rows {
            let mut seen_ended = std::collections::HashSet::new();
            let mut start = 0usize;
            for i in 0..r.segments.len() {
                let s = r.segments[i];
                if i > 0 && r.segments[i - 1] != s {
                    if r.segments[i - 1] != 0 {
                        seen_ended.insert(r.segments[i - 1]);
                    }
                    start = i;
                }
                if s == 0 {
                    lo.push(i as u32);
                } else {
                    if seen_ended.contains(&s) {
                        return Ok(None);
                    }
                    lo.push(start as u32);
                }
            }
        }
        Ok(Some(Self {
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            lo,
        }))
    }
}
