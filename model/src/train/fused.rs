//! Fused element-wise kernels for f32 tensors on the CPU: one pass over memory and one
//! output allocation where the generic candle-op versions (used for other dtypes and
//! devices, and as the tests' reference) take several of each.

use crate::kernels::exp;
use crate::kernels::pool::pool_items;
use crate::kernels::reduce::dot_f32;
use candle_core::{Result, Storage, Tensor};
use std::sync::Mutex;

pub(super) const ROWS_PER_ITEM: usize = 32;

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
pub(super) fn map_rows<const K: usize>(
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
        pool_items(items.len(), |item| {
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
            let dot = dot_f32(pr, dr);
            for ((o, a), b) in ds.iter_mut().zip(pr).zip(dr) {
                *o = a * (b - dot);
            }
        })
    })?;
    let [ds] = out;
    Some(Tensor::from_vec(ds, p.shape(), p.device()))
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
                *v = exp::silu_mul(g[o + j], u[o + j]);
            }
        })
    })?;
    Some(Tensor::from_vec(act, gate.shape(), gate.device()))
}

/// Backward of `silu(gate) * up` given `da`: `(dgate, dup)` with
/// `silu'(g) = sig(g) (1 + g (1 - sig(g)))`.
pub fn silu_mul_bwd(gate: &Tensor, up: &Tensor, da: &Tensor) -> Option<Result<(Tensor, Tensor)>> {
    let len = *gate.dims().last()?;
    let rows = gate.elem_count() / len;
    let [dg, du] = host_f32(&[gate, up, da], |s| {
        let (g, u, d) = (s[0], s[1], s[2]);
        map_rows::<2>(rows, len, |r, [dg, du]| {
            let o = r * len;
            for j in 0..len {
                (dg[j], du[j]) = exp::silu_mul_grad(g[o + j], u[o + j], d[o + j]);
            }
        })
    })?;
    let make = |v| Tensor::from_vec(v, gate.shape(), gate.device());
    Some(make(dg).and_then(|dg| Ok((dg, make(du)?))))
}
