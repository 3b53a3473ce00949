//! The model as training sees it: dense base weights in Hugging Face row order (GGUF's
//! q/k permutation undone), q/k/v and gate/up also stacked for the host path.

use crate::kernels::pool::{BufPool, Scratch};
use crate::llama::{BaseWeight, Llama, LlamaConfig, Projection, RopeLayout};
use candle_core::Result;
use candle_core::{DType, Device, Tensor};

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
    pub(super) fused_qkv: Option<Tensor>,
    pub(super) fused_gate_up: Option<Tensor>,
}

/// `parts` stacked along rows into one tensor, and each part as a view into it.
pub(super) fn stack_rows(parts: &[&Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
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
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub device: Device,
    pub dtype: DType,
    /// The host path's `[rows, vocab]` logits buffer, kept from step to step.
    pub(super) head_scratch: Scratch,
    /// The host path's activation and gradient buffers, handed back after their layer's
    /// backward and reused from step to step.
    pub(super) host_bufs: BufPool,
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

pub(super) fn dense_of(weight: &BaseWeight, device: &Device) -> Result<Tensor> {
    use candle_core::quantized::QMatMul;
    Ok(match weight {
        BaseWeight::Dense(t) => t.clone(),
        BaseWeight::Q41(m) => m.dequantize(device)?,
        BaseWeight::Q80(m) => m.dequantize(device)?,
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

    pub(super) fn head_weight(&self) -> &Tensor {
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

    pub(super) fn block_params<'a>(
        &self,
        i: usize,
        b: &'a DenseBlock,
    ) -> Vec<(String, &'a Tensor)> {
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
pub(super) fn norm_name(layer: usize, ffn: bool) -> String {
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
