//! The f32 CPU path of the training graph, for layers whose base weights are frozen (LoRA
//! training, and the frozen layers of `freeze`), and for the output head when it is
//! frozen: the same arithmetic as the generic candle graph in `mod.rs` (which stays the
//! path for CUDA, bf16, f64 and trainable base weights, and the reference the tests check
//! this one against), organised for two CPU cores:
//!
//! - q/k/v are one matrix product with the stacked `[q; k; v]` weights, and so are gate
//!   and up; the LoRA `B` products accumulate straight into the projection's output and
//!   the residual products into a copy of the residual, through `gemm` with strides (no
//!   transposed or contiguous copies, no separate add passes);
//! - attention works on the `[tokens, q | k | v]` rows as they are, one (sequence, head)
//!   at a time on the worker pool, in blocks of 64 query rows that only multiply the key
//!   columns a row can see (causal, and within its packed example), so the masked half of
//!   the scores is never computed;
//! - norms, rope, SiLU and the softmax are single passes over memory, with a vectorizable
//!   `exp`; the output head's softmax, loss, accuracy and gradient are one pass per row
//!   over its logits, which become the logits' gradient in place.

use super::batch::{Grads, HostBatch, PassStats, TrainBatch};
use super::ctx::Ctx;
use super::dense::DenseLlama;
use super::dropout::Dropout;
use super::fused;
use super::lora_params::LoraParams;
use super::profile;
use crate::kernels::exp::{exp_sub, silu_mul, silu_mul_grad};
use crate::kernels::gemm::{View, gemm};
use crate::kernels::norm::{rms_bwd_add, rms_fwd};
use crate::kernels::pool::{BufPool, par_rows, pool_items};
use crate::kernels::reduce::{dot_f32, max_f32};
use crate::kernels::rope::rope_rows;
use crate::kernels::shared::SharedBuf;
use crate::llama::Projection;
use crate::lora::peft_name;
use candle_core::{DType, Result, Tensor};
use std::sync::Mutex;

/// Query rows per attention block.
const BLK: usize = 64;
/// Scored rows of the output head at once (bounds the `[rows, vocab]` logits buffer).
const HEAD_CHUNK: usize = 512;

/// Whether the host path runs this pass: f32 on the CPU, f32 LoRA weights, a batch it
/// can mask.
pub(super) fn applies(model: &DenseLlama, lora: Option<&LoraParams>, batch: &TrainBatch) -> bool {
    model.device.is_cpu()
        && model.dtype == DType::F32
        && batch.host.is_some()
        && lora.is_none_or(|l| {
            l.layers.iter().flatten().flatten().all(|ab| {
                ab.a.dtype() == DType::F32
                    && ab.b.dtype() == DType::F32
                    && ab.a.device().is_cpu()
                    && ab.b.device().is_cpu()
            })
        })
}

// ---------------------------------------------------------------------------------------
// Element-wise passes.

/// Add `bias` to columns `col..col + bias.len()` of every `ld`-long row.
fn add_bias(buf: &mut [f32], ld: usize, col: usize, bias: Option<&[f32]>) {
    let Some(bias) = bias else { return };
    for row in buf.chunks_mut(ld) {
        for (o, b) in row[col..col + bias.len()].iter_mut().zip(bias) {
            *o += b;
        }
    }
}

// ---------------------------------------------------------------------------------------
// LoRA.

/// One projection of a [`LoraGroup`]: its `B` `[out, r]`, where its rank's columns sit in
/// the group's `u`, where its output columns sit in the output rows.
struct Member {
    p: Projection,
    b: Vec<f32>,
    r: usize,
    /// First column in `u`.
    uc: usize,
    /// First column and width in the output rows.
    col: usize,
    out: usize,
}

/// The LoRA of projections that read the same input (q/k/v, or gate/up) and draw no
/// dropout: their `A`s stacked, so `x A^T`, the `A` gradient and `dx += du A` are one
/// product each for the group instead of one per projection (the rank-16 products are
/// thin, and three thin ones cost more than one three times as wide). With dropout
/// each projection draws its own mask, as in PEFT, and is a group of one.
pub(super) struct LoraGroup {
    members: Vec<Member>,
    /// The members' `A`s stacked, `[rt, in]`.
    a: Vec<f32>,
    rt: usize,
    /// `u = x_d A^T`, `[n, rt]`.
    u: Vec<f32>,
    /// The dropout, when it is on (its mask is recomputed, not stored).
    dropout: Option<Dropout>,
}

