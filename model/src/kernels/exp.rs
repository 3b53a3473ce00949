//! `exp` and what is built on it (softmax numerators, sigmoid, SiLU) in f32 without a
//! libm call, so the loops over them vectorize.

use super::reduce::sum_f32;

/// `exp(x)` in f32 without a libm call, so loops over it vectorize: `2^k e^r` with
/// `r = x - k ln 2` in `[-ln2/2, ln2/2]` and Cephes' `expf` polynomial for `e^r` (about
/// 1 ulp of error; the test compares it with f64 `exp`). `x <= -87.3` gives ~1e-38, not 0.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `k * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding 1.5 * 2^23.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    // `k` sits in the low mantissa bits of `km`: integer arithmetic takes it out (an
    // `as i32` conversion, which saturates, keeps the loop from vectorizing).
    let km = fma(x, LOG2E, MAGIC);
    let k = km - MAGIC;
    let ki = km.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = fma(k, -LN2_LO, fma(k, -LN2_HI, x));
    let mut p = 1.987_569_2e-4;
    for c in [
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = fma(p, r, c);
    }
    let e = fma(p, r * r, r) + 1.0;
    e * f32::from_bits(((ki + 127) << 23) as u32)
}

/// `a b + c`, fused where the build targets FMA (x86-64-v3 does); elsewhere `mul_add`
/// would be a library call, so it is two operations there.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `z = exp(z - mx)` in place; returns the sum (a softmax's numerator and denominator).
pub(crate) fn exp_sub(z: &mut [f32], mx: f32) -> f32 {
    for v in z.iter_mut() {
        *v = fast_exp(*v - mx);
    }
    sum_f32(z)
}

#[inline]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `silu(g) u = g sigmoid(g) u`: the gated MLP's activation, one element.
#[inline]
pub(crate) fn silu_mul(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}

/// The backward of [`silu_mul`] given `da`: `(dg, du)`, with
/// `silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))`.
#[inline]
pub(crate) fn silu_mul_grad(g: f32, u: f32, da: f32) -> (f32, f32) {
    let sg = sigmoid(g);
    (da * u * sg * (1.0 + g * (1.0 - sg)), da * g * sg)
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_two_ulp_of_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        // f32 has a 2^-23 = 1.19e-7 relative spacing.
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }
}
