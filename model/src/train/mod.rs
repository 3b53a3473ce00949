//! The training graph: the llama forward that keeps what the backward pass needs, and a
//! hand-written backward pass.
//!
//! Why not candle's autograd: `candle_nn`'s RMSNorm, softmax and rotary ops have no
//! backward (a model built on them silently trains nothing), and autograd computes the
//! gradient of every frozen base weight only to throw it away, and keeps one gradient per
//! intermediate tensor. Written out by hand, the backward computes exactly what training
//! needs: input gradients through the frozen base matmuls, weight gradients only where a
//! parameter is trainable, and the cross-entropy over the vocabulary only on the positions
//! that are scored, a chunk of rows at a time (the `[tokens, vocab]` logits are never
//! materialised whole). Gradient checkpointing then is simple: keep each layer's input,
//! recompute the layer in the backward pass (all but the top layer, whose backward comes
//! right after its forward). On the f32 host path a layer also keeps the residual between
//! its attention and its MLP, so each residual sub-block is recomputed from its own input
//! and the o and down products, whose outputs only feed that kept residual stream, are
//! not run again.
//!
//! Everything runs on candle tensors, so the same code runs on CUDA; the dtype is a
//! parameter (f32 on the CPU; on CUDA the trainer runs the base in bf16 with f32 LoRA
//! weights, the LoRA branch in f32 and norms and softmax through f32, as PEFT on a bf16
//! model does). Gradients are checked against a PyTorch autograd reference
//! and against finite differences in the tests.
//!
//! The base weights are dense here (quantized GGUF weights are dequantized once) and in
//! Hugging Face row order: llama GGUF files store q/k rows permuted for interleaved rope,
//! which is undone on load, so adapters trained here are PEFT adapters as they are.

use crate::kernels::pool::{BufPool, Scratch};
use crate::llama::{BaseWeight, Llama, LlamaConfig, Projection, RopeLayout};
use crate::lora::{LoraAdapter, PeftConfig, peft_name};
use candle_core::{D, DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

type Result<T> = candle_core::Result<T>;

/// Opt-in timing of the training graph's parts (`LORALOOP_TRAIN_PROFILE=1`): what
/// `loraloop bench train` prints to find where a step's time goes.
pub mod profile {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    static ON: OnceLock<bool> = OnceLock::new();
    static TOTALS: Mutex<BTreeMap<&'static str, (f64, usize)>> = Mutex::new(BTreeMap::new());

    pub fn enabled() -> bool {
        *ON.get_or_init(|| std::env::var_os("LORALOOP_TRAIN_PROFILE").is_some())
    }

    /// Run `f`, adding its wall time to `tag` when profiling is on.
    pub fn time<T>(tag: &'static str, f: impl FnOnce() -> T) -> T {
        if !enabled() {
            return f();
        }
        let t = Instant::now();
        let out = f();
        let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(tag).or_insert((0.0, 0));
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
        out
    }

    /// The totals so far (seconds, calls), and reset them.
    pub fn take() -> Vec<(&'static str, f64, usize)> {
        let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let out = m.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
        m.clear();
        out
    }
}

fn mm(tag: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    profile::time(tag, || a.matmul(b))
}

/// A dense linear layer `y = x W^T + b`, `W` `[out, in]`.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct DenseBlock {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    /// Indexed by `Projection::index()`.
    pub proj: [DenseLinear; 7],
    /// On the CPU, `[q; k; v]` and `[gate; up]` stacked in one tensor each, with the
    /// projections' weights views into them (no second copy): the f32 host path
    /// (`host.rs`) multiplies by each stack at once. Dropped when a weight is handed out
    /// to be replaced (`param_mut`).
    fused_qkv: Option<Tensor>,
    fused_gate_up: Option<Tensor>,
}