/// The LoRA groups of the projections `parts` (each with its first column and width in
/// the output rows) of layer `i`; the projections without LoRA are left out.
fn lora_groups(
    ctx: &Ctx,
    i: usize,
    parts: &[(Projection, usize, usize)],
) -> Result<Vec<LoraGroup>> {
    let mut groups: Vec<LoraGroup> = Vec::new();
    for &(p, col, out) in parts {
        let Some(ab) = ctx.lora_of(i, p) else {
            continue;
        };
        let dropout = ctx
            .dropout(i, p)
            .filter(|(pr, _)| *pr > 0.0)
            .map(|(pr, seed)| Dropout::new(pr, seed));
        let (a, b) = (vec_of(&ab.a)?, vec_of(&ab.b)?);
        let r = ab.a.dim(0)?;
        let joins = dropout.is_none() && groups.last().is_some_and(|g| g.dropout.is_none());
        if !joins {
            groups.push(LoraGroup {
                members: Vec::new(),
                a: Vec::new(),
                rt: 0,
                u: Vec::new(),
                dropout,
            });
        }
        let g = groups.last_mut().expect("pushed above");
        g.members.push(Member {
            p,
            b,
            r,
            uc: g.rt,
            col,
            out,
        });
        g.a.extend_from_slice(&a);
        g.rt += r;
    }
    Ok(groups)
}

/// `x` after the dropout mask, or `x` itself.
fn dropped<'a>(x: &'a [f32], dropout: Option<&Dropout>, owned: &'a mut Vec<f32>) -> &'a [f32] {
    match dropout {
        Some(d) => {
            *owned = d.apply(x);
            owned
        }
        None => x,
    }
}

/// `u = x_d A^T` for `x` `[n, in]` and, with `dst` (`ld`-long rows), each member's
/// `dst[:, col..col + out] += s u_m B_m^T`; without `dst` (a recomputation whose output is
/// already kept) only `u`, which the backward needs.
fn lora_fwd(
    x: &[f32],
    n: usize,
    g: &mut LoraGroup,
    s: f32,
    dst: Option<(&mut [f32], usize)>,
    bufs: &BufPool,
) {
    let inp = x.len() / n;
    let mut owned = Vec::new();
    let xd = dropped(x, g.dropout.as_ref(), &mut owned);
    let rt = g.rt;
    let mut u = bufs.dirty(n * rt);
    let a_t = View::rm(0, rt, inp, inp).t();
    gemm(
        &mut u,
        View::rm(0, n, rt, rt),
        false,
        xd,
        View::rm(0, n, inp, inp),
        &g.a,
        a_t,
        1.0,
        true,
    );
    if let Some((dst, ld)) = dst {
        for m in &g.members {
            let b_t = View::rm(0, m.out, m.r, m.r).t();
            let uv = View::rm(m.uc, n, m.r, rt);
            let dv = View::rm(m.col, n, m.out, ld);
            gemm(dst, dv, true, &u, uv, &m.b, b_t, s, true);
        }
    }
    g.u = u;
}

