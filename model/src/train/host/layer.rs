//! One layer's forward and backward on the host path, and what its backward keeps.

use super::attention::{Dims, attn_bwd, attn_fwd};
use super::lora::{LoraGroup, lora_bwd, lora_fwd, lora_groups, vec_of};
use crate::kernels::exp::{silu_mul, silu_mul_grad};
use crate::kernels::gemm::{dy_w, x_wt};
use crate::kernels::norm::{rms_bwd_add, rms_fwd};
use crate::kernels::pool::{BufPool, par_rows};
use crate::kernels::rope::rope_rows;
use crate::llama::Projection;
use crate::train::batch::{Grads, HostBatch};
use crate::train::ctx::Ctx;
use crate::train::fused;
use crate::train::profile;
use candle_core::{Result, Tensor};

/// Add `bias` to columns `col..col + bias.len()` of every `ld`-long row.
pub(super) fn add_bias(buf: &mut [f32], ld: usize, col: usize, bias: Option<&[f32]>) {
    let Some(bias) = bias else { return };
    for row in buf.chunks_mut(ld) {
        for (o, b) in row[col..col + bias.len()].iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// What the forward of one layer keeps for its backward.
pub(crate) struct HostCache {
    pub(super) x: Tensor,
    pub(super) r1: Vec<f32>,
    pub(super) h1: Vec<f32>,
    /// After bias, LoRA and rope: what attention read.
    pub(super) qkv: Vec<f32>,
    pub(super) p: Vec<f32>,
    pub(super) y: Vec<f32>,
    pub(super) x2: Vec<f32>,
    pub(super) r2: Vec<f32>,
    pub(super) h2: Vec<f32>,
    /// `[n, gate | up]`.
    pub(super) gu: Vec<f32>,
    pub(super) act: Vec<f32>,
    pub(super) lora: LayerLora,
}

impl HostCache {
    /// Hand the buffers back to `bufs`.
    pub(super) fn recycle(self, bufs: &BufPool) {
        let l = self.lora;
        for v in [
            self.r1, self.h1, self.qkv, self.p, self.y, self.x2, self.r2, self.h2, self.gu,
            self.act,
        ] {
            bufs.put(v);
        }
        for g in [l.qkv, l.o, l.gate_up, l.down].into_iter().flatten() {
            bufs.put(g.u);
        }
    }
}

/// A layer's LoRA groups, by the input they read.
pub(super) struct LayerLora {
    pub(super) qkv: Vec<LoraGroup>,
    pub(super) o: Vec<LoraGroup>,
    pub(super) gate_up: Vec<LoraGroup>,
    pub(super) down: Vec<LoraGroup>,
}

impl LayerLora {
    pub(super) fn of(ctx: &Ctx, i: usize, d: &Dims) -> Result<Self> {
        Ok(Self {
            qkv: lora_groups(ctx, i, &d.qkv_parts())?,
            o: lora_groups(ctx, i, &[(Projection::O, 0, d.h)])?,
            gate_up: lora_groups(ctx, i, &d.gate_up_parts())?,
            down: lora_groups(ctx, i, &[(Projection::Down, 0, d.h)])?,
        })
    }
}

/// [`lora_fwd`] for each of `groups`.
pub(super) fn lora_fwd_all(
    groups: &mut [LoraGroup],
    x: &[f32],
    n: usize,
    s: f32,
    mut dst: Option<(&mut [f32], usize)>,
    bufs: &BufPool,
) {
    for g in groups {
        let dst = dst.as_mut().map(|(d, ld)| (&mut **d, *ld));
        profile::time("fwd lora", || lora_fwd(x, n, g, s, dst, bufs));
    }
}

pub(super) fn bias_of(ctx: &Ctx, i: usize, p: Projection) -> Result<Option<Vec<f32>>> {
    ctx.model.blocks[i].proj[p.index()]
        .b
        .as_ref()
        .map(vec_of)
        .transpose()
}

pub(super) fn missing(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("host training path: {what}"))
}

/// What a layer's forward and backward read: the shapes, the batch's host data, the
/// stacked and single weights, the two norms' gains.
pub(super) struct LayerW<'a> {
    pub(super) d: Dims,
    pub(super) hb: &'a HostBatch,
    pub(super) wqkv: &'a Tensor,
    pub(super) wgu: &'a Tensor,
    pub(super) wo: &'a Tensor,
    pub(super) wd: &'a Tensor,
    pub(super) g1: Vec<f32>,
    pub(super) g2: Vec<f32>,
}

impl<'a> LayerW<'a> {
    pub(super) fn of(ctx: &'a Ctx, i: usize) -> Result<Self> {
        let blk = &ctx.model.blocks[i];
        let stacked = |t: &'a Option<Tensor>, what: &str| t.as_ref().ok_or_else(|| missing(what));
        Ok(Self {
            d: Dims::of(ctx),
            hb: ctx
                .batch
                .host
                .as_ref()
                .ok_or_else(|| missing("no host batch"))?,
            wqkv: stacked(&blk.fused_qkv, "q/k/v not stacked")?,
            wgu: stacked(&blk.fused_gate_up, "gate/up not stacked")?,
            wo: &blk.proj[Projection::O.index()].w,
            wd: &blk.proj[Projection::Down.index()].w,
            g1: vec_of(&blk.attn_norm)?,
            g2: vec_of(&blk.ffn_norm)?,
        })
    }
}