/// `parts` stacked along rows into one tensor, and each part as a view into it.
fn stack_rows(parts: &[&Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
    let all = Tensor::cat(parts, 0)?;
    let mut views = Vec::with_capacity(parts.len());
    let mut start = 0;
    for p in parts {
        let rows = p.dim(0)?;
        views.push(all.narrow(0, start, rows)?);
        start += rows;
    }
    Ok((all, views))
}

/// A llama-family model with dense weights in Hugging Face layout, for training.
#[derive(Debug, Clone)]
pub struct DenseLlama {
    /// Always `RopeLayout::Halves` (Hugging Face row order).
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<DenseBlock>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    pub device: Device,
    pub dtype: DType,
    /// The host path's `[rows, vocab]` logits buffer, kept from step to step.
    head_scratch: Scratch,
    /// The host path's activation and gradient buffers, handed back after their layer's
    /// backward and reused from step to step.
    host_bufs: BufPool,
}

/// Undo llama.cpp's q/k row permutation (`permute_for_interleaved_rope`):
/// `w.reshape(n_head, rows / n_head / 2, 2, cols).swapaxes(1, 2)`.
pub fn unpermute_interleaved_rope(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let cols = w.elem_count() / rows;
    w.reshape((n_head, rows / n_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn dense_of(weight: &BaseWeight, device: &Device) -> Result<Tensor> {
    use candle_core::quantized::QMatMul;
    Ok(match weight {
        BaseWeight::Dense(t) => t.clone(),
        BaseWeight::Q41(m) => m.dequantize(device)?,
        BaseWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(device)?,
        BaseWeight::Quantized(QMatMul::Tensor(t)) => t.clone(),
        BaseWeight::Quantized(QMatMul::TensorF16(t)) => t.clone(),
    })
}

impl DenseLlama {
    /// Dense copy of `model` in `dtype` (quantized weights are dequantized once).
    pub fn from_llama(model: &Llama, dtype: DType) -> Result<Self> {
        let device = model.device.clone();
        let cfg = &model.config;
        let interleaved = cfg.rope_layout == RopeLayout::Interleaved;
        let cast = |t: Tensor| t.to_dtype(dtype);
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            let lin = |p: Projection| -> Result<DenseLinear> {
                let l = match p {
                    Projection::Q => &b.q,
                    Projection::K => &b.k,
                    Projection::V => &b.v,
                    Projection::O => &b.o,
                    Projection::Gate => &b.gate,
                    Projection::Up => &b.up,
                    Projection::Down => &b.down,
                };
                let mut w = dense_of(&l.weight, &device)?;
                let mut bias = l.bias.clone();
                if interleaved && matches!(p, Projection::Q | Projection::K) {
                    let heads = if p == Projection::Q {
                        cfg.num_heads
                    } else {
                        cfg.num_kv_heads
                    };
                    w = unpermute_interleaved_rope(&w, heads)?;
                    bias = bias
                        .map(|b| unpermute_interleaved_rope(&b, heads))
                        .transpose()?;
                }
                Ok(DenseLinear {
                    w: cast(w)?,
                    b: bias.map(cast).transpose()?,
                })
            };
            let mut proj = [
                lin(Projection::Q)?,
                lin(Projection::K)?,
                lin(Projection::V)?,
                lin(Projection::O)?,
                lin(Projection::Gate)?,
                lin(Projection::Up)?,
                lin(Projection::Down)?,
            ];
            let (mut fused_qkv, mut fused_gate_up) = (None, None);
            if device.is_cpu() {
                let (qkv, v) = stack_rows(&[&proj[0].w, &proj[1].w, &proj[2].w])?;
                for (k, w) in v.into_iter().enumerate() {
                    proj[k].w = w;
                }
                let (gu, v) = stack_rows(&[&proj[4].w, &proj[5].w])?;
                for (k, w) in v.into_iter().enumerate() {
                    proj[4 + k].w = w;
                }
                (fused_qkv, fused_gate_up) = (Some(qkv), Some(gu));
            }
            blocks.push(DenseBlock {
                attn_norm: cast(b.attn_norm.clone())?,
                ffn_norm: cast(b.ffn_norm.clone())?,
                proj,
                fused_qkv,
                fused_gate_up,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(cast(dense_of(&model.lm_head.weight, &device)?)?)
        };
        let mut config = cfg.clone();
        config.rope_layout = RopeLayout::Halves;
        let (cos, sin) = crate::llama::rope_tables(&config, &device)?;
        Ok(Self {
            config,
            embed: cast(model.embed.clone())?,
            blocks,
            norm: cast(model.norm.clone())?,
            lm_head,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            device,
            dtype,
            head_scratch: Scratch::default(),
            host_bufs: BufPool::default(),
        })
    }

    fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every base parameter with its Hugging Face name.
    pub fn named_params(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, b) in self.blocks.iter().enumerate() {
            out.extend(self.block_params(i, b));
        }
        out.push(("model.norm.weight".into(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        out
    }

    fn block_params<'a>(&self, i: usize, b: &'a DenseBlock) -> Vec<(String, &'a Tensor)> {
        let mut out = vec![
            (norm_name(i, false), &b.attn_norm),
            (norm_name(i, true), &b.ffn_norm),
        ];
        for p in Projection::ALL {
            let l = &b.proj[p.index()];
            out.push((base_name(i, p, "weight"), &l.w));
            if let Some(bias) = &l.b {
                out.push((base_name(i, p, "bias"), bias));
            }
        }
        out
    }

    /// The tensor behind a Hugging Face parameter name, to update it.
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match name {
            "model.embed_tokens.weight" => return Some(&mut self.embed),
            "model.norm.weight" => return Some(&mut self.norm),
            "lm_head.weight" => return self.lm_head.as_mut(),
            _ => {}
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let b = self.blocks.get_mut(i.parse::<usize>().ok()?)?;
        match rest {
            "input_layernorm.weight" => return Some(&mut b.attn_norm),
            "post_attention_layernorm.weight" => return Some(&mut b.ffn_norm),
            _ => {}
        }
        let (_parent, rest) = rest.split_once('.')?;
        let (module, kind) = rest.split_once('.')?;
        let p = Projection::from_hf_name(module)?;
        // The caller is about to replace this tensor: the stack would go stale.
        match p {
            Projection::Q | Projection::K | Projection::V => b.fused_qkv = None,
            Projection::Gate | Projection::Up => b.fused_gate_up = None,
            _ => {}
        }
        let l = &mut b.proj[p.index()];
        match kind {
            "weight" => Some(&mut l.w),
            "bias" => l.b.as_mut(),
            _ => None,
        }
    }
}

/// `model.layers.{i}.{input_layernorm|post_attention_layernorm}.weight`: the norm before
/// attention (`ffn = false`) or before the MLP.
fn norm_name(layer: usize, ffn: bool) -> String {
    let which = if ffn {
        "post_attention_layernorm"
    } else {
        "input_layernorm"
    };
    format!("model.layers.{layer}.{which}.weight")
}

/// `model.layers.{i}.{self_attn|mlp}.{q_proj..}.{weight|bias}`.
pub fn base_name(layer: usize, p: Projection, kind: &str) -> String {
    format!(
        "model.layers.{layer}.{}.{}.{kind}",
        p.hf_parent(),
        p.hf_name()
    )
}

/// A trainable LoRA pair: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAb {
    pub a: Tensor,
    pub b: Tensor,
}

/// The trainable LoRA parameters of a whole model (Hugging Face row order).
#[derive(Debug, Clone)]
pub struct LoraParams {
    pub config: PeftConfig,
    pub scale: f64,
    pub layers: Vec<[Option<LoraAb>; 7]>,
}

impl LoraParams {
    /// PEFT's initialisation: `A ~ kaiming_uniform(a = sqrt(5))`, i.e. uniform in
    /// `±1/sqrt(in)`, and `B = 0`, so training starts from the base model exactly.
    pub fn init(
        config: PeftConfig,
        model: &LlamaConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let targets = config
            .targets()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let r = config.r;
        let mut layers = Vec::with_capacity(model.num_layers);
        for _ in 0..model.num_layers {
            let mut slots: [Option<LoraAb>; 7] = Default::default();
            for p in Projection::ALL {
                if !targets.contains(&p) {
                    continue;
                }
                let (inp, out) = model.projection_dims(p);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                slots[p.index()] = Some(LoraAb {
                    a: Tensor::from_vec(a, (r, inp), device)?.to_dtype(dtype)?,
                    b: Tensor::zeros((out, r), dtype, device)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self {
            scale: config.scale(),
            config,
            layers,
        })
    }

    /// From PEFT-named tensors (an adapter folder), checked against the model.
    pub fn from_tensors(
        config: PeftConfig,
        tensors: &HashMap<String, Tensor>,
        model: &LlamaConfig,
        dtype: DType,
    ) -> std::result::Result<Self, crate::lora::AdapterError> {
        // Validate names and shapes with the inference loader's checks.
        let mut hf = model.clone();
        hf.rope_layout = RopeLayout::Halves;
        LoraAdapter::from_tensors("check".into(), config.clone(), tensors, &hf)?;
        let targets = config.targets()?;
        let mut layers = Vec::with_capacity(model.num_layers);
        for layer in 0..model.num_layers {
            let mut slots: [Option<LoraAb>; 7] = Default::default();
            for p in &targets {
                if let (Some(a), Some(b)) = (
                    tensors.get(&peft_name(layer, *p, 'A')),
                    tensors.get(&peft_name(layer, *p, 'B')),
                ) {
                    slots[p.index()] = Some(LoraAb {
                        a: a.to_dtype(dtype)?,
                        b: b.to_dtype(dtype)?,
                    });
                }
            }
            layers.push(slots);
        }
        Ok(Self {
            scale: config.scale(),
            config,
            layers,
        })
    }

    /// PEFT-named tensors (f32), ready for `write_peft_dir`.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, t) in self.named_params() {
            out.insert(name, t.to_dtype(DType::F32)?);
        }
        Ok(out)
    }

    pub fn named_params(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(ab) = &slots[p.index()] {
                    out.push((peft_name(i, p, 'A'), &ab.a));
                    out.push((peft_name(i, p, 'B'), &ab.b));
                }
            }
        }
        out
    }

    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        let rest = name.strip_prefix("base_model.model.model.layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let slots = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        let parts: Vec<&str> = rest.split('.').collect();
        let [_, module, which, "weight"] = parts.as_slice() else {
            return None;
        };
        let ab = slots[Projection::from_hf_name(module)?.index()].as_mut()?;
        match *which {
            "lora_A" => Some(&mut ab.a),
            "lora_B" => Some(&mut ab.b),
            _ => None,
        }
    }

    /// An inference adapter with these weights, for `model` (which may be a GGUF model in
    /// interleaved rope layout: the inference loader permutes `B` as for any PEFT adapter).
    pub fn to_adapter(
        &self,
        name: &str,
        model: &Llama,
    ) -> std::result::Result<LoraAdapter, crate::lora::AdapterError> {
        let tensors = self.to_tensors()?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&model.device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        LoraAdapter::from_tensors(name.into(), self.config.clone(), &tensors, &model.config)
    }
}

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

/// One padded row of a batch. All vectors have the batch's sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub tokens: Vec<u32>,
    /// Rotary position of each token (restarts at 0 for each packed example).
    pub positions: Vec<u32>,
    /// Which packed example a token belongs to: tokens attend only within their segment,
    /// causally. 0 marks padding.
    pub segments: Vec<u32>,
    /// The token to predict at each position (already shifted), or -1.
    pub targets: Vec<i32>,
    /// Loss weight of each target (0 excludes it).
    pub weights: Vec<f32>,
}

/// A batch on the device.
#[derive(Debug)]
pub struct TrainBatch {
    batch: usize,
    seq: usize,
    /// Non-padding positions.
    real_tokens: usize,
    input_ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// `-sin`: the backward of a rotation is the rotation by the opposite angle.
    neg_sin: Tensor,
    /// `[b, 1, n_rep * t, t]` additive.
    mask: Tensor,
    /// Flat indices of scored positions, their targets and weights.
    scored_idx: Vec<u32>,
    scored_targets: Vec<u32>,
    scored_weights: Vec<f32>,
    /// What the f32 host path needs (f32 on the CPU, each token's visible keys one
    /// contiguous range).
    host: Option<host::HostBatch>,
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
        let (mut scored_idx, mut scored_targets, mut scored_weights) =
            (Vec::new(), Vec::new(), Vec::new());
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
            for i in 0..t {
                if r.targets[i] >= 0 && r.weights[i] > 0.0 && r.segments[i] != 0 {
                    if r.targets[i] as usize >= cfg.vocab_size {
                        candle_core::bail!(
                            "target token {} is outside the vocabulary",
                            r.targets[i]
                        );
                    }
                    scored_idx.push((ri * t + i) as u32);
                    scored_targets.push(r.targets[i] as u32);
                    scored_weights.push(r.weights[i]);
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
            host::HostBatch::new(rows, &cos, &sin)?
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

/// Options of a forward + backward pass.
#[derive(Debug, Clone, Copy)]
pub struct PassOptions {
    /// Multiplies every gradient: `1 / (sum of scored weights over the optimizer step)`
    /// makes the gradient that of the step's weighted mean loss.
    pub grad_scale: f64,
    /// Keep only each layer's input (and on the f32 host path the residual between its
    /// attention and MLP) and recompute the layer in the backward pass.
    pub checkpointing: bool,
    /// LoRA dropout masks come from this seed (the same masks on recomputation).
    pub dropout_seed: u64,
}

/// What the forward of one layer keeps for its backward.
struct LayerCache {
    x: Tensor,
    h1: Tensor,
    qf: Tensor,
    kr: Tensor,
    v4: Tensor,
    p: Tensor,
    y: Tensor,
    x2: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    lora: [Option<LoraSaved>; 7],
}

/// A layer's checkpoint under gradient checkpointing: its input and, on the f32 host
/// path, the residual between its attention and its MLP, so that each residual sub-block
/// is recomputed from its own input (see [`host::layer_fwd`]).
struct LayerCheckpoint {
    x: Tensor,
    mid: Option<Vec<f32>>,
}

/// What a layer's forward kept: from the generic graph or from the f32 host path.
enum Saved {
    Generic(Box<LayerCache>),
    Host(Box<host::HostCache>),
}

/// What a LoRA projection keeps for its backward.
struct LoraSaved {
    /// The input after dropout.
    xd: Tensor,
    /// `u = xd A^T`, `[n, r]`.
    u: Tensor,
    /// The dropout mask (already divided by `1 - p`), when dropout is on.
    mask: Option<Tensor>,
}

struct Ctx<'a> {
    model: &'a DenseLlama,
    lora: Option<&'a LoraParams>,
    batch: &'a TrainBatch,
    /// `None`: evaluation (no dropout).
    dropout_seed: Option<u64>,
}

mod host;
use host::Keep;

/// Fused element-wise kernels for f32 tensors on the CPU: one pass over memory and one
/// output allocation where the generic candle-op versions (used for other dtypes and
/// devices, and as the tests' reference) take several of each.
mod fused {
    use candle_core::{Result, Storage, Tensor};
    use std::sync::Mutex;

    const ROWS_PER_ITEM: usize = 32;

    /// `f` on the f32 host data of contiguous CPU tensors; `None` if one is not that.
    pub fn host_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
        let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(ts.len());
        for (storage, layout) in &guards {
            let Storage::Cpu(cpu) = &**storage else {
                return None;
            };
            let (start, end) = layout.contiguous_offsets()?;
            slices.push(&cpu.as_slice::<f32>().ok()?[start..end]);
        }
        Some(f(&slices))
    }

    /// Fill `outs.len()` buffers of `rows * len` row by row on candle's CPU pool.
    fn map_rows<const K: usize>(
        rows: usize,
        len: usize,
        f: impl Fn(usize, &mut [&mut [f32]; K]) + Sync,
    ) -> [Vec<f32>; K] {
        let mut outs: [Vec<f32>; K] = std::array::from_fn(|_| vec![0f32; rows * len]);
        {
            let mut chunks: Vec<Vec<&mut [f32]>> = Vec::new();
            for out in outs.iter_mut() {
                for (i, c) in out.chunks_mut(ROWS_PER_ITEM * len).enumerate() {
                    if chunks.len() <= i {
                        chunks.push(Vec::new());
                    }
                    chunks[i].push(c);
                }
            }
            let items: Vec<Mutex<Vec<&mut [f32]>>> = chunks.into_iter().map(Mutex::new).collect();
            candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
                for item in range {
                    let mut bufs = items[item].lock().unwrap_or_else(|e| e.into_inner());
                    let n = bufs[0].len() / len;
                    for r in 0..n {
                        let mut row: [&mut [f32]; K] = std::array::from_fn(|_| &mut [][..]);
                        for (k, b) in bufs.iter_mut().enumerate() {
                            // Reborrow row r of output k.
                            let ptr: &mut [f32] = &mut b[r * len..(r + 1) * len];
                            row[k] = ptr;
                        }
                        f(item * ROWS_PER_ITEM + r, &mut row);
                    }
                }
            });
        }
        outs
    }

    /// Softmax backward along the last dimension: `ds = p (dp - sum(p dp))`.
    pub fn softmax_bwd(p: &Tensor, dp: &Tensor) -> Option<Result<Tensor>> {
        let len = *p.dims().last()?;
        let rows = p.elem_count() / len;
        let out = host_f32(&[p, dp], |s| {
            let (p, dp) = (s[0], s[1]);
            map_rows::<1>(rows, len, |r, [ds]| {
                let (pr, dr) = (&p[r * len..(r + 1) * len], &dp[r * len..(r + 1) * len]);
                let dot: f32 = pr.iter().zip(dr).map(|(a, b)| a * b).sum();
                for ((o, a), b) in ds.iter_mut().zip(pr).zip(dr) {
                    *o = a * (b - dot);
                }
            })
        })?;
        let [ds] = out;
        Some(Tensor::from_vec(ds, p.shape(), p.device()))
    }

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    /// `silu(gate) * up`.
    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Option<Result<Tensor>> {
        let len = *gate.dims().last()?;
        let rows = gate.elem_count() / len;
        let [act] = host_f32(&[gate, up], |s| {
            let (g, u) = (s[0], s[1]);
            map_rows::<1>(rows, len, |r, [a]| {
                let o = r * len;
                for (j, v) in a.iter_mut().enumerate() {
                    let x = g[o + j];
                    *v = x * sigmoid(x) * u[o + j];
                }
            })
        })?;
        Some(Tensor::from_vec(act, gate.shape(), gate.device()))
    }

    /// Backward of `silu(gate) * up` given `da`: `(dgate, dup)` with
    /// `silu'(g) = sig(g) (1 + g (1 - sig(g)))`.
    pub fn silu_mul_bwd(
        gate: &Tensor,
        up: &Tensor,
        da: &Tensor,
    ) -> Option<Result<(Tensor, Tensor)>> {
        let len = *gate.dims().last()?;
        let rows = gate.elem_count() / len;
        let [dg, du] = host_f32(&[gate, up, da], |s| {
            let (g, u, d) = (s[0], s[1], s[2]);
            map_rows::<2>(rows, len, |r, [dg, du]| {
                let o = r * len;
                for j in 0..len {
                    let (x, up, da) = (g[o + j], u[o + j], d[o + j]);
                    let sg = sigmoid(x);
                    dg[j] = da * up * sg * (1.0 + x * (1.0 - sg));
                    du[j] = da * x * sg;
                }
            })
        })?;
        let make = |v| Tensor::from_vec(v, gate.shape(), gate.device());
        Some(make(dg).and_then(|dg| Ok((dg, make(du)?))))
    }
}

/// Whether `dt` is a 16-bit float: such tensors go through f32 for reductions (norms,
/// softmax), as PyTorch's llama does (`LlamaRMSNorm` and eager attention upcast to f32).
fn is_half(dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F16)
}

/// `f` on f32 copies of 16-bit inputs, its result cast back to `x`'s dtype; `f` as is
/// for other dtypes.
fn via_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if is_half(x.dtype()) {
        f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else {
        f(x)
    }
}

fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x.dtype()) {
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?,
            &g.to_dtype(DType::F32)?,
            eps as f32,
        )?;
        return y.to_dtype(x.dtype());
    }
    if x.dtype() == DType::F64 {
        // The fused kernel has no f64 path; f64 is for the gradient checks.
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(g)
    } else {
        candle_nn::ops::rms_norm(x, g, eps as f32)
    }
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        via_f32(x, candle_nn::ops::softmax_last_dim)
    }
}

