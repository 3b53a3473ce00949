//! One decode step (one new token for each of a batch of sequences) on the CPU, in host
//! memory.
//!
//! At decode time every tensor but the weights is tiny (the 135M model's hidden state is
//! 576 floats), so the graph of small candle ops (norms, rope, reshapes, copies, the
//! attention's two matmuls, residual adds: about 35 per layer, each allocating its output)
//! costs as much as the arithmetic, and the pool's second thread spins through all of it.
//! This path keeps the hidden state in one `Vec<f32>`, does those steps as plain loops,
//! runs the projections through the fused Q4_1 kernel (LoRA included) and the attention
//! heads on the worker pool, and touches candle only for the KV cache append and the
//! output head.
//!
//! The engine runs prompts through it too, in any chunks and beside any other rows: a
//! token's numbers do not depend on the rows beside it or on how the tokens before it were
//! split into passes (each row is quantized, multiplied and reduced on its own), so a
//! reply is the same under any load and a cached prompt prefix changes nothing.
//! For GGUF files served by the engine (`Llama::kv_f16`, set by `LoadedModel::load`),
//! queries, keys and values are rounded to f16 as llama.cpp's f16 cache does (against
//! llama.cpp's logits on the default model's test prompt, the largest difference of a
//! top-5 logit's distance to the top one went from 0.167 to 0.129; the f32 candle path
//! has 0.154). Otherwise its numbers are those of the candle path
//! (`Llama::hidden_states`) up to float summation order; the tiny-model tests compare
//! both to the numpy reference.

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

/// candle's `rms_norm` of each row (of `width`) with the norm's weight tensor.
fn rms_norm_rows(x: &[f32], width: usize, w: &Tensor, eps: f32) -> candle_core::Result<Vec<f32>> {
    with_vec(w, |w| {
        x.chunks_exact(width)
            .flat_map(|row| rms_norm_row(row, w, eps))
            .collect()
    })
}

/// Rotate each `head_dim` slice of `x` by the angles of one position.
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], layout: RopeLayout) {
    for head in x.chunks_exact_mut(head_dim) {
        rotate_head(head, cos, sin, layout, 1.0);
    }
}

/// Several projections of the same rows (`xs`: rows of `cols`), each row with its own
/// LoRA pair (`pairs[p][row]`). Each weight is read once for all the rows: through the
/// fused Q4_1 kernel when every base is Q4_1 (a pair shared by every row rides along in
/// the kernel), else through candle's `Linear::forward`. Pairs that differ between rows
/// are added afterwards, row by row, from their host copies: the CPU counterpart of
/// Punica's SGMV, cheap next to the base weights at LoRA ranks.
fn project<const N: usize>(
    xs: &[f32],
    cols: usize,
    projections: [(&Linear, &[Option<&LoraPair>]); N],
) -> candle_core::Result<[Vec<f32>; N]> {
    let n = xs.len() / cols;
    let shared: Vec<Option<Option<&LoraPair>>> = projections
        .iter()
        .map(|(_, pairs)| one_pair(pairs))
        .collect();
    let base: Vec<(&Linear, Option<&LoraPair>)> = projections
        .iter()
        .zip(&shared)
        .map(|((lin, _), s)| (*lin, s.flatten()))
        .collect();
    let mut outs = match super::fused_q41(&base) {
        Some(jobs) => {
            let mut ys = q4_1::forward_many_host(xs, cols, &jobs)?;
            for (y, (lin, _)) in ys.iter_mut().zip(&base) {
                if let Some(b) = &lin.bias {
                    with_vec(b, |b| {
                        y.chunks_exact_mut(b.len())
                            .for_each(|y| y.iter_mut().zip(b).for_each(|(y, b)| *y += b))
                    })?;
                }
            }
            ys
        }
        None => {
            let t = Tensor::from_slice(xs, (n, cols), &Device::Cpu)?;
            base.iter()
                .map(|(lin, lora)| {
                    lin.forward(&t, *lora)?
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        }
    };
    // The per-row deltas, one work item per (projection, row) on the pool: each writes its
    // own row of its projection's output.
    let mixed: Vec<usize> = (0..N).filter(|&p| shared[p].is_none()).collect();
    if !mixed.is_empty() {
        let out_dims: Vec<usize> = outs.iter().map(|y| y.len() / n).collect();
        let bufs: Vec<SharedBuf> = outs.iter_mut().map(|y| SharedBuf::new(y)).collect();
        let failed = std::sync::Mutex::new(None);
        pool_items(mixed.len() * n, |item| {
            let (p, row) = (mixed[item / n], item % n);
            let (lin, pairs) = &projections[p];
            let Some(pair) = pairs[row] else { return };
            let out_dim = out_dims[p];
            let x = &xs[row * cols..(row + 1) * cols];
            // SAFETY: row `row` of projection `p`'s output is this item's alone.
            #[allow(unsafe_code)]
            let y = unsafe { bufs[p].slice_mut(row * out_dim..(row + 1) * out_dim) };
            match pair.host() {
                // The precision the fused kernel applies a pair in (f16 over Q4_1 bases),
                // so a row's numbers do not depend on the rows beside it.
                Some(h) if matches!(lin.weight, super::BaseWeight::Q41(_)) => {
                    q4_1::add_lora_f16(h, x, y)
                }
                Some(h) => h.add_delta(x, y),
                None => {
                    let d = Tensor::from_slice(x, (1, cols), &Device::Cpu)
                        .and_then(|t| pair.delta(&t))
                        .and_then(|d| d.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>());
                    match d {
                        Ok(d) => y.iter_mut().zip(d).for_each(|(y, d)| *y += d),
                        Err(e) => *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
                    }
                }
            }
        });
        drop(bufs);
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
    }
    Ok(outs
        .try_into()
        .unwrap_or_else(|_| unreachable!("N projections in, N out")))
}

/// The pair every row uses (`Some(None)`: none of them has one), or `None` when rows
/// differ.
fn one_pair<'a>(pairs: &[Option<&'a LoraPair>]) -> Option<Option<&'a LoraPair>> {
    let first = *pairs.first()?;
    let same = |p: &Option<&LoraPair>| match (p, first) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(*a, b),
        _ => false,
    };
    pairs.iter().all(same).then_some(first)
}