/// What a layer's forward keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing (evaluation).
    Nothing,
    /// The residual between its attention and its MLP (the forward under gradient
    /// checkpointing: with the layer's input, the two sub-blocks' inputs).
    Mid,
    /// All that its backward needs.
    All,
}

/// What [`layer_fwd`] returns: the layer's output (`None` from a recomputation), what its
/// backward needs (with [`Keep::All`] and on recomputation), the mid-layer residual (with
/// [`Keep::Mid`]).
pub(crate) struct LayerOut {
    pub y: Option<Tensor>,
    pub cache: Option<HostCache>,
    pub mid: Option<Vec<f32>>,
}

/// One layer's forward from its input `x`.
///
/// With `mid`, the residual between attention and MLP that the checkpointing forward
/// kept, it is the recomputation for the backward: each residual sub-block (attention,
/// MLP) is recomputed from its own input, so the o and down products, whose outputs are
/// only ever added to the residual stream that is already kept, are not run again
/// (their LoRA `x A^T`, which the backward reads, is).
pub(crate) fn layer_fwd(
    ctx: &Ctx,
    i: usize,
    x: &Tensor,
    keep: Keep,
    mid: Option<Vec<f32>>,
) -> Result<LayerOut> {
    let m = ctx.model;
    let LayerW {
        d,
        hb,
        wqkv,
        wgu,
        wo,
        wd,
        g1,
        g2,
    } = LayerW::of(ctx, i)?;
    let eps = m.config.rms_norm_eps as f32;
    let s = ctx.scale() as f32;
    let mut lora = LayerLora::of(ctx, i, &d)?;
    let mut bias: [Option<Vec<f32>>; 7] = Default::default();
    for p in Projection::ALL {
        bias[p.index()] = bias_of(ctx, i, p)?;
    }
    let (n, h, inter) = (d.n, d.h, d.inter);
    let recompute = mid.is_some();
    let keep_all = keep == Keep::All || recompute;
    // From a generic layer below (`freeze`), `x` may be a strided view.
    let x = &x.contiguous()?;
    let x_in = x.clone();
    let bufs = &m.host_bufs;
    let (x3, x2, cache) = fused::host_f32(&[x, wqkv, wo, wgu, wd], |sl| -> Result<_> {
        let [x, wqkv, wo, wgu, wd] = sl else {
            unreachable!("five tensors in, five slices out")
        };
        // Attention.
        let (h1, r1) = rms_fwd(x, &g1, eps, h, bufs.dirty(n * h));
        let mut qkv = bufs.dirty(n * d.wq);
        profile::time("fwd x W^T", || x_wt(&mut qkv, false, &h1, wqkv, n, d.wq, h));
        for (p, col, _) in d.qkv_parts() {
            add_bias(&mut qkv, d.wq, col, bias[p.index()].as_deref());
        }
        lora_fwd_all(&mut lora.qkv, &h1, n, s, Some((&mut qkv, d.wq)), bufs);
        // The k heads follow the q heads in a row: one pass rotates both.
        rope_rows(
            &mut qkv,
            d.wq,
            0,
            d.nh + d.kvh,
            d.hd,
            &hb.cos,
            &hb.sin,
            false,
        );
        let (y, p) = profile::time("fwd attn", || attn_fwd(&qkv, d, hb, bufs));
        let x2 = match mid {
            Some(x2) => {
                lora_fwd_all(&mut lora.o, &y, n, s, None, bufs);
                x2
            }
            None => {
                let mut x2 = bufs.copy_of(x);
                profile::time("fwd x W^T", || x_wt(&mut x2, true, &y, wo, n, h, d.dq));
                add_bias(&mut x2, h, 0, bias[Projection::O.index()].as_deref());
                lora_fwd_all(&mut lora.o, &y, n, s, Some((&mut x2, h)), bufs);
                x2
            }
        };

        // MLP.
        let (h2, r2) = rms_fwd(&x2, &g2, eps, h, bufs.dirty(n * h));
        let mut gu = bufs.dirty(n * 2 * inter);
        profile::time("fwd x W^T", || {
            x_wt(&mut gu, false, &h2, wgu, n, 2 * inter, h)
        });
        for (p, col, _) in d.gate_up_parts() {
            add_bias(&mut gu, 2 * inter, col, bias[p.index()].as_deref());
        }
        lora_fwd_all(
            &mut lora.gate_up,
            &h2,
            n,
            s,
            Some((&mut gu, 2 * inter)),
            bufs,
        );
        let mut act = bufs.dirty(n * inter);
        par_rows(&mut act, inter, |r, a| {
            let row = &gu[r * 2 * inter..(r + 1) * 2 * inter];
            let (g, u) = row.split_at(inter);
            for ((o, gv), uv) in a.iter_mut().zip(g).zip(u) {
                *o = silu_mul(*gv, *uv);
            }
        });
        let x3 = if recompute {
            lora_fwd_all(&mut lora.down, &act, n, s, None, bufs);
            None
        } else {
            let mut x3 = x2.clone();
            profile::time("fwd x W^T", || x_wt(&mut x3, true, &act, wd, n, h, inter));
            add_bias(&mut x3, h, 0, bias[Projection::Down.index()].as_deref());
            lora_fwd_all(&mut lora.down, &act, n, s, Some((&mut x3, h)), bufs);
            Some(x3)
        };
        let mut cache = HostCache {
            x: x_in,
            r1,
            h1,
            qkv,
            p,
            y,
            x2,
            r2,
            h2,
            gu,
            act,
            lora,
        };
        if keep_all {
            return Ok((x3, None, Some(cache)));
        }
        let mid = (keep == Keep::Mid).then(|| std::mem::take(&mut cache.x2));
        cache.recycle(bufs);
        Ok((x3, mid, None))
    })
    .ok_or_else(|| missing("weights not contiguous f32 on the CPU"))??;
    Ok(LayerOut {
        y: x3
            .map(|v| Tensor::from_vec(v, (n, h), &m.device))
            .transpose()?,
        cache,
        mid: x2,
    })
}

