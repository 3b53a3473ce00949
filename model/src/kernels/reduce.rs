//! Reductions over f32 slices, written in eight independent lanes so they vectorize
//! (a plain f32 `sum()` or `fold` is one serial chain: float addition is not
//! reassociated).

/// A dot product written so the compiler vectorizes it (eight independent accumulators,
/// no bounds checks in the loop).
#[inline]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Eight independent lanes, so these vectorize (a plain f32 `sum()` or `fold` is one
/// serial chain: float addition is not reassociated).
fn lanes8(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let c = v.chunks_exact(8);
    let tail = c.remainder().iter().fold(init, |a, &x| f(a, x));
    for x in c {
        for k in 0..8 {
            acc[k] = f(acc[k], x[k]);
        }
    }
    acc.iter().fold(tail, |a, &x| f(a, x))
}

#[inline]
pub(crate) fn sum_f32(v: &[f32]) -> f32 {
    lanes8(v, 0.0, |a, x| a + x)
}

#[inline]
pub(crate) fn max_f32(v: &[f32]) -> f32 {
    lanes8(v, f32::NEG_INFINITY, f32::max)
}