/// RMSNorm backward: `y = x r g`, `r = 1/sqrt(mean(x^2) + eps)`;
/// `dx = r (dxhat - xhat mean(dxhat xhat))` with `dxhat = dy g`, `dg = sum(dy xhat)`.
fn rms_norm_bwd(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    eps: f64,
    want_dg: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if is_half(x.dtype()) {
        // In f32 (the mean over the hidden size loses too much in 16 bits).
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (dx, dg) = rms_norm_bwd(&f(x)?, &f(g)?, &f(dy)?, eps, want_dg)?;
        return Ok((
            dx.to_dtype(x.dtype())?,
            dg.map(|d| d.to_dtype(x.dtype())).transpose()?,
        ));
    }
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = x.broadcast_mul(&r)?;
    let dxhat = dy.broadcast_mul(g)?;
    let c = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (dxhat - xhat.broadcast_mul(&c)?)?.broadcast_mul(&r)?;
    let dg = if want_dg {
        Some((dy * &xhat)?.sum(0)?)
    } else {
        None
    };
    Ok((dx, dg))
}

fn silu_parts(g: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    Ok((sig, silu))
}

/// `x` `[n, in]`: `x W^T + b + scale * (x_d A^T) B^T`, and what the backward needs.
///
/// The LoRA branch runs in the LoRA weights' dtype: with a bf16 base and f32 LoRA
/// weights (the trainer's mixed precision), `x` is cast to f32 before the dropout and the
/// two small matmuls, and the branch's output back to bf16 before it is added, as PEFT
/// does for f32 adapter weights on a bf16 model (`_cast_input_dtype`, then
/// `result.to(torch_result_dtype)`).
fn linear_fwd(
    l: &DenseLinear,
    x: &Tensor,
    lora: Option<&LoraAb>,
    scale: f64,
    dropout: Option<(f64, u64)>,
    keep: bool,
) -> Result<(Tensor, Option<LoraSaved>)> {
    let mut y = mm("fwd x W^T", x, &l.w.t()?)?;
    if let Some(b) = &l.b {
        y = y.broadcast_add(b)?;
    }
    let Some(ab) = lora else {
        return Ok((y, None));
    };
    let xl = x.to_dtype(ab.a.dtype())?;
    let (xd, mask) = match dropout {
        Some((p, seed)) if p > 0.0 => {
            let mask = dropout_mask(&xl, p, seed)?;
            ((&xl * &mask)?, Some(mask))
        }
        _ => (xl, None),
    };
    let u = mm("fwd lora", &xd, &ab.a.t()?)?;
    let delta = (mm("fwd lora", &u, &ab.b.t()?)? * scale)?.to_dtype(y.dtype())?;
    let y = (y + delta)?;
    Ok((y, keep.then_some(LoraSaved { xd, u, mask })))
}

