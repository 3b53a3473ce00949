//! Attention on the host path: per (sequence, kv head) work items on the pool, in blocks
//! of query rows that only multiply the key columns they can see.

use crate::kernels::exp::exp_sub;
use crate::kernels::gemm::{View, gemm};
use crate::kernels::pool::{BufPool, pool_items};
use crate::kernels::reduce::{dot_f32, max_f32};
use crate::kernels::shared::SharedBuf;
use crate::llama::Projection;
use crate::train::batch::HostBatch;
use crate::train::ctx::Ctx;

/// Query rows per attention block.
pub(super) const BLK: usize = 64;

#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) nh: usize,
    pub(super) kvh: usize,
    pub(super) hd: usize,
    /// Widths of q and of k (= v) in a `[q | k | v]` row, and the row's width.
    pub(super) dq: usize,
    pub(super) dk: usize,
    pub(super) wq: usize,
    pub(super) inter: usize,
}

impl Dims {
    pub(super) fn of(ctx: &Ctx) -> Self {
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
    pub(super) fn qkv_parts(&self) -> [(Projection, usize, usize); 3] {
        [
            (Projection::Q, 0, self.dq),
            (Projection::K, self.dq, self.dk),
            (Projection::V, self.dq + self.dk, self.dk),
        ]
    }

    /// gate and up, each with its first column and width in a `[gate | up]` row.
    pub(super) fn gate_up_parts(&self) -> [(Projection, usize, usize); 2] {
        [
            (Projection::Gate, 0, self.inter),
            (Projection::Up, self.inter, self.inter),
        ]
    }

    /// Head `h` of q, `g` of k or `g` of v in row `bi`'s tokens of a `[q | k | v]` buffer.
    pub(super) fn q(&self, bi: usize, h: usize) -> View {
        View::rm(
            bi * self.t * self.wq + h * self.hd,
            self.t,
            self.hd,
            self.wq,
        )
    }

    pub(super) fn k(&self, bi: usize, g: usize) -> View {
        self.q(bi, 0).shift(self.dq + g * self.hd)
    }

    pub(super) fn v(&self, bi: usize, g: usize) -> View {
        self.q(bi, 0).shift(self.dq + self.dk + g * self.hd)
    }

    /// Query heads per kv head.
    pub(super) fn rep(&self) -> usize {
        self.nh / self.kvh
    }

    /// The `[t, n_rep, t]` probabilities of row `bi`, kv head `g` (token-major: a block of
    /// token rows is one block of rows for all the group's heads): where they start.
    pub(super) fn p_off(&self, bi: usize, g: usize) -> usize {
        (bi * self.kvh + g) * self.t * self.rep() * self.t
    }

    /// The query heads of kv head `g` in row `bi`'s tokens, from `src` (`ld`-long rows,
    /// q heads from column 0: the `[q | k | v]` rows, or the attention output), as one
    /// token-major `[t * n_rep, hd]` block.
    pub(super) fn gather(&self, src: &[f32], ld: usize, bi: usize, g: usize) -> Vec<f32> {
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
    pub(super) unsafe fn scatter(
        &self,
        block: &[f32],
        dst: &SharedBuf,
        ld: usize,
        bi: usize,
        g: usize,
    ) {
        let w = self.rep() * self.hd;
        for (r, b) in block.chunks_exact(w).enumerate() {
            let s = (bi * self.t + r) * ld + g * w;
            // SAFETY: the caller's contract.
            unsafe { dst.slice_mut(s..s + w) }.copy_from_slice(b);
        }
    }

    /// Query-row blocks of row `bi`: each with the first key column any of its rows sees.
    pub(super) fn blocks<'a>(
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
pub(super) fn attn_fwd(
    qkv: &[f32],
    d: Dims,
    hb: &HostBatch,
    bufs: &BufPool,
) -> (Vec<f32>, Vec<f32>) {
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
pub(super) fn attn_bwd(
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