/// One sequence in a batch: the tokens it appends (one when decoding, a prompt chunk
/// when prefilling), its cache and its adapter.
pub struct BatchRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut Cache,
    pub adapter: Option<&'a LoraAdapter>,
}

/// Where each token of a batch comes from: its sequence and its position there.
struct TokenPlace {
    row: usize,
    pos: usize,
}

impl Llama {
    /// Whether [`Llama::forward_batch`] runs on host memory (CPU, f32 activations); other
    /// devices run each row through [`Llama::forward`].
    pub(super) fn host_decode_applies(&self) -> bool {
        self.device.is_cpu() && self.embed.dtype() == DType::F32 && self.norm.dtype() == DType::F32
    }

    /// One forward pass for several sequences at once (continuous batching): each row
    /// appends its tokens to its own cache, after its own positions, and runs on its own
    /// adapter (or none); decode steps and prompt chunks ride together. Every weight is
    /// read once for the whole batch. Returns each row's logits after its last token, in
    /// row order.
    pub fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> candle_core::Result<Vec<Vec<f32>>> {
        if rows.iter().any(|r| r.tokens.is_empty()) {
            candle_core::bail!("a batch row has no tokens");
        }
        if !self.host_decode_applies() {
            return rows
                .iter_mut()
                .map(|r| {
                    let t = Tensor::new(r.tokens, &self.device)?.unsqueeze(0)?;
                    self.forward(&t, r.cache, r.adapter)?
                        .squeeze(0)?
                        .to_vec1::<f32>()
                })
                .collect();
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let cfg = &self.config;
        let (hidden, half) = (cfg.hidden_size, cfg.head_dim / 2);
        let vocab = self.embed.dim(0)?;
        let total: usize = rows.iter().map(|r| r.tokens.len()).sum();
        let mut x = Vec::with_capacity(total * hidden);
        let (mut cos, mut sin) = (
            Vec::with_capacity(total * half),
            Vec::with_capacity(total * half),
        );
        let mut places = Vec::with_capacity(total);
        for (ri, r) in rows.iter().enumerate() {
            let start = r.cache.len();
            if start + r.tokens.len() > cfg.max_position_embeddings {
                candle_core::bail!(
                    "{} positions exceed the context window of {}",
                    start + r.tokens.len(),
                    cfg.max_position_embeddings
                );
            }
            for (j, &token) in r.tokens.iter().enumerate() {
                let (token, pos) = (token as usize, start + j);
                if token >= vocab {
                    candle_core::bail!("token {token} is outside the vocabulary ({vocab})");
                }
                with_host(&self.embed, |data, layout| {
                    let row = layout.start_offset() + token * layout.stride()[0];
                    x.extend_from_slice(&data[row..row + hidden]);
                })?;
                with_vec(&self.cos, |c| {
                    cos.extend_from_slice(&c[pos * half..(pos + 1) * half])
                })?;
                with_vec(&self.sin, |s| {
                    sin.extend_from_slice(&s[pos * half..(pos + 1) * half])
                })?;
                places.push(TokenPlace { row: ri, pos });
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let loras: Vec<Option<&LayerLora>> = places
                .iter()
                .map(|p| rows[p.row].adapter.and_then(|a| a.layer(i)))
                .collect();
            let mut kvs: Vec<&mut KvCache> =
                rows.iter_mut().map(|r| &mut r.cache.layers[i]).collect();
            self.block_step(block, &mut x, &cos, &sin, &places, &mut kvs, &loras)?;
        }
        // The hidden state after each row's last token.
        let mut last = Vec::with_capacity(rows.len() * hidden);
        let mut end = 0;
        for r in rows.iter() {
            end += r.tokens.len();
            last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
        }
        self.logits_host(&last)
    }

    /// Final norm and output projection of host rows of `hidden`: on the host through the
    /// Q8_0 kernel when the head is Q8_0, else through candle.
    fn logits_host(&self, last: &[f32]) -> candle_core::Result<Vec<Vec<f32>>> {
        let hidden = self.config.hidden_size;
        let n = last.len() / hidden;
        if let super::BaseWeight::Q80(head) = &self.lm_head.weight {
            let eps = self.config.rms_norm_eps as f32;
            let x = rms_norm_rows(last, hidden, &self.norm, eps)?;
            return head.forward_rows(&x);
        }
        let x = Tensor::from_slice(last, (n, 1, hidden), &Device::Cpu)?;
        self.logits(&x)?.squeeze(1)?.to_vec2::<f32>()
    }

    /// One block for every token of the batch (`x`: rows of `hidden`, one per token,
    /// updated in place; `loras`: each token's row's layer adapter).
    #[allow(clippy::too_many_arguments)]
    fn block_step(
        &self,
        block: &Block,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        places: &[TokenPlace],
        kvs: &mut [&mut KvCache],
        loras: &[Option<&LayerLora>],
    ) -> candle_core::Result<()> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps as f32;
        let hidden = cfg.hidden_size;
        let half = cfg.head_dim / 2;
        let pairs = |p: Projection| -> Vec<Option<&LoraPair>> {
            loras.iter().map(|l| l.and_then(|l| l.get(p))).collect()
        };
        let (pq, pk, pv, po) = (
            pairs(Projection::Q),
            pairs(Projection::K),
            pairs(Projection::V),
            pairs(Projection::O),
        );
        let (pg, pu, pd) = (
            pairs(Projection::Gate),
            pairs(Projection::Up),
            pairs(Projection::Down),
        );

        let h = rms_norm_rows(x, hidden, &block.attn_norm, eps)?;
        let [mut q, mut k, v] = project(
            &h,
            hidden,
            [(&block.q, &pq), (&block.k, &pk), (&block.v, &pv)],
        )?;
        let (qd, kd) = (cfg.q_dim(), cfg.num_kv_heads * cfg.head_dim);
        for (t, (q, k)) in q
            .chunks_exact_mut(qd)
            .zip(k.chunks_exact_mut(kd))
            .enumerate()
        {
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            rope(q, cfg.head_dim, c, s, cfg.rope_layout);
            rope(k, cfg.head_dim, c, s, cfg.rope_layout);
        }
        // Queries, keys and values at f16 precision where the model asks for it, as
        // llama.cpp keeps its cache and rounds the queries for their products with it (see
        // the module doc).
        let mut v = v;
        if self.kv_f16 {
            for m in [&mut q, &mut k, &mut v] {
                round_to_f16(m);
            }
        }
        // Each row's new keys and values into its cache, `[1, kv_heads, tokens, head_dim]`.
        let mut cached = Vec::with_capacity(kvs.len());
        let mut first = 0;
        for (ri, kv) in kvs.iter_mut().enumerate() {
            let n = places[first..].iter().take_while(|p| p.row == ri).count();
            let shape = (1, n, cfg.num_kv_heads, cfg.head_dim);
            let part = |m: &[f32]| -> candle_core::Result<Tensor> {
                Tensor::from_slice(&m[first * kd..(first + n) * kd], shape, &Device::Cpu)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            cached.push(kv.append(&part(&k)?, &part(&v)?)?);
            first += n;
        }
        let att = attention(cfg, &q, places, &cached)?;
        let [o] = project(&att, qd, [(&block.o, &po)])?;
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);

        let h = rms_norm_rows(x, hidden, &block.ffn_norm, eps)?;
        let [gate, up] = project(&h, hidden, [(&block.gate, &pg), (&block.up, &pu)])?;
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| silu_mul(g, u))
            .collect();
        let [down] = project(&act, cfg.intermediate_size, [(&block.down, &pd)])?;
        x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        Ok(())
    }
}

