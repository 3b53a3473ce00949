//! The LoRA of the host path: projections that read the same input stacked into groups
//! (one product each for `x A^T`, the `A` gradient and `dx += du A`), dropout recomputed
//! from its seed, the `B` products accumulated straight into the projection's output.

use crate::kernels::gemm::{View, gemm};
use crate::kernels::pool::BufPool;
use crate::llama::Projection;
use crate::lora::peft_name;
use crate::train::batch::Grads;
use crate::train::ctx::Ctx;
use crate::train::dropout::Dropout;
use crate::train::profile;
use candle_core::{Result, Tensor};

/// One projection of a [`LoraGroup`]: its `B` `[out, r]`, where its rank's columns sit in
/// the group's `u`, where its output columns sit in the output rows.
pub(super) struct Member {
    pub(super) p: Projection,
    pub(super) b: Vec<f32>,
    pub(super) r: usize,
    /// First column in `u`.
    pub(super) uc: usize,
    /// First column and width in the output rows.
    pub(super) col: usize,
    pub(super) out: usize,
}

/// The LoRA of projections that read the same input (q/k/v, or gate/up) and draw no
/// dropout: their `A`s stacked, so `x A^T`, the `A` gradient and `dx += du A` are one
/// product each for the group instead of one per projection (the rank-16 products are
/// thin, and three thin ones cost more than one three times as wide). With dropout
/// each projection draws its own mask, as in PEFT, and is a group of one.
pub(super) struct LoraGroup {
    pub(super) members: Vec<Member>,
    /// The members' `A`s stacked, `[rt, in]`.
    pub(super) a: Vec<f32>,
    pub(super) rt: usize,
    /// `u = x_d A^T`, `[n, rt]`.
    pub(super) u: Vec<f32>,
    /// The dropout, when it is on (its mask is recomputed, not stored).
    pub(super) dropout: Option<Dropout>,
}

/// The LoRA groups of the projections `parts` (each with its first column and width in
/// the output rows) of layer `i`; the projections without LoRA are left out.
pub(super) fn lora_groups(
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
pub(super) fn dropped<'a>(
    x: &'a [f32],
    dropout: Option<&Dropout>,
    owned: &'a mut Vec<f32>,
) -> &'a [f32] {
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
pub(super) fn lora_fwd(
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
pub(super) fn lora_bwd(
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

pub(super) fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}
