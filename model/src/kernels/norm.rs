//! RMSNorm: one row (decode), and rows on the worker pool with the backward (training).

use super::pool::par_rows;
use super::reduce::{dot_f32, sum_f32};

/// `1 / sqrt(mean(x^2) + eps)` of one row: what RMSNorm scales it by.
#[inline]
pub(crate) fn rms_inv(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot_f32(x, x) / x.len() as f32 + eps).sqrt()
}

/// candle's `rms_norm` of one row: `x / sqrt(mean(x^2) + eps) * g`.
pub(crate) fn rms_norm_row(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let inv = rms_inv(x, eps);
    x.iter().zip(g).map(|(v, g)| v * inv * g).collect()
}

/// RMSNorm of `[n, h]` rows: `(x r g, r)` with `r = 1 / sqrt(mean(x^2) + eps)` per row,
/// the first written into `y` (`x.len()` long, overwritten whole).
pub(crate) fn rms_fwd(
    x: &[f32],
    g: &[f32],
    eps: f32,
    h: usize,
    mut y: Vec<f32>,
) -> (Vec<f32>, Vec<f32>) {
    let mut r = vec![0f32; x.len() / h];
    par_rows(&mut r, 1, |i, ri| {
        let row = &x[i * h..(i + 1) * h];
        ri[0] = rms_inv(row, eps);
    });
    par_rows(&mut y, h, |i, out| {
        let (xr, ri) = (&x[i * h..(i + 1) * h], r[i]);
        for ((o, v), gv) in out.iter_mut().zip(xr).zip(g) {
            *o = v * ri * gv;
        }
    });
    (y, r)
}

/// RMSNorm backward added to `acc`: `acc += r (dy g - xhat mean(dy g xhat))`,
/// `xhat = x r`.
pub(crate) fn rms_bwd_add(acc: &mut [f32], x: &[f32], r: &[f32], g: &[f32], dy: &[f32], h: usize) {
    par_rows(acc, h, |i, out| {
        let (xr, dr, ri) = (&x[i * h..(i + 1) * h], &dy[i * h..(i + 1) * h], r[i]);
        // c = mean(dxhat xhat) with dxhat = dy g and xhat = x r, in eight lanes.
        let mut acc = [0f32; 8];
        let (xc, dc, gc) = (xr.chunks_exact(8), dr.chunks_exact(8), g.chunks_exact(8));
        let mut tail = 0f32;
        for ((xv, dv), gv) in xc
            .remainder()
            .iter()
            .zip(dc.remainder())
            .zip(gc.remainder())
        {
            tail += dv * gv * xv;
        }
        for ((xv, dv), gv) in xc.zip(dc).zip(gc) {
            for k in 0..8 {
                acc[k] += dv[k] * gv[k] * xv[k];
            }
        }
        let c = (sum_f32(&acc) + tail) * ri / h as f32;
        for (((o, xv), dv), gv) in out.iter_mut().zip(xr).zip(dr).zip(g) {
            *o += ri * (dv * gv - xv * ri * c);
        }
    });
}