/// Each value rounded to the nearest f16 (kept as f32).
fn round_to_f16(xs: &mut [f32]) {
    for x in xs {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

/// Causal attention of each token's query (`q`: one row of `num_heads * head_dim` per
/// token) over its sequence's cached positions up to its own (`cached[row]`: `[1,
/// kv_heads, positions, head_dim]` views of that row's cache, this batch's keys
/// included), query heads sharing key/value heads in groups as in `Llama::block_forward`.
/// One work item per token and query head, in one trip through the worker pool.
fn attention(
    cfg: &super::LlamaConfig,
    q: &[f32],
    places: &[TokenPlace],
    cached: &[(Tensor, Tensor)],
) -> candle_core::Result<Vec<f32>> {
    let hd = cfg.head_dim;
    let heads = cfg.num_heads;
    let n_rep = heads / cfg.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Read access to every row's keys and values for the whole pool trip.
    let guards: Vec<_> = cached
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let mut rows = Vec::with_capacity(guards.len());
    for ((ks, kl), (vs, vl)) in &guards {
        let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&**ks, &**vs)
        else {
            candle_core::bail!("host decode: expected an f32 CPU KV cache");
        };
        if kl.stride()[3] != 1 || vl.stride()[3] != 1 {
            candle_core::bail!("host decode: the KV cache rows are not contiguous");
        }
        rows.push((kd.as_slice(), *kl, vd.as_slice(), *vl));
    }
    let mut out_data = vec![0f32; places.len() * heads * hd];
    let out = SharedBuf::new(&mut out_data);
    let work = |item: usize| {
        let (t, head) = (item / heads, item % heads);
        let place = &places[t];
        let (kd, kl, vd, vl) = rows[place.row];
        let (ks, vs) = (kl.stride(), vl.stride());
        let g = head / n_rep;
        let at = (t * heads + head) * hd;
        let qh = &q[at..at + hd];
        let k_at = |j: usize| {
            let s = kl.start_offset() + g * ks[1] + j * ks[2];
            &kd[s..s + hd]
        };
        let v_at = |j: usize| {
            let s = vl.start_offset() + g * vs[1] + j * vs[2];
            &vd[s..s + hd]
        };
        // Causal: the token sees its sequence's positions up to its own.
        let mut scores: Vec<f32> = (0..=place.pos)
            .map(|j| dot_f32(qh, k_at(j)) * scale)
            .collect();
        let max = max_f32(&scores);
        let sum = exp_sub(&mut scores, max);
        // SAFETY: this token's head `head` slice of the output belongs to this work item.
        #[allow(unsafe_code)]
        let dst = unsafe { out.slice_mut(at..at + hd) };
        for (j, p) in scores.iter().enumerate() {
            let p = p / sum;
            dst.iter_mut().zip(v_at(j)).for_each(|(o, v)| *o += p * v);
        }
    };
    pool_items(places.len() * heads, work);
    Ok(out_data)
}