/// One layer's backward: `dx3` in, the input gradient out (`None` without `need_dx`);
/// the cache's buffers go back to the model's pool.
pub(crate) fn layer_bwd(
    ctx: &Ctx,
    i: usize,
    c: HostCache,
    dx3: &Tensor,
    need_dx: bool,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
    let m = ctx.model;
    let w = LayerW::of(ctx, i)?;
    let (d, hb) = (w.d, w.hb);
    let (n, h, inter) = (d.n, d.h, d.inter);
    let bufs = &m.host_bufs;
    let dx3 = &dx3.contiguous()?;
    let dx = fused::host_f32(&[dx3, &c.x, w.wqkv, w.wo, w.wgu, w.wd], |sl| -> Result<_> {
        let [dx3, x, wqkv, wo, wgu, wd] = sl else {
            unreachable!("six tensors in, six slices out")
        };

        // MLP.
        let mut da = bufs.dirty(n * inter);
        profile::time("bwd dy W", || dy_w(&mut da, dx3, wd, n, h, inter));
        for g in &c.lora.down {
            lora_bwd(ctx, i, &c.act, g, dx3, h, Some(&mut da), grads)?;
        }
        let w2 = 2 * inter;
        let mut dgu = bufs.dirty(n * w2);
        par_rows(&mut dgu, w2, |r, out| {
            let (g, u) = c.gu[r * w2..(r + 1) * w2].split_at(inter);
            let dr = &da[r * inter..(r + 1) * inter];
            let (dg, du) = out.split_at_mut(inter);
            for j in 0..inter {
                (dg[j], du[j]) = silu_mul_grad(g[j], u[j], dr[j]);
            }
        });
        bufs.put(da);
        let mut dh2 = bufs.dirty(n * h);
        profile::time("bwd dy W", || dy_w(&mut dh2, &dgu, wgu, n, w2, h));
        for g in &c.lora.gate_up {
            lora_bwd(ctx, i, &c.h2, g, &dgu, w2, Some(&mut dh2), grads)?;
        }
        bufs.put(dgu);
        let mut dx2 = dx3.to_vec();
        rms_bwd_add(&mut dx2, &c.x2, &c.r2, &w.g2, &dh2, h);
        bufs.put(dh2);

        // Attention.
        let mut dy = bufs.dirty(n * d.dq);
        profile::time("bwd dy W", || dy_w(&mut dy, &dx2, wo, n, h, d.dq));
        for g in &c.lora.o {
            lora_bwd(ctx, i, &c.y, g, &dx2, h, Some(&mut dy), grads)?;
        }
        let mut dqkv = profile::time("bwd attn", || attn_bwd(&c.qkv, &c.p, &dy, d, hb, bufs));
        bufs.put(dy);
        rope_rows(
            &mut dqkv,
            d.wq,
            0,
            d.nh + d.kvh,
            d.hd,
            &hb.cos,
            &hb.sin,
            true,
        );
        let mut dh1 = if need_dx {
            let mut dh1 = bufs.dirty(n * h);
            profile::time("bwd dy W", || dy_w(&mut dh1, &dqkv, wqkv, n, d.wq, h));
            Some(dh1)
        } else {
            None
        };
        for g in &c.lora.qkv {
            lora_bwd(ctx, i, &c.h1, g, &dqkv, d.wq, dh1.as_deref_mut(), grads)?;
        }
        bufs.put(dqkv);
        Ok(dh1.map(|dh1| {
            rms_bwd_add(&mut dx2, x, &c.r1, &w.g1, &dh1, h);
            bufs.put(dh1);
            dx2
        }))
    })
    .ok_or_else(|| missing("tensors not contiguous f32 on the CPU"))??;
    c.recycle(bufs);
    dx.map(|v| Tensor::from_vec(v, (n, h), &m.device))
        .transpose()
}
