//! ggml's blocks of 32 values: a quantized weight matrix's blocks read out of a `QTensor`,
//! and activations rounded to 8 bits per block, as ggml's `quantize_row_q8_0` and
//! `quantize_row_q8_1` do before an integer dot product with quantized weights.

use candle_core::quantized::{GgmlDType, QTensor};

/// Values per block.
pub(crate) const QK: usize = 32;

/// The `(rows, cols, blocks)` of a 2-D `dtype` tensor, each block of `block_bytes` read by
/// `read`; refused when the type, the shape or the data's length is off.
pub(crate) fn weight_blocks<B>(
    q: &QTensor,
    dtype: GgmlDType,
    block_bytes: usize,
    read: impl Fn(&[u8]) -> B,
) -> candle_core::Result<(usize, usize, Vec<B>)> {
    if q.dtype() != dtype {
        candle_core::bail!("not a {dtype:?} tensor: {:?}", q.dtype());
    }
    let (rows, cols) = q.shape().dims2()?;
    if !cols.is_multiple_of(QK) {
        candle_core::bail!("{dtype:?} rows of {cols} are not whole blocks");
    }
    let blocks: Vec<B> = q.data()?.chunks_exact(block_bytes).map(read).collect();
    if blocks.len() != rows * cols / QK {
        candle_core::bail!(
            "{dtype:?} data holds {} blocks, expected {}",
            blocks.len(),
            rows * cols / QK
        );
    }
    Ok((rows, cols, blocks))
}

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
