//! Matrix products on host slices through the `gemm` crate (the version candle itself
//! uses), with strides and accumulation, split in bands over the worker pool.

use super::pool::pool_items;
use super::shared::SharedBuf;
use std::ops::Range;

/// A strided matrix inside a slice: element `(i, j)` is at `off + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) off: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl View {
    /// Row-major `rows x cols` at `off`, `ld` apart.
    pub(crate) fn rm(off: usize, rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            off,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }

    pub(crate) fn t(self) -> Self {
        Self {
            off: self.off,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows `r` of this matrix.
    pub(crate) fn rows(self, r: Range<usize>) -> Self {
        Self {
            off: self.off + r.start * self.rs,
            rows: r.len(),
            ..self
        }
    }

    /// Columns `c` of this matrix.
    pub(crate) fn cols(self, c: Range<usize>) -> Self {
        Self {
            off: self.off + c.start * self.cs,
            cols: c.len(),
            ..self
        }
    }

    /// The same matrix `by` elements further on.
    pub(crate) fn shift(self, by: usize) -> Self {
        Self {
            off: self.off + by,
            ..self
        }
    }

    /// One past the last element it touches.
    pub(crate) fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            self.off
        } else {
            self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst = scale * a b`, or `dst += scale * a b` with `acc`; with `par`, split in row (or
/// column) bands over candle's worker pool, one single-threaded `gemm` per core (the
/// `gemm` crate's own two-thread split measured 83-85% of two single threads' rate on
/// these shapes), else on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    dst: &mut [f32],
    d: View,
    acc: bool,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    scale: f32,
    par: bool,
) {
    let parts = if par {
        candle_core::utils::get_num_threads()
    } else {
        1
    };
    let out = SharedBuf::new(dst);
    // Bands of rows, unless the product is much wider than tall (the output head's
    // logits: each core then reads only its half of the head's weights).
    let by_rows = d.rows >= 32 * parts && d.cols < 4 * d.rows;
    if parts > 1 && (by_rows || d.cols >= 64 * parts) {
        // Checked here on the caller's thread, not first in a worker's band.
        assert!(d.end() <= out.len() && av.end() <= a.len() && bv.end() <= b.len());
        let len = if by_rows { d.rows } else { d.cols };
        let step = len.div_ceil(parts);
        pool_items(parts, |k| {
            let r = k * step..((k + 1) * step).min(len);
            if r.is_empty() {
                return;
            }
            let (dk, ak, bk) = if by_rows {
                (d.rows(r.clone()), av.rows(r), bv)
            } else {
                (d.cols(r.clone()), av, bv.cols(r))
            };
            // SAFETY: the parts write disjoint row (or column) bands of `dst`.
            #[allow(unsafe_code)]
            unsafe {
                out.gemm(dk, acc, a, ak, b, bk, scale)
            }
        });
        return;
    }
    // SAFETY: `dst` is a `&mut` borrow: nothing else touches it, and it overlaps neither
    // input.
    #[allow(unsafe_code)]
    unsafe {
        out.gemm(d, acc, a, av, b, bv, scale)
    }
}

/// `y [n, o] (+)= x [n, k] W^T` with `W` `[o, k]`, all row-major: a linear layer's
/// forward (`acc`: added to `y`, the residual), over the pool.
pub(crate) fn x_wt(y: &mut [f32], acc: bool, x: &[f32], w: &[f32], n: usize, o: usize, k: usize) {
    let wv = View::rm(0, o, k, k).t();
    gemm(
        y,
        View::rm(0, n, o, o),
        acc,
        x,
        View::rm(0, n, k, k),
        w,
        wv,
        1.0,
        true,
    )
}

/// `dx [n, k] = dy [n, o] W` with `W` `[o, k]`, all row-major: a linear layer's input
/// gradient, over the pool.
pub(crate) fn dy_w(dx: &mut [f32], dy: &[f32], w: &[f32], n: usize, o: usize, k: usize) {
    let wv = View::rm(0, o, k, k);
    gemm(
        dx,
        View::rm(0, n, k, k),
        false,
        dy,
        View::rm(0, n, o, o),
        w,
        wv,
        1.0,
        true,
    )
}

/// [`gemm`] on raw pointers, for the attention items that write disjoint strided parts
/// of one buffer from several threads.
///
/// # Safety
/// Every view must lie inside the allocation its pointer points into, and the elements
/// of `d` must not be read or written by anything else during the call.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ptr(
    dst: *mut f32,
    d: View,
    acc: bool,
    a: *const f32,
    av: View,
    b: *const f32,
    bv: View,
    scale: f32,
) {
    assert_eq!((d.rows, d.cols, av.cols), (av.rows, bv.cols, bv.rows));
    if d.rows == 0 || d.cols == 0 || av.cols == 0 {
        return;
    }
    // SAFETY: the caller's contract; `gemm` reads and writes exactly the views' elements.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            av.cols,
            dst.add(d.off),
            d.cs as isize,
            d.rs as isize,
            acc,
            a.add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            if acc { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl SharedBuf<'_> {
    /// `dst (+)= scale * a b` into this buffer.
    ///
    /// # Safety
    /// No other thread touches `d`'s elements during the call.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm(
        &self,
        d: View,
        acc: bool,
        a: &[f32],
        av: View,
        b: &[f32],
        bv: View,
        scale: f32,
    ) {
        assert!(d.end() <= self.len() && av.end() <= a.len() && bv.end() <= b.len());
        // SAFETY: bounds checked; exclusivity is the caller's contract.
        unsafe {
            gemm_ptr(
                self.as_mut_ptr(),
                d,
                acc,
                a.as_ptr(),
                av,
                b.as_ptr(),
                bv,
                scale,
            )
        }
    }
}
