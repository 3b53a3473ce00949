//! A llama layer's forward and backward on candle tensors (any device and dtype), and
//! on the f32 host path where it applies; what each keeps for the backward pass.

use super::batch::{BaseTrain, Grads};
use super::ctx::Ctx;
use super::dense::{DenseLinear, base_name, norm_name};
use super::fused;
use super::host;
use super::host::Keep;
use super::lora_params::LoraAb;
use super::ops::{
    LoraSaved, is_half, linear_fwd, mm, rms_norm, rms_norm_bwd, silu_parts, softmax_last_dim,
};
use crate::llama::Projection;
use crate::lora::peft_name;
use candle_core::Result;
use candle_core::{D, DType, Tensor};

/// What the forward of one layer keeps for its backward.
pub(super) struct LayerCache {
    pub(super) x: Tensor,
    pub(super) h1: Tensor,
    pub(super) qf: Tensor,
    pub(super) kr: Tensor,
    pub(super) v4: Tensor,
    pub(super) p: Tensor,
    pub(super) y: Tensor,
    pub(super) x2: Tensor,
    pub(super) h2: Tensor,
    pub(super) gate: Tensor,
    pub(super) up: Tensor,
    pub(super) act: Tensor,
    pub(super) lora: [Option<LoraSaved>; 7],
}

/// A layer's checkpoint under gradient checkpointing: its input and, on the f32 host
/// path, the residual between its attention and its MLP, so that each residual sub-block
/// is recomputed from its own input (see [`host::layer_fwd`]).
pub(super) struct LayerCheckpoint {
    pub(super) x: Tensor,
    pub(super) mid: Option<Vec<f32>>,
}

/// What a layer's forward kept: from the generic graph or from the f32 host path.
pub(super) enum Saved {
    Generic(Box<LayerCache>),
    Host(Box<host::HostCache>),
}

pub(super) struct LinBwd<'a> {
    pub(super) layer: usize,
    pub(super) p: Projection,
    pub(super) l: &'a DenseLinear,
    pub(super) lora: Option<&'a LoraAb>,
    pub(super) scale: f64,
    pub(super) base_trainable: bool,
    pub(super) need_dx: bool,
}

impl LinBwd<'_> {
    /// Input gradient of one projection; parameter gradients go to `grads`.
    pub(super) fn run(
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
    /// Query heads, key/value heads, head size, and query heads per key/value head.
    fn heads(&self) -> (usize, usize, usize, usize) {
        let c = &self.model.config;
        let (nh, kvh) = (c.num_heads, c.num_kv_heads);
        (nh, kvh, c.head_dim, nh / kvh)
    }

    /// Whether layer `i` runs on the f32 host path (`host`: the pass qualifies; the
    /// layer's base weights must also be frozen and stacked).
    pub(super) fn on_host(&self, i: usize, host: bool, train: &BaseTrain) -> bool {
        let blk = &self.model.blocks[i];
        host && i < train.first_layer && blk.fused_qkv.is_some() && blk.fused_gate_up.is_some()
    }

    /// One block's forward, through the f32 host path where it applies: its output, what
    /// its backward needs (with [`Keep::All`]) and its checkpoint (with [`Keep::Mid`]).
    pub(super) fn any_layer_fwd(
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
    pub(super) fn layer_recompute(
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
    pub(super) fn layer_fwd(
        &self,
        i: usize,
        x: &Tensor,
        keep: bool,
    ) -> Result<(Tensor, Option<LayerCache>)> {
        let m = self.model;
        let cfg = &m.config;
        let blk = &m.blocks[i];
        let (b, t) = (self.batch.batch, self.batch.seq);
        let (nh, kvh, hd, n_rep) = self.heads();
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
    pub(super) fn layer_bwd(
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
        let (nh, kvh, hd, n_rep) = self.heads();
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
