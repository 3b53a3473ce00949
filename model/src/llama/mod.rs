//! The llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) in candle, with
//! unmerged LoRA deltas on its seven projections.
//!
//! Each projection's base weight is either quantized (candle `QMatMul`, for fast CPU
//! decode from GGUF files) or dense (from safetensors); the adapter's `scale * B(A x)` is
//! added on top at run time, so adapters swap without touching the base weights.

pub mod config;
mod decode;
pub mod load;

pub use config::{Llama3RopeScaling, LlamaConfig, Projection, RopeLayout};
pub use decode::BatchRow;
pub use load::ModelSource;

use crate::lora::{LayerLora, LoraAdapter};
use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;

#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error(transparent)]
    File(#[from] crate::gguf::ModelError),
    #[error(
        "unsupported architecture {0:?}; loraloop runs the llama family (llama, mistral, qwen2)"
    )]
    UnsupportedArchitecture(String),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("model weights: {0}")]
    Weights(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A projection's frozen base weight.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// Quantized (or F16/F32 from a GGUF file): candle's `QMatMul`.
    Quantized(QMatMul),
    /// Dense `[out, in]`.
    Dense(Tensor),
    /// Q4_1 on the CPU, through loraloop's own kernel (`crate::q4_1`).
    Q41(std::sync::Arc<crate::q4_1::Q41Matrix>),
    /// Q8_0 on the CPU, through loraloop's own kernel (`crate::q8_0`): the output head.
    Q80(std::sync::Arc<crate::q8_0::Q80Matrix>),
}

/// A linear layer `y = x W^T + b` with an optional LoRA delta applied unmerged.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x`: `[.., in]`.
    pub fn forward(
        &self,
        x: &Tensor,
        lora: Option<&crate::lora::LoraPair>,
    ) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            BaseWeight::Quantized(q) => q.forward(x)?,
            BaseWeight::Dense(w) => dense_matmul(x, w)?,
            BaseWeight::Q41(w) => w.forward(x)?,
            BaseWeight::Q80(w) => w.forward(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match lora {
            Some(l) => l.add_to(x, &y),
            None => Ok(y),
        }
    }
}

/// The fused Q4_1 kernel's view of `projections`, when every base is Q4_1 and every
/// adapter has a host-memory copy; `None` when any projection must go through candle.
pub(crate) fn fused_q41<'a>(
    projections: &[(&'a Linear, Option<&'a crate::lora::LoraPair>)],
) -> Option<
    Vec<(
        &'a crate::q4_1::Q41Matrix,
        Option<&'a crate::lora::host::HostLora>,
    )>,
> {
    projections
        .iter()
        .map(|(lin, lora)| match (&lin.weight, lora) {
            (BaseWeight::Q41(w), None) => Some((w.as_ref(), None)),
            (BaseWeight::Q41(w), Some(l)) => l.host().map(|h| (w.as_ref(), Some(h))),
            _ => None,
        })
        .collect()
}

/// Several projections of the same input (q, k, v; gate, up), each with its LoRA delta.
/// Q4_1 bases with host-memory adapters (or none) go through one fused CPU kernel
/// call; anything else projects one by one.
fn project_many<const N: usize>(
    x: &Tensor,
    projections: [(&Linear, Option<&crate::lora::LoraPair>); N],
) -> candle_core::Result<[Tensor; N]> {
    let fused = fused_q41(&projections);
    let outs: Vec<Tensor> = match fused {
        Some(jobs) if x.device().is_cpu() => {
            let ys = crate::q4_1::forward_many(x, &jobs)?;
            ys.into_iter()
                .zip(&projections)
                .map(|(y, (lin, _))| match &lin.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                })
                .collect::<candle_core::Result<_>>()?
        }
        _ => projections
            .iter()
            .map(|(lin, lora)| lin.forward(x, *lora))
            .collect::<candle_core::Result<_>>()?,
    };
    Ok(outs
        .try_into()
        .unwrap_or_else(|_| unreachable!("N projections in, N out")))
}