/// An inverted-dropout mask (0 or `1 / (1 - p)`) drawn from `seed`, so recomputation
/// under gradient checkpointing draws the same one.
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let m = Dropout::new(p, seed).values(x.elem_count());
    Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// The LoRA dropout of one projection in one pass: element `i` (row-major) of the input
/// is kept, and scaled by `1 / (1 - p)`, when a 32-bit hash of `(seed, i)` is at least
/// `p * 2^32`. Counter-based, so no mask has to be stored: the backward pass (and the
/// recomputation under gradient checkpointing) recomputes any element's factor, and the
/// loops over it vectorize (a sequential generator drew 150 M random numbers per step
/// of the 135M model, and the masks took 600 MB).
#[derive(Debug, Clone, Copy)]
struct Dropout {
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    keep: f32,
}

impl Dropout {
    fn new(p: f64, seed: u64) -> Self {
        Self {
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            // `as` saturates: p just below 1 gives u32::MAX.
            threshold: (p * 4_294_967_296.0) as u32,
            keep: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// Chris Wellons' `lowbias32` integer hash.
    #[inline(always)]
    fn hash(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }

    /// 0 or `1 / (1 - p)` for element `i`.
    #[inline(always)]
    fn factor(&self, i: usize) -> f32 {
        let h = Self::hash(Self::hash(i as u32 ^ self.seed_lo).wrapping_add(self.seed_hi));
        if h >= self.threshold { self.keep } else { 0.0 }
    }

    fn values(&self, len: usize) -> Vec<f32> {
        (0..len).map(|i| self.factor(i)).collect()
    }

    /// `x` times the mask.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, v)| v * self.factor(i))
            .collect()
    }
}

fn mix_seed(seed: u64, layer: usize, p: Projection) -> u64 {
    // splitmix64 of (seed, layer, projection): distinct, well-spread streams.
    let mut z = seed
        .wrapping_add((layer as u64) << 8 | p.index() as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct LinBwd<'a> {
    layer: usize,
    p: Projection,
    l: &'a DenseLinear,
    lora: Option<&'a LoraAb>,
    scale: f64,
    base_trainable: bool,
    need_dx: bool,
}

impl LinBwd<'_> {
    /// Input gradient of one projection; parameter gradients go to `grads`.
    fn run(
        &self,
        x: &Tensor,
        saved: Option<&LoraSaved>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let mut dx = if self.need_dx {
            Some(mm("bwd dy W", dy, &self.l.w)?)
        } else {
            None
        };
        if self.base_trainable {
            let gw = mm("bwd dW", &dy.t()?, x)?;
            grads.accumulate(base_name(self.layer, self.p, "weight"), gw)?;
            if self.l.b.is_some() {
                let gb = dy.sum(0)?;
                grads.accumulate(base_name(self.layer, self.p, "bias"), gb)?;
            }
        }
        if let (Some(ab), Some(LoraSaved { xd, u, mask })) = (self.lora, saved) {
            // y += s * u B^T, u = xd A^T:
            // dB = s dy^T u, du = s dy B, dA = du^T xd, dx += du A (through the dropout mask).
            // In the LoRA weights' dtype (see `linear_fwd`), so their gradients are too.
            let dyl = dy.to_dtype(ab.b.dtype())?;
            let gb = (mm("bwd lora", &dyl.t()?, u)? * self.scale)?;
            let du = (mm("bwd lora", &dyl, &ab.b)? * self.scale)?;
            let ga = mm("bwd lora", &du.t()?, xd)?;
            grads.accumulate(peft_name(self.layer, self.p, 'B'), gb)?;
            grads.accumulate(peft_name(self.layer, self.p, 'A'), ga)?;
            if let Some(d) = dx.as_mut() {
                let mut dxl = mm("bwd lora", &du, &ab.a)?;
                if let Some(m) = mask {
                    dxl = (dxl * m)?;
                }
                *d = (&*d + dxl.to_dtype(d.dtype())?)?;
            }
        }
        Ok(dx)
    }
}

impl Ctx<'_> {
    fn lora_of(&self, layer: usize, p: Projection) -> Option<&LoraAb> {
        self.lora
            .and_then(|l| l.layers.get(layer))
            .and_then(|s| s[p.index()].as_ref())
    }

