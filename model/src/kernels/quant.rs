//! Activations rounded to 8 bits per block of 32, as ggml's `quantize_row_q8_0` and
//! `quantize_row_q8_1` do before an integer dot product with quantized weights.

/// Values per block.
pub(crate) const QK: usize = 32;

/// One block of `x` (32 values): `(d, q)` with `d = max|x| / 127` and `q = round(x / d)`,
/// halves rounded away from zero (C's `roundf`, as ggml's reference does). `d` is
/// returned unrounded; the callers store it rounded to f16 as ggml does.
#[inline]
pub(crate) fn round_block(x: &[f32]) -> (f32, [i8; QK]) {
    // Eight lanes, so the loops vectorize (`f32::round` is a library call per value).
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for k in 0..8 {
            lanes[k] = lanes[k].max(c[k].abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8;
    }
    (d, qs)
}

/// `x.round()` without the library call: the integer part, plus one step away from zero
/// when the (exact) fractional part is at least a half.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_roundf() {
        let mut x = -300.0f32;
        while x < 300.0 {
            for v in [x, x + 0.5, x - 0.5, f32::from_bits((x + 0.5).to_bits() - 1)] {
                assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
            }
            x += 0.037;
        }
        for v in [0.5, -0.5, 1.5, -2.5, 0.49999997, -0.0, 8388609.0, 1e30] {
            assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
        }
    }

    #[test]
    fn a_block_rounds_like_the_scalar_reference() {
        let x: Vec<f32> = (0..QK)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
            .collect();
        let (d, qs) = round_block(&x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(d, amax / 127.0);
        for (q, v) in qs.iter().zip(&x) {
            assert_eq!(*q, (v / d).round() as i8, "{v}");
        }
        assert_eq!(round_block(&[0.0; QK]), (0.0, [0; QK]));
    }
}