/// `x [.., in] @ w[out, in]^T` without materialising the transpose.
pub(crate) fn dense_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim;
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The weights of a llama-family model. Immutable once loaded: share it with `Arc`.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`, dense.
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    pub device: Device,
    /// Whether the host pass rounds queries, keys and values to f16, as llama.cpp's f16
    /// attention cache does (`LoadedModel::load` sets it for GGUF files; off, the host pass
    /// is the f32 arithmetic the numpy references check).
    pub kv_f16: bool,
}

/// Per-sequence attention cache.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
}

impl Cache {
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            // Starts at 256 positions and grows by as much: short chats stay small.
            layers: (0..config.num_layers)
                .map(|_| KvCache::new(2, 256))
                .collect(),
        }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }

    /// A copy of the first `len` positions, with room for `capacity` before it grows
    /// (a prompt's cached prefix handed to a new sequence; a finished one kept exactly).
    pub fn prefix(&self, len: usize, capacity: usize) -> candle_core::Result<Self> {
        if len > self.len() {
            candle_core::bail!("a prefix of {len} positions from a cache of {}", self.len());
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut copy = KvCache::new(2, capacity.max(len).max(1));
                if let (Some(k), Some(v)) = (l.k()?, l.v()?)
                    && len > 0
                {
                    copy.append(
                        &k.narrow(2, 0, len)?.contiguous()?,
                        &v.narrow(2, 0, len)?.contiguous()?,
                    )?;
                }
                Ok(copy)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Llama {
    pub(crate) fn new(
        config: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: Linear,
        device: Device,
    ) -> candle_core::Result<Self> {
        // In the activations' dtype (bf16 for a bf16 folder on CUDA), as rope needs.
        let (cos, sin) = rope_tables(&config, &device)?;
        let (cos, sin) = (cos.to_dtype(embed.dtype())?, sin.to_dtype(embed.dtype())?);
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            device,
            kv_f16: false,
        })
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Run `tokens` (`[batch, seq]`, u32) after the positions already in `cache` and return
    /// the logits of the last position, `[batch, vocab]` in f32.
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: &mut Cache,
        adapter: Option<&LoraAdapter>,
    ) -> candle_core::Result<Tensor> {
        if self.host_decode_applies() && tokens.dims() == [1, 1] && tokens.dtype() == DType::U32 {
            let token = tokens.flatten_all()?.to_vec1::<u32>()?[0];
            let mut logits = self.forward_batch(&mut [BatchRow {
                tokens: &[token],
                cache,
                adapter,
            }])?;
            let row = logits.pop().expect("one row in, one out");
            let vocab = row.len();
            return Tensor::from_vec(row, (1, vocab), &self.device);
        }
        let hidden = self.hidden_states(tokens, cache, adapter)?;
        let (_b, t, _h) = hidden.dims3()?;
        self.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)
    }

    /// Logits of every position, `[batch, seq, vocab]` (tests, evaluation).
    pub fn forward_all(
        &self,
        tokens: &Tensor,
        cache: &mut Cache,
        adapter: Option<&LoraAdapter>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(tokens, cache, adapter)?;
        self.logits(&hidden)
    }

    /// Final norm and output projection, in f32.
    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let x = candle_nn::ops::rms_norm(hidden, &self.norm, self.config.rms_norm_eps as f32)?;
        self.lm_head.forward(&x, None)?.to_dtype(DType::F32)
    }

    fn hidden_states(
        &self,
        tokens: &Tensor,
        cache: &mut Cache,
        adapter: Option<&LoraAdapter>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let pos = cache.len();
        if pos + t > self.config.max_position_embeddings {
            candle_core::bail!(
                "{} positions exceed the context window of {}",
                pos + t,
                self.config.max_position_embeddings
            );
        }
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let n_rep = self.config.num_heads / self.config.num_kv_heads;
        let mask = if t > 1 {
            Some(causal_mask(t, pos, n_rep, &self.device)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let lora = adapter.and_then(|a| a.layer(i));
            x = self.block_forward(
                block,
                &x,
                &cos,
                &sin,
                mask.as_ref(),
                &mut cache.layers[i],
                lora,
            )?;
        }
        Ok(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut KvCache,
        lora: Option<&LayerLora>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps as f32;
        let (b, t, _) = x.dims3()?;
        let l = |p: Projection| lora.and_then(|l| l.get(p));

        let h = candle_nn::ops::rms_norm(x, &block.attn_norm, eps)?;
        let [q, k, v] = project_many(
            &h,
            [
                (&block.q, l(Projection::Q)),
                (&block.k, l(Projection::K)),
                (&block.v, l(Projection::V)),
            ],
        )?;
        let q = q
            .reshape((b, t, cfg.num_heads, cfg.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((b, t, cfg.num_kv_heads, cfg.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, t, cfg.num_kv_heads, cfg.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = match cfg.rope_layout {
            RopeLayout::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            RopeLayout::Halves => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
        };
        let (k, v) = kv.append(&k, &v)?;
        let total = k.dim(2)?;

        // Grouped-query attention without repeating k/v: fold the query heads that share a
        // key/value head into the sequence axis, [b, kv_heads, n_rep * t, head_dim].
        let n_rep = cfg.num_heads / cfg.num_kv_heads;
        let q = q.reshape((b, cfg.num_kv_heads, n_rep * t, cfg.head_dim))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?; // [b, kv, n_rep*t, hd]
        debug_assert_eq!(att.dim(D::Minus1)?, total);
        let y = y
            .reshape((b, cfg.num_heads, t, cfg.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, cfg.q_dim()))?;
        let [o] = project_many(&y, [(&block.o, l(Projection::O))])?;
        let x = (x + o)?;

        let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
        let [gate, up] = project_many(
            &h,
            [
                (&block.gate, l(Projection::Gate)),
                (&block.up, l(Projection::Up)),
            ],
        )?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let [down] = project_many(&act, [(&block.down, l(Projection::Down))])?;
        x + down
    }
}

/// `[n_rep * t, pos + t]` additive mask: query row `i` (of each repeated head group) sees
/// keys `0..=pos + i`.
fn causal_mask(t: usize, pos: usize, n_rep: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = pos + t;
    let mut data = Vec::with_capacity(n_rep * t * total);
    for _ in 0..n_rep {
        for i in 0..t {
            data.extend((0..total).map(|j| {
                if j <= pos + i {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Tensor::from_vec(data, (n_rep * t, total), device)
}

/// Rotary tables `[max_pos, head_dim / 2]`, with Llama 3's frequency scaling when set
/// (the formula of transformers' `_compute_llama3_parameters`).
pub(crate) fn rope_tables(
    cfg: &LlamaConfig,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let mut inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
        .collect();
    if let Some(s) = cfg.rope_scaling {
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            *f = if wavelen < high_wavelen {
                *f
            } else if wavelen > low_wavelen {
                *f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * *f / s.factor + smooth * *f
            };
        }
    }
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}