    fn scale(&self) -> f64 {
        self.lora.map_or(0.0, |l| l.scale)
    }

    fn dropout(&self, layer: usize, p: Projection) -> Option<(f64, u64)> {
        let seed = self.dropout_seed?;
        let pr = self.lora?.config.lora_dropout;
        (pr > 0.0).then(|| (pr, mix_seed(seed, layer, p)))
    }

    /// Whether layer `i` runs on the f32 host path (`host`: the pass qualifies; the
    /// layer's base weights must also be frozen and stacked).
    fn on_host(&self, i: usize, host: bool, train: &BaseTrain) -> bool {
        let blk = &self.model.blocks[i];
        host && i < train.first_layer && blk.fused_qkv.is_some() && blk.fused_gate_up.is_some()
    }

    /// One block's forward, through the f32 host path where it applies: its output, what
    /// its backward needs (with [`Keep::All`]) and its checkpoint (with [`Keep::Mid`]).
    fn any_layer_fwd(
        &self,
        i: usize,
        x: &Tensor,
        keep: Keep,
        host: bool,
        train: &BaseTrain,
    ) -> Result<(Tensor, Option<Saved>, Option<LayerCheckpoint>)> {
        if self.on_host(i, host, train) {
            let out = host::layer_fwd(self, i, x, keep, None)?;
            let y = out
                .y
                .ok_or_else(|| candle_core::Error::Msg("host layer: no output".into()))?;
            let ckpt = (keep == Keep::Mid).then(|| LayerCheckpoint {
                x: x.clone(),
                mid: out.mid,
            });
            return Ok((y, out.cache.map(|c| Saved::Host(Box::new(c))), ckpt));
        }
        let (y, c) = self.layer_fwd(i, x, keep == Keep::All)?;
        let ckpt = (keep == Keep::Mid).then(|| LayerCheckpoint {
            x: x.clone(),
            mid: None,
        });
        Ok((y, c.map(|c| Saved::Generic(Box::new(c))), ckpt))
    }