/// LoRA gradients of one group into `grads`, and `dx += (s dy B) A` (through the dropout
/// mask) when `dx` is given. `x` `[n, in]` is the group's input, `dy` the gradient of
/// its output rows (`ld` long).
#[allow(clippy::too_many_arguments)]
fn lora_bwd(
    ctx: &Ctx,
    layer: usize,
    x: &[f32],
    g: &LoraGroup,
    dy: &[f32],
    ld: usize,
    dx: Option<&mut [f32]>,
    grads: &mut Grads,
) -> Result<()> {
    let n = dy.len() / ld;
    let (inp, rt) = (x.len() / n, g.rt);
    let s = ctx.scale() as f32;
    let dev = &ctx.model.device;
    profile::time("bwd lora", || -> Result<()> {
        // dB = s dy^T u and du = s dy B, per member; du lands in its columns of `du`.
        let bufs = &ctx.model.host_bufs;
        let mut du = bufs.dirty(n * rt);
        for m in &g.members {
            let dyv = View::rm(m.col, n, m.out, ld);
            let uv = View::rm(m.uc, n, m.r, rt);
            let mut gb = vec![0f32; m.out * m.r];
            let gbv = View::rm(0, m.out, m.r, m.r);
            gemm(&mut gb, gbv, false, dy, dyv.t(), &g.u, uv, s, true);
            let bv = View::rm(0, m.out, m.r, m.r);
            gemm(&mut du, uv, false, dy, dyv, &m.b, bv, s, true);
            grads.accumulate(
                peft_name(layer, m.p, 'B'),
                Tensor::from_vec(gb, (m.out, m.r), dev)?,
            )?;
        }
        // dA = du^T x_d, for the stacked A.
        let mut owned = Vec::new();
        let xd = dropped(x, g.dropout.as_ref(), &mut owned);
        let xv = View::rm(0, n, inp, inp);
        let duv = View::rm(0, n, rt, rt);
        let mut ga = vec![0f32; rt * inp];
        gemm(
            &mut ga,
            View::rm(0, rt, inp, inp),
            false,
            &du,
            duv.t(),
            xd,
            xv,
            1.0,
            true,
        );
        for m in &g.members {
            let rows = ga[m.uc * inp..(m.uc + m.r) * inp].to_vec();
            grads.accumulate(
                peft_name(layer, m.p, 'A'),
                Tensor::from_vec(rows, (m.r, inp), dev)?,
            )?;
        }
        if let Some(dx) = dx {
            let av = View::rm(0, rt, inp, inp);
            match &g.dropout {
                None => gemm(dx, xv, true, &du, duv, &g.a, av, 1.0, true),
                Some(drop) => {
                    let mut t = bufs.dirty(n * inp);
                    gemm(&mut t, xv, false, &du, duv, &g.a, av, 1.0, true);
                    for (k, (o, v)) in dx.iter_mut().zip(&t).enumerate() {
                        *o += v * drop.factor(k);
                    }
                    bufs.put(t);
                }
            }
        }
        bufs.put(du);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Attention.

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    h: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    /// Widths of q and of k (= v) in a `[q | k | v]` row, and the row's width.
    dq: usize,
    dk: usize,
    wq: usize,
    inter: usize,
}

impl Dims {
    fn of(ctx: &Ctx) -> Self {
        let c = &ctx.model.config;
        let (b, t) = (ctx.batch.batch, ctx.batch.seq);
        let (dq, dk) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Self {
            b,
            t,
            n: b * t,
            h: c.hidden_size,
            nh: c.num_heads,
            kvh: c.num_kv_heads,
            hd: c.head_dim,
            dq,
            dk,
            wq: dq + 2 * dk,
            inter: c.intermediate_size,
        }
    }

    /// q, k and v, each with its first column and width in a `[q | k | v]` row.
    fn qkv_parts(&self) -> [(Projection, usize, usize); 3] {
        [
            (Projection::Q, 0, self.dq),
            (Projection::K, self.dq, self.dk),
            (Projection::V, self.dq + self.dk, self.dk),
        ]
    }

    /// gate and up, each with its first column and width in a `[gate | up]` row.
    fn gate_up_parts(&self) -> [(Projection, usize, usize); 2] {
        [
            (Projection::Gate, 0, self.inter),
            (Projection::Up, self.inter, self.inter),
        ]
    }

    /// Head `h` of q, `g` of k or `g` of v in row `bi`'s tokens of a `[q | k | v]` buffer.
    fn q(&self, bi: usize, h: usize) -> View {
        View::rm(
            bi * self.t * self.wq + h * self.hd,
            self.t,
            self.hd,
            self.wq,
        )
    }

    fn k(&self, bi: usize, g: usize) -> View {
        self.q(bi, 0).shift(self.dq + g * self.hd)
    }

    fn v(&self, bi: usize, g: usize) -> View {
        self.q(bi, 0).shift(self.dq + self.dk + g * self.hd)
    }

    /// Query heads per kv head.
    fn rep(&self) -> usize {
        self.nh / self.kvh
    }

    /// The `[t, n_rep, t]` probabilities of row `bi`, kv head `g` (token-major: a block of
    /// token rows is one block of rows for all the group's heads): where they start.
    fn p_off(&self, bi: usize, g: usize) -> usize {
        (bi * self.kvh + g) * self.t * self.rep() * self.t
    }

    /// The query heads of kv head `g` in row `bi`'s tokens, from `src` (`ld`-long rows,
    /// q heads from column 0: the `[q | k | v]` rows, or the attention output), as one
    /// token-major `[t * n_rep, hd]` block.
    fn gather(&self, src: &[f32], ld: usize, bi: usize, g: usize) -> Vec<f32> {
        let w = self.rep() * self.hd;
        let mut out = vec![0f32; self.t * w];
        for (r, o) in out.chunks_exact_mut(w).enumerate() {
            let s = (bi * self.t + r) * ld + g * w;
            o.copy_from_slice(&src[s..s + w]);
        }
        out
    }

    /// The inverse of [`Dims::gather`]: `block` into `dst`.
    ///
    /// # Safety
    /// No other thread touches those columns of row `bi`'s tokens during the call.
    #[allow(unsafe_code)]
    unsafe fn scatter(&self, block: &[f32], dst: &SharedBuf, ld: usize, bi: usize, g: usize) {
        let w = self.rep() * self.hd;
        for (r, b) in block.chunks_exact(w).enumerate() {
            let s = (bi * self.t + r) * ld + g * w;
            // SAFETY: the caller's contract.
            unsafe { dst.slice_mut(s..s + w) }.copy_from_slice(b);
        }
    }

    /// Query-row blocks of row `bi`: each with the first key column any of its rows sees.
    fn blocks<'a>(
        &self,
        lo: &'a [u32],
        bi: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
        let t = self.t;
        (0..t).step_by(BLK).map(move |r0| {
            let r1 = (r0 + BLK).min(t);
            let c0 = lo[bi * t + r0..bi * t + r1]
                .iter()
                .min()
                .copied()
                .unwrap_or(0) as usize;
            (r0, r1, c0)
        })
    }
}

/// Attention forward on roped `qkv` `[n, q | k | v]`: the output `[n, nh * hd]` and the
/// probabilities (zero where masked), `[b, kvh, t, n_rep, t]`.
///
/// One work item is a (sequence, kv head): the `n_rep` query heads that share its keys and
/// values are copied out token-major into one `[t * n_rep, hd]` block, so each block of
/// query rows is one product with the keys (packed once for the group, with three times
/// the rows of a single head) and one with the values.
fn attn_fwd(qkv: &[f32], d: Dims, hb: &HostBatch, bufs: &BufPool) -> (Vec<f32>, Vec<f32>) {
    let (t, rep, hd) = (d.t, d.rep(), d.hd);
    let w = rep * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    // Every item writes its output rows whole, and its probability rows `c0..r1` of each
    // block (all that the backward reads): neither needs clearing first.
    let mut y = bufs.dirty(d.n * d.dq);
    let mut p = bufs.dirty(d.b * d.nh * t * t);
    let (ys, ps) = (SharedBuf::new(&mut y), SharedBuf::new(&mut p));
    let m3 = View::rm(0, t * rep, hd, hd);
    pool_items(d.b * d.kvh, |item| {
        let (bi, g) = (item / d.kvh, item % d.kvh);
        let (kv, vv) = (d.k(bi, g), d.v(bi, g));
        let q3 = d.gather(qkv, d.wq, bi, g);
        let mut y3 = vec![0f32; t * w];
        let po = d.p_off(bi, g);
        // SAFETY: item (bi, g) alone touches its probabilities (and its heads' output
        // columns in row bi's tokens).
        #[allow(unsafe_code)]
        let pm = unsafe { ps.slice_mut(po..po + t * rep * t) };
        for (r0, r1, c0) in d.blocks(&hb.lo, bi) {
            let rows = r0 * rep..r1 * rep;
            let pv = View::rm(r0 * rep * t + c0, rows.len(), r1 - c0, t);
            let kt = kv.rows(c0..r1).t();
            gemm(
                pm,
                pv,
                false,
                &q3,
                m3.rows(rows.clone()),
                qkv,
                kt,
                scale,
                false,
            );
            for j in rows.clone() {
                let i = j / rep;
                let row = &mut pm[j * t..j * t + r1];
                let lo = hb.lo[bi * t + i] as usize;
                row[c0..lo].fill(0.0);
                row[i + 1..].fill(0.0);
                let z = &mut row[lo..=i];
                let sum = exp_sub(z, max_f32(z));
                let inv = 1.0 / sum;
                z.iter_mut().for_each(|v| *v *= inv);
            }
            let yv = m3.rows(rows);
            gemm(&mut y3, yv, false, pm, pv, qkv, vv.rows(c0..r1), 1.0, false);
        }
        // SAFETY: see `pm`.
        #[allow(unsafe_code)]
        unsafe {
            d.scatter(&y3, &ys, d.dq, bi, g)
        };
    });
    (y, p)
}

/// Attention backward: from the output gradient `dy` `[n, nh * hd]`, the gradient of the
/// roped `[n, q | k | v]`. Work items as in [`attn_fwd`].
fn attn_bwd(
    qkv: &[f32],
    p: &[f32],
    dy: &[f32],
    d: Dims,
    hb: &HostBatch,
    bufs: &BufPool,
) -> Vec<f32> {
    let (t, rep, hd) = (d.t, d.rep(), d.hd);
    let w = rep * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    // The k and v columns accumulate over the blocks; the q columns are written whole.
    let mut dqkv = bufs.zeros(d.n * d.wq);
    let ds_all = SharedBuf::new(&mut dqkv);
    let m3 = View::rm(0, t * rep, hd, hd);
    pool_items(d.b * d.kvh, |item| {
        let (bi, g) = (item / d.kvh, item % d.kvh);
        let (kv, vv) = (d.k(bi, g), d.v(bi, g));
        let q3 = d.gather(qkv, d.wq, bi, g);
        let do3 = d.gather(dy, d.dq, bi, g);
        let mut dq3 = vec![0f32; t * w];
        let mut ds = vec![0f32; t * rep * t];
        let po = d.p_off(bi, g);
        for (r0, r1, c0) in d.blocks(&hb.lo, bi) {
            let rows = r0 * rep..r1 * rep;
            let sv = View::rm(r0 * rep * t + c0, rows.len(), r1 - c0, t);
            let pv = sv.shift(po);
            let rv = m3.rows(rows.clone());
            // dP = dO V^T
            let vt = vv.rows(c0..r1).t();
            gemm(&mut ds, sv, false, &do3, rv, qkv, vt, 1.0, false);
            // dS = P (dP - sum(P dP))
            for j in rows {
                let (pr, dr) = (
                    &p[po + j * t + c0..po + j * t + r1],
                    &mut ds[j * t + c0..j * t + r1],
                );
                let dot = dot_f32(pr, dr);
                for (o, a) in dr.iter_mut().zip(pr) {
                    *o = a * (*o - dot);
                }
            }
            gemm(
                &mut dq3,
                rv,
                false,
                &ds,
                sv,
                qkv,
                kv.rows(c0..r1),
                scale,
                false,
            );
            // SAFETY (both): item (bi, g) alone touches the k/v columns of kv head g in
            // row bi's tokens.
            #[allow(unsafe_code)]
            unsafe {
                ds_all.gemm(kv.rows(c0..r1), true, &ds, sv.t(), &q3, rv, scale);
                ds_all.gemm(vv.rows(c0..r1), true, p, pv.t(), &do3, rv, 1.0);
            }
        }
        // SAFETY: item (bi, g) alone touches the q columns of heads g * rep.. in row bi's
        // tokens.
        #[allow(unsafe_code)]
        unsafe {
            d.scatter(&dq3, &ds_all, d.wq, bi, g)
        };
    });
    dqkv
}

// ---------------------------------------------------------------------------------------
// A layer.

/// What the forward of one layer keeps for its backward.
pub(super) struct HostCache {
    x: Tensor,
    r1: Vec<f32>,
    h1: Vec<f32>,
    /// After bias, LoRA and rope: what attention read.
    qkv: Vec<f32>,
    p: Vec<f32>,
    y: Vec<f32>,
    x2: Vec<f32>,
    r2: Vec<f32>,
    h2: Vec<f32>,
    /// `[n, gate | up]`.
    gu: Vec<f32>,
    act: Vec<f32>,
    lora: LayerLora,
}

impl HostCache {
    /// Hand the buffers back to `bufs`.
    fn recycle(self, bufs: &BufPool) {
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
    qkv: Vec<LoraGroup>,
    o: Vec<LoraGroup>,
    gate_up: Vec<LoraGroup>,
    down: Vec<LoraGroup>,
}

impl LayerLora {
    fn of(ctx: &Ctx, i: usize, d: &Dims) -> Result<Self> {
        Ok(Self {
            qkv: lora_groups(ctx, i, &d.qkv_parts())?,
            o: lora_groups(ctx, i, &[(Projection::O, 0, d.h)])?,
            gate_up: lora_groups(ctx, i, &d.gate_up_parts())?,
            down: lora_groups(ctx, i, &[(Projection::Down, 0, d.h)])?,
        })
    }
}

/// [`lora_fwd`] for each of `groups`.
fn lora_fwd_all(
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

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn bias_of(ctx: &Ctx, i: usize, p: Projection) -> Result<Option<Vec<f32>>> {
    ctx.model.blocks[i].proj[p.index()]
        .b
        .as_ref()
        .map(vec_of)
        .transpose()
}

fn missing(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("host training path: {what}"))
}

/// What a layer's forward and backward read: the shapes, the batch's host data, the
/// stacked and single weights, the two norms' gains.
struct LayerW<'a> {
    d: Dims,
    hb: &'a HostBatch,
    wqkv: &'a Tensor,
    wgu: &'a Tensor,
    wo: &'a Tensor,
    wd: &'a Tensor,
    g1: Vec<f32>,
    g2: Vec<f32>,
}

impl<'a> LayerW<'a> {
    fn of(ctx: &'a Ctx, i: usize) -> Result<Self> {
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
pub(super) enum Keep {
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
pub(super) struct LayerOut {
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
pub(super) fn layer_fwd(
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
        profile::time("fwd x W^T", || {
            let wv = View::rm(0, d.wq, h, h).t();
            gemm(
                &mut qkv,
                View::rm(0, n, d.wq, d.wq),
                false,
                &h1,
                View::rm(0, n, h, h),
                wqkv,
                wv,
                1.0,
                true,
            )
        });
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
                profile::time("fwd x W^T", || {
                    let wv = View::rm(0, h, d.dq, d.dq).t();
                    gemm(
                        &mut x2,
                        View::rm(0, n, h, h),
                        true,
                        &y,
                        View::rm(0, n, d.dq, d.dq),
                        wo,
                        wv,
                        1.0,
                        true,
                    )
                });
                add_bias(&mut x2, h, 0, bias[Projection::O.index()].as_deref());
                lora_fwd_all(&mut lora.o, &y, n, s, Some((&mut x2, h)), bufs);
                x2
            }
        };

        // MLP.
        let (h2, r2) = rms_fwd(&x2, &g2, eps, h, bufs.dirty(n * h));
        let mut gu = bufs.dirty(n * 2 * inter);
        profile::time("fwd x W^T", || {
            let wv = View::rm(0, 2 * inter, h, h).t();
            gemm(
                &mut gu,
                View::rm(0, n, 2 * inter, 2 * inter),
                false,
                &h2,
                View::rm(0, n, h, h),
                wgu,
                wv,
                1.0,
                true,
            )
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
            profile::time("fwd x W^T", || {
                let wv = View::rm(0, h, inter, inter).t();
                gemm(
                    &mut x3,
                    View::rm(0, n, h, h),
                    true,
                    &act,
                    View::rm(0, n, inter, inter),
                    wd,
                    wv,
                    1.0,
                    true,
                )
            });
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
pub(super) fn layer_bwd(
    ctx: &Ctx,
    i: usize,
    c: HostCache,
    dx3: &Tensor,
    need_dx: bool,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
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
    let (n, h, inter) = (d.n, d.h, d.inter);
    let bufs = &m.host_bufs;
    let dx3 = &dx3.contiguous()?;
    let dx = fused::host_f32(&[dx3, &c.x, wqkv, wo, wgu, wd], |sl| -> Result<_> {
        let [dx3, x, wqkv, wo, wgu, wd] = sl else {
            unreachable!("six tensors in, six slices out")
        };
        let nh_view = View::rm(0, n, h, h);

        // MLP.
        let mut da = bufs.dirty(n * inter);
        profile::time("bwd dy W", || {
            gemm(
                &mut da,
                View::rm(0, n, inter, inter),
                false,
                dx3,
                nh_view,
                wd,
                View::rm(0, h, inter, inter),
                1.0,
                true,
            )
        });
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
        profile::time("bwd dy W", || {
            gemm(
                &mut dh2,
                nh_view,
                false,
                &dgu,
                View::rm(0, n, w2, w2),
                wgu,
                View::rm(0, w2, h, h),
                1.0,
                true,
            )
        });
        for g in &c.lora.gate_up {
            lora_bwd(ctx, i, &c.h2, g, &dgu, w2, Some(&mut dh2), grads)?;
        }
        bufs.put(dgu);
        let mut dx2 = dx3.to_vec();
        rms_bwd_add(&mut dx2, &c.x2, &c.r2, &g2, &dh2, h);
        bufs.put(dh2);

        // Attention.
        let mut dy = bufs.dirty(n * d.dq);
        profile::time("bwd dy W", || {
            gemm(
                &mut dy,
                View::rm(0, n, d.dq, d.dq),
                false,
                &dx2,
                nh_view,
                wo,
                View::rm(0, h, d.dq, d.dq),
                1.0,
                true,
            )
        });
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
            profile::time("bwd dy W", || {
                gemm(
                    &mut dh1,
                    nh_view,
                    false,
                    &dqkv,
                    View::rm(0, n, d.wq, d.wq),
                    wqkv,
                    View::rm(0, d.wq, h, h),
                    1.0,
                    true,
                )
            });
            Some(dh1)
        } else {
            None
        };
        for g in &c.lora.qkv {
            lora_bwd(ctx, i, &c.h1, g, &dqkv, d.wq, dh1.as_deref_mut(), grads)?;
        }
        bufs.put(dqkv);
        Ok(dh1.map(|dh1| {
            rms_bwd_add(&mut dx2, x, &c.r1, &g1, &dh1, h);
            bufs.put(dh1);
            dx2
        }))
    })
    .ok_or_else(|| missing("tensors not contiguous f32 on the CPU"))??;
    c.recycle(bufs);
    dx.map(|v| Tensor::from_vec(v, (n, h), &m.device))
        .transpose()
}

// ---------------------------------------------------------------------------------------
// The output head.

/// Cross-entropy over the scored rows of `hf` (`[n, hidden]`, after the final norm),
/// `HEAD_CHUNK` rows at a time, with the frozen head; with `grad_scale`, the gradient
/// w.r.t. `hf` (the head's own gradient is not computed: it is frozen here).
pub(super) fn head(
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
            for (k, &row) in idx.iter().enumerate() {
                let row = row as usize;
                hs[k * h..(k + 1) * h].copy_from_slice(&hf[row * h..(row + 1) * h]);
            }
            let lg = &mut logits[..len * vocab];
            profile::time("head logits", || {
                let wv = View::rm(0, vocab, h, h).t();
                gemm(
                    lg,
                    View::rm(0, len, vocab, vocab),
                    false,
                    &hs,
                    View::rm(0, len, h, h),
                    w,
                    wv,
                    1.0,
                    true,
                )
            });
            // Per row: the loss and the argmax; with a gradient, the row becomes
            // `w (softmax - onehot)` in place.
            let per = Mutex::new(&mut per_row[..len]);
            profile::time("head softmax", || {
                par_rows(lg, vocab, |k, z| {
                    let (target, ws) = (
                        tgt[k] as usize,
                        grad_scale.map(|g| (wts[k] as f64 * g) as f32),
                    );
                    let zt = z[target];
                    let mx = max_f32(z);
                    let arg = z.iter().position(|&v| v == mx).unwrap_or(0);
                    let sum = exp_sub(z, mx);
                    let nll = (mx + sum.ln() - zt) as f64;
                    if let Some(ws) = ws {
                        let inv = ws / sum;
                        z.iter_mut().for_each(|v| *v *= inv);
                        z[target] -= ws;
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
                profile::time("head dlogits W", || {
                    gemm(
                        dh,
                        View::rm(0, len, h, h),
                        false,
                        lg,
                        View::rm(0, len, vocab, vocab),
                        w,
                        View::rm(0, vocab, h, h),
                        1.0,
                        true,
                    )
                });
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
