//! One decode step (one sequence, one new token) on the CPU, in host memory.
//!
//! At decode time every tensor but the weights is tiny (the 135M model's hidden state is
//! 576 floats), so the graph of small candle ops (norms, rope, reshapes, copies, the
//! attention's two matmuls, residual adds: about 35 per layer, each allocating its output)
//! costs as much as the arithmetic, and the pool's second thread spins through all of it.
//! This path keeps the hidden state in one `Vec<f32>`, does those steps as plain loops,
//! runs the projections through the fused Q4_1 kernel (LoRA included) and the attention
//! heads on the worker pool, and touches candle only for the KV cache append and the
//! output head. Its numbers are those of the candle path (`Llama::hidden_states`) up to
//! float summation order; the tiny-model tests compare both to the numpy reference.

use super::{Block, Cache, Linear, Llama, Projection, RopeLayout};
use crate::kernels::exp::{exp_sub, silu_mul};
use crate::kernels::norm::rms_norm_row;
use crate::kernels::pool::pool_items;
use crate::kernels::reduce::{dot_f32, max_f32};
use crate::kernels::rope::rotate_head;
use crate::kernels::shared::SharedBuf;
use crate::lora::{LayerLora, LoraAdapter, LoraPair};
use crate::q4_1;
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use candle_nn::kv_cache::KvCache;

/// `f(data, layout)` on a CPU f32 tensor's storage, in place.
fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32], &Layout) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Ok(f(data, layout)),
        _ => candle_core::bail!("host decode: expected an f32 CPU tensor"),
    }
}

/// A contiguous 1-D f32 tensor (norm weights, biases) as a slice, to `f`.
fn with_vec<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_host(t, |data, layout| {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("host decode: not contiguous".into()))?;
        Ok(f(&data[start..end]))
    })?
}

/// candle's `rms_norm` of one row with the norm's weight tensor.
fn rms_norm(x: &[f32], w: &Tensor, eps: f32) -> candle_core::Result<Vec<f32>> {
    with_vec(w, |w| rms_norm_row(x, w, eps))
}

/// Rotate each `head_dim` slice of `x` by the angles of one position.
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], layout: RopeLayout) {
    for head in x.chunks_exact_mut(head_dim) {
        rotate_head(head, cos, sin, layout, 1.0);
    }
}

