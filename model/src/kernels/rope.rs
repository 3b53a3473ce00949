//! Rotary position embeddings: one head at one position (decode), and the heads of many
//! rows on the worker pool, forward and backward (training).

use super::pool::par_rows;
use crate::llama::config::RopeLayout;

/// Rotate one head (`head_dim` values) by the angles of one position (`cos`, `sin`:
/// `head_dim / 2` values each) in the model's pair layout (as candle's `rope_i` /
/// `rope`); `sign` -1 rotates by the opposite angle (the backward of a rotation).
#[inline]
pub(crate) fn rotate_head(
    head: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
    sign: f32,
) {
    let half = head.len() / 2;
    match layout {
        RopeLayout::Halves => {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (x0, x1, sn) = (a[j], b[j], sign * sin[j]);
                a[j] = x0 * cos[j] - x1 * sn;
                b[j] = x1 * cos[j] + x0 * sn;
            }
        }
        RopeLayout::Interleaved => {
            for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1, sn) = (pair[0], pair[1], sign * sin[j]);
                pair[0] = x0 * cos[j] - x1 * sn;
                pair[1] = x1 * cos[j] + x0 * sn;
            }
        }
    }
}

/// Rotate `heads` heads of `hd` values starting at column `col` of every `ld`-long row
/// (the halves layout: value `j` pairs with `j + hd/2`) by each row's angle; by the
/// opposite angle with `inverse` (the backward of a rotation).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_rows(
    buf: &mut [f32],
    ld: usize,
    col: usize,
    heads: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    par_rows(buf, ld, |i, row| {
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row[col..col + heads * hd].chunks_exact_mut(hd) {
            rotate_head(head, c, s, RopeLayout::Halves, sign);
        }
    });
}