    /// What layer `i`'s backward needs, recomputed from its checkpoint.
    fn layer_recompute(
        &self,
        i: usize,
        ckpt: LayerCheckpoint,
        host: bool,
        train: &BaseTrain,
    ) -> Result<Option<Saved>> {
        // Only the host path keeps a mid-layer residual.
        if let Some(mid) = ckpt.mid {
            let out = host::layer_fwd(self, i, &ckpt.x, Keep::All, Some(mid))?;
            return Ok(out.cache.map(|c| Saved::Host(Box::new(c))));
        }
        Ok(self.any_layer_fwd(i, &ckpt.x, Keep::All, host, train)?.1)
    }

    /// One block's forward on `x` `[n, hidden]`; with `keep`, what its backward needs.
    fn layer_fwd(&self, i: usize, x: &Tensor, keep: bool) -> Result<(Tensor, Option<LayerCache>)> {
        let m = self.model;
        let cfg = &m.config;
        let blk = &m.blocks[i];
        let (b, t) = (self.batch.batch, self.batch.seq);
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n_rep = nh / kvh;
        let s = self.scale();
        let mut lora: [Option<LoraSaved>; 7] = Default::default();
        let mut lin = |p: Projection, inp: &Tensor| -> Result<Tensor> {
            let (y, saved) = linear_fwd(
                &blk.proj[p.index()],
                inp,
                self.lora_of(i, p),
                s,
                self.dropout(i, p),
                keep,
            )?;
            lora[p.index()] = saved;
            Ok(y)
        };

        let h1 = rms_norm(x, &blk.attn_norm, cfg.rms_norm_eps)?;
        let q = lin(Projection::Q, &h1)?;
        let k = lin(Projection::K, &h1)?;
        let v = lin(Projection::V, &h1)?;
        let heads = |z: Tensor, n: usize| -> Result<Tensor> {
            z.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q4 = candle_nn::rotary_emb::rope(&heads(q, nh)?, &self.batch.cos, &self.batch.sin)?;
        let kr = candle_nn::rotary_emb::rope(&heads(k, kvh)?, &self.batch.cos, &self.batch.sin)?;
        let v4 = heads(v, kvh)?;
        // Grouped-query attention without repeating k/v: the query heads sharing a kv head
        // are folded into the sequence axis, [b, kv, n_rep * t, hd].
        let qf = q4.reshape((b, kvh, n_rep * t, hd))?;
        let att_scale = 1.0 / (hd as f64).sqrt();
        let scores =
            ((mm("fwd attn", &qf, &kr.t()?)? * att_scale)?.broadcast_add(&self.batch.mask))?;
        let p = softmax_last_dim(&scores)?;
        drop(scores);
        let y = mm("fwd attn", &p, &v4)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        let o = lin(Projection::O, &y)?;
        let x2 = (x + o)?;
        let h2 = rms_norm(&x2, &blk.ffn_norm, cfg.rms_norm_eps)?;
        let gate = lin(Projection::Gate, &h2)?;
        let up = lin(Projection::Up, &h2)?;
        let act = match fused::silu_mul(&gate, &up) {
            Some(a) => a?,
            None => (silu_parts(&gate)?.1 * &up)?,
        };
        let d = lin(Projection::Down, &act)?;
        let x3 = (&x2 + d)?;
        let cache = keep.then(|| LayerCache {
            x: x.clone(),
            h1,
            qf,
            kr,
            v4,
            p,
            y,
            x2,
            h2,
            gate,
            up,
            act,
            lora,
        });
        Ok((x3, cache))
    }

    /// One block's backward: `dx3` in, `dx` out (`None` when nothing below needs it).
    fn layer_bwd(
        &self,
        i: usize,
        c: &LayerCache,
        dx3: &Tensor,
        train: &BaseTrain,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let m = self.model;
        let cfg = &m.config;
        let blk = &m.blocks[i];
        let (b, t) = (self.batch.batch, self.batch.seq);
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n_rep = nh / kvh;
        let base_trainable = i >= train.first_layer;
        let lb = |p: Projection, need: bool| LinBwd {
            layer: i,
            p,
            l: &blk.proj[p.index()],
            lora: self.lora_of(i, p),
            scale: self.scale(),
            base_trainable,
            need_dx: need,
        };
        let must = || candle_core::Error::Msg("input gradient was not computed".into());

        // MLP.
        let da = lb(Projection::Down, true)
            .run(
                &c.act,
                c.lora[Projection::Down.index()].as_ref(),
                dx3,
                grads,
            )?
            .ok_or_else(must)?;
        let (dgate, dup) = match fused::silu_mul_bwd(&c.gate, &c.up, &da) {
            Some(r) => r?,
            None => {
                let (sig, sl) = silu_parts(&c.gate)?;
                // silu'(g) = sig (1 + g (1 - sig))
                let dsilu = (&sig * ((&c.gate * (1.0 - &sig)?)? + 1.0)?)?;
                (((&da * &c.up)? * dsilu)?, (&da * sl)?)
            }
        };
        let dh2 = (lb(Projection::Gate, true)
            .run(
                &c.h2,
                c.lora[Projection::Gate.index()].as_ref(),
                &dgate,
                grads,
            )?
            .ok_or_else(must)?
            + lb(Projection::Up, true)
                .run(&c.h2, c.lora[Projection::Up.index()].as_ref(), &dup, grads)?
                .ok_or_else(must)?)?;
        let (dn, dg2) = rms_norm_bwd(&c.x2, &blk.ffn_norm, &dh2, cfg.rms_norm_eps, base_trainable)?;
        if let Some(g) = dg2 {
            grads.accumulate(norm_name(i, true), g)?;
        }
        let dx2 = (dx3 + dn)?;

        // Attention.
        let dy = lb(Projection::O, true)
            .run(&c.y, c.lora[Projection::O.index()].as_ref(), &dx2, grads)?
            .ok_or_else(must)?;
        let dy4 = dy
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kvh, n_rep * t, hd))?;
        let dp = mm("bwd attn", &dy4, &c.v4.t()?)?;
        let dv4 = mm("bwd attn", &c.p.t()?, &dy4)?;
        let ds = match fused::softmax_bwd(&c.p, &dp) {
            Some(ds) => ds?,
            None if is_half(dp.dtype()) => {
                // The row sums in f32, as the forward's softmax.
                let (p32, dp32) = (c.p.to_dtype(DType::F32)?, dp.to_dtype(DType::F32)?);
                (&p32 * dp32.broadcast_sub(&(&dp32 * &p32)?.sum_keepdim(D::Minus1)?)?)?
                    .to_dtype(dp.dtype())?
            }
            None => (&c.p * dp.broadcast_sub(&(&dp * &c.p)?.sum_keepdim(D::Minus1)?)?)?,
        };
        drop(dp);
        let att_scale = 1.0 / (hd as f64).sqrt();
        let dqf = (mm("bwd attn", &ds, &c.kr)? * att_scale)?;
        let dkr = (mm("bwd attn", &ds.t()?, &c.qf)? * att_scale)?;
        drop(ds);
        let unrope =
            |z: &Tensor| candle_nn::rotary_emb::rope(z, &self.batch.cos, &self.batch.neg_sin);
        let flat =
            |z: Tensor, n: usize| -> Result<Tensor> { z.transpose(1, 2)?.reshape((b * t, n * hd)) };
        let dq = flat(unrope(&dqf.reshape((b, nh, t, hd))?.contiguous()?)?, nh)?;
        let dk = flat(unrope(&dkr.contiguous()?)?, kvh)?;
        let dv = flat(dv4, kvh)?;
        let need_h1 = need_dx || base_trainable;
        let mut dh1: Option<Tensor> = None;
        for (p, d) in [
            (Projection::Q, &dq),
            (Projection::K, &dk),
            (Projection::V, &dv),
        ] {
            if let Some(g) = lb(p, need_h1).run(&c.h1, c.lora[p.index()].as_ref(), d, grads)? {
                dh1 = Some(match dh1 {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        if !need_h1 {
            return Ok(None);
        }
        let dh1 = dh1.ok_or_else(must)?;
        let (dn, dg1) = rms_norm_bwd(&c.x, &blk.attn_norm, &dh1, cfg.rms_norm_eps, base_trainable)?;
        if let Some(g) = dg1 {
            grads.accumulate(norm_name(i, false), g)?;
        }
        if need_dx {
            Ok(Some((dx2 + dn)?))
        } else {
            Ok(None)
        }
    }
}

/// Rows of the output head processed at once: bounds the `[rows, vocab]` logits buffer.
const HEAD_CHUNK: usize = 256;

impl DenseLlama {
    /// Forward and backward over one micro-batch: gradients (times `opts.grad_scale`) are
    /// accumulated into `grads`; returns the loss statistics.
    pub fn forward_backward(
        &self,
        lora: Option<&LoraParams>,
        train: &BaseTrain,
        batch: &TrainBatch,
        opts: &PassOptions,
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
        for i in 0..n_layers {
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
        let hf = rms_norm(&x, &self.norm, self.config.rms_norm_eps)?;
        if host {
            return Ok(host::head(self, &hf, batch, None)?.0);
        }
        Ok(self.head(&hf, batch, None)?.0)
    }

    /// Cross-entropy over the scored rows of `hf` (`[n, hidden]`, after the final norm),
    /// `HEAD_CHUNK` rows at a time; with `backward`, the gradient w.r.t. `hf`.
    fn head(
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
            let tgt = Tensor::from_slice(&batch.scored_targets[start..start + len], (len, 1), dev)?;
            let wts = &batch.scored_weights[start..start + len];
            let hs = hf.index_select(&idx, 0)?;
            let logits = mm("head logits", &hs, &w.t()?)?.to_dtype(cdt)?;
            let mx = logits.max_keepdim(D::Minus1)?;
            let z = logits.broadcast_sub(&mx)?;
            drop(logits);
            let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let zt = z.gather(&tgt, D::Minus1)?;
            let nll: Vec<f64> = (&lse - &zt)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            let argmax: Vec<u32> = z.argmax(D::Minus1)?.to_vec1()?;
            for (k, &l) in nll.iter().enumerate() {
                stats.weighted_nll += wts[k] as f64 * l;
                stats.weight_sum += wts[k] as f64;
                stats.scored += 1;
                if argmax[k] == batch.scored_targets[start + k] {
                    stats.correct += 1;
                }
            }
            if let Some((grad_scale, train, grads)) = backward.as_mut() {
                // d loss / d logits = w (softmax - onehot), times the step's 1 / sum(w).
                let ws: Vec<f32> = wts
                    .iter()
                    .map(|&w| (w as f64 * *grad_scale) as f32)
                    .collect();
                let ws = Tensor::from_vec(ws, (len, 1), dev)?.to_dtype(cdt)?;
                let p = z.broadcast_sub(&lse)?.exp()?;
                drop(z);
                let onehot = p.zeros_like()?.scatter_add(&tgt, &ws, D::Minus1)?;
                let dlogits = (p.broadcast_mul(&ws)? - onehot)?.to_dtype(self.dtype)?;
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

#[cfg(test)]
mod tests {
    use super::Dropout;

    #[test]
    fn dropout_drops_a_p_fraction_scales_the_rest_and_depends_on_the_seed() {
        let n = 1 << 20;
        for p in [0.05, 0.1, 0.5] {
            let m = Dropout::new(p, 12345).values(n);
            let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            // Binomial: the standard deviation of the fraction is sqrt(p (1 - p) / n),
            // at most 0.0005 here; 0.003 is six of those.
            assert!((dropped - p).abs() < 0.003, "p {p}: dropped {dropped}");
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(m.iter().all(|&v| v == 0.0 || v == keep));
            // Inverted dropout keeps the mean: E[factor] = 1.
            let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 0.01, "p {p}: mean {mean}");
        }
        // Other seeds (also differing only in the high half) give other masks, the same
        // seed the same one; neighbouring elements are not correlated.
        let a = Dropout::new(0.5, 1).values(4096);
        assert_eq!(a, Dropout::new(0.5, 1).values(4096));
        for other in [2, 1 | (1 << 32)] {
            let b = Dropout::new(0.5, other).values(4096);
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            assert!(
                (1800..2300).contains(&same),
                "seed {other}: {same} of 4096 agree"
            );
        }
        let pairs = a.windows(2).filter(|w| w[0] == w[1]).count();
        assert!((1800..2300).contains(&pairs), "{pairs} equal neighbours");
    }
}