/// Several projections of one input vector, each with its LoRA delta: the fused Q4_1
/// kernel when every base is Q4_1 and every adapter is in host memory, else one candle
/// `Linear::forward` each.
fn project<const N: usize>(
    x: &[f32],
    projections: [(&Linear, Option<&LoraPair>); N],
) -> candle_core::Result<[Vec<f32>; N]> {
    let fused = super::fused_q41(&projections);
    let outs = match fused {
        Some(jobs) => {
            let mut ys = q4_1::forward_many_host(x, x.len(), &jobs)?;
            for (y, (lin, _)) in ys.iter_mut().zip(&projections) {
                if let Some(b) = &lin.bias {
                    with_vec(b, |b| y.iter_mut().zip(b).for_each(|(y, b)| *y += b))?;
                }
            }
            ys
        }
        None => {
            let t = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
            projections
                .iter()
                .map(|(lin, lora)| {
                    lin.forward(&t, *lora)?
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        }
    };
    Ok(outs
        .try_into()
        .unwrap_or_else(|_| unreachable!("N projections in, N out")))
}

impl Llama {
    /// Whether [`Llama::decode_step`] applies to this call: one sequence, one token, on
    /// the CPU with f32 activations.
    pub(super) fn host_decode_applies(&self, tokens: &Tensor) -> bool {
        self.device.is_cpu()
            && self.embed.dtype() == DType::F32
            && self.norm.dtype() == DType::F32
            && tokens.dims() == [1, 1]
    }

    /// The logits `[1, vocab]` after `token`, appended to `cache`.
    pub(super) fn decode_step(
        &self,
        token: u32,
        cache: &mut Cache,
        adapter: Option<&LoraAdapter>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let pos = cache.len();
        if pos + 1 > cfg.max_position_embeddings {
            candle_core::bail!(
                "{} positions exceed the context window of {}",
                pos + 1,
                cfg.max_position_embeddings
            );
        }
        let hidden = cfg.hidden_size;
        let token = token as usize;
        let vocab = self.embed.dim(0)?;
        if token >= vocab {
            candle_core::bail!("token {token} is outside the vocabulary ({vocab})");
        }
        let mut x = with_host(&self.embed, |data, layout| {
            let row = layout.start_offset() + token * layout.stride()[0];
            data[row..row + hidden].to_vec()
        })?;
        let half = cfg.head_dim / 2;
        let (cos, sin) = (
            with_vec(&self.cos, |c| c[pos * half..(pos + 1) * half].to_vec())?,
            with_vec(&self.sin, |s| s[pos * half..(pos + 1) * half].to_vec())?,
        );
        for (i, block) in self.blocks.iter().enumerate() {
            let lora = adapter.and_then(|a| a.layer(i));
            self.block_step(block, &mut x, &cos, &sin, &mut cache.layers[i], lora)?;
        }
        let x = Tensor::from_vec(x, (1, 1, hidden), &Device::Cpu)?;
        self.logits(&x)?.squeeze(1)
    }

    fn block_step(
        &self,
        block: &Block,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        kv: &mut KvCache,
        lora: Option<&LayerLora>,
    ) -> candle_core::Result<()> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps as f32;
        let l = |p: Projection| lora.and_then(|l| l.get(p));

        let h = rms_norm(x, &block.attn_norm, eps)?;
        let [mut q, mut k, v] = project(
            &h,
            [
                (&block.q, l(Projection::Q)),
                (&block.k, l(Projection::K)),
                (&block.v, l(Projection::V)),
            ],
        )?;
        rope(&mut q, cfg.head_dim, cos, sin, cfg.rope_layout);
        rope(&mut k, cfg.head_dim, cos, sin, cfg.rope_layout);
        let kv_shape = (1, cfg.num_kv_heads, 1, cfg.head_dim);
        let (keys, values) = kv.append(
            &Tensor::from_vec(k, kv_shape, &Device::Cpu)?,
            &Tensor::from_vec(v, kv_shape, &Device::Cpu)?,
        )?;
        let att = attention(cfg, &q, &keys, &values)?;
        let [o] = project(&att, [(&block.o, l(Projection::O))])?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);

        let h = rms_norm(x, &block.ffn_norm, eps)?;
        let [gate, up] = project(
            &h,
            [
                (&block.gate, l(Projection::Gate)),
                (&block.up, l(Projection::Up)),
            ],
        )?;
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| silu_mul(g, u))
            .collect();
        let [down] = project(&act, [(&block.down, l(Projection::Down))])?;
        x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        Ok(())
    }
}

/// Causal attention of one query position over every cached position (`keys`, `values`:
/// `[1, kv_heads, positions, head_dim]` views of the cache), query heads sharing key/value
/// heads in groups as in `Llama::block_forward`. One work item per query head.
fn attention(
    cfg: &super::LlamaConfig,
    q: &[f32],
    keys: &Tensor,
    values: &Tensor,
) -> candle_core::Result<Vec<f32>> {
    let hd = cfg.head_dim;
    let n_rep = cfg.num_heads / cfg.num_kv_heads;
    let positions = keys.dim(2)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out_data = vec![0f32; cfg.num_heads * hd];
    let out = SharedBuf::new(&mut out_data);
    with_host(keys, |kd, kl| {
        with_host(values, |vd, vl| {
            let (ks, vs) = (kl.stride(), vl.stride());
            if ks[3] != 1 || vs[3] != 1 {
                candle_core::bail!("host decode: the KV cache rows are not contiguous");
            }
            let work = |head: usize| {
                let g = head / n_rep;
                let qh = &q[head * hd..(head + 1) * hd];
                let k_at = |j: usize| {
                    let s = kl.start_offset() + g * ks[1] + j * ks[2];
                    &kd[s..s + hd]
                };
                let v_at = |j: usize| {
                    let s = vl.start_offset() + g * vs[1] + j * vs[2];
                    &vd[s..s + hd]
                };
                let mut scores: Vec<f32> = (0..positions)
                    .map(|j| dot_f32(qh, k_at(j)) * scale)
                    .collect();
                let max = max_f32(&scores);
                let sum = exp_sub(&mut scores, max);
                // SAFETY: head `head`'s slice of the output belongs to this work item.
                #[allow(unsafe_code)]
                let dst = unsafe { out.slice_mut(head * hd..(head + 1) * hd) };
                for (j, p) in scores.iter().enumerate() {
                    let p = p / sum;
                    dst.iter_mut().zip(v_at(j)).for_each(|(o, v)| *o += p * v);
                }
            };
            pool_items(cfg.num_heads, work);
            Ok(())
        })?
    })??;
    Ok(out_data)
}
