//! A Q4_1 x Q8_1 matrix product for the CPU.
//!
//! candle 0.11 computes Q4_1 dot products with its scalar reference loop and converts the
//! four f16 block scales on every block. This kernel follows ggml's
//! `ggml_vec_dot_q4_1_q8_1` arithmetic (activations rounded to 8 bits per 32-value block,
//! `d_w * d_x * sum(q_w * q_x) + m_w * s_x`), keeps the weight scales as f32, unpacks the
//! nibbles so LLVM vectorizes the multiply-accumulate, and splits the output rows over
//! candle's own worker pool (a second pool would fight it for the same cores).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use std::sync::Mutex;

const QK: usize = 32;

#[derive(Debug, Clone, Copy)]
struct WeightBlock {
    d: f32,
    m: f32,
    qs: [u8; QK / 2],
}

#[derive(Debug, Clone, Copy)]
struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 matrix `[rows, cols]`, row-major blocks.
#[derive(Debug)]
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<WeightBlock>,
}

/// Output rows per work item.
const ROWS_PER_ITEM: usize = 32;

impl Q41Matrix {
    /// From a Q4_1 `QTensor` (ggml block layout: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Self> {
        if q.dtype() != GgmlDType::Q4_1 {
            candle_core::bail!("not a Q4_1 tensor: {:?}", q.dtype());
        }
        let (rows, cols) = q.shape().dims2()?;
        if !cols.is_multiple_of(QK) {
            candle_core::bail!("Q4_1 rows of {cols} are not whole blocks");
        }
        let data = q.data()?;
        let blocks: Vec<WeightBlock> = data
            .chunks_exact(20)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..20]);
                WeightBlock {
                    d: f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    m: f16::from_le_bytes([b[2], b[3]]).to_f32(),
                    qs,
                }
            })
            .collect();
        if blocks.len() != rows * cols / QK {
            candle_core::bail!(
                "Q4_1 data holds {} blocks, expected {}",
                blocks.len(),
                rows * cols / QK
            );
        }
        Ok(Self { rows, cols, blocks })
    }

    /// The dense `[rows, cols]` f32 matrix (`d * q + m` per weight, ggml's nibble order:
    /// low nibbles are the first half of a block). Training dequantizes once.
    pub fn dequantize(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in &self.blocks {
            let start = out.len();
            out.resize(start + QK, 0f32);
            let dst = &mut out[start..];
            for (j, &q) in b.qs.iter().enumerate() {
                dst[j] = b.d * (q & 0x0F) as f32 + b.m;
                dst[j + QK / 2] = b.d * (q >> 4) as f32 + b.m;
            }
        }
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// `x [.., cols] @ W^T -> [.., rows]`, f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let cols = dims[dims.len() - 1];
        if cols != self.cols {
            candle_core::bail!(
                "Q4_1 matmul: input has {cols} columns, weight {}",
                self.cols
            );
        }
        let n = x.elem_count() / cols;
        let xs = x
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let acts: Vec<ActBlock> = xs.chunks_exact(QK).map(quantize_q8_1).collect();
        let nb = self.cols / QK;
        // Results by weight row ([rows, n]); each work item owns whole rows.
        let mut by_row = vec![0f32; self.rows * n];
        {
            let items: Vec<Mutex<&mut [f32]>> = by_row
                .chunks_mut(ROWS_PER_ITEM * n)
                .map(Mutex::new)
                .collect();
            candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
                for item in range {
                    let mut dst = items[item].lock().unwrap_or_else(|e| e.into_inner());
                    for (i, d) in dst.chunks_exact_mut(n).enumerate() {
                        let r = item * ROWS_PER_ITEM + i;
                        let w = &self.blocks[r * nb..(r + 1) * nb];
                        for (t, v) in d.iter_mut().enumerate() {
                            *v = dot_row(w, &acts[t * nb..(t + 1) * nb]);
                        }
                    }
                }
            });
        }
        let out = if n == 1 {
            by_row
        } else {
            let mut out = vec![0f32; n * self.rows];
            for r in 0..self.rows {
                for t in 0..n {
                    out[t * self.rows + r] = by_row[r * n + t];
                }
            }
            out
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = self.rows;
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

/// ggml's `quantize_row_q8_1`: d = max|x| / 127, q = round(x / d), s = d * sum(q), both
/// scales rounded to f16 as ggml stores them.
fn quantize_q8_1(x: &[f32]) -> ActBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    ActBlock {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(sum as f32 * d).to_f32(),
        qs,
    }
}

/// One weight row times one activation row: the AVX2 kernel where the build has AVX2 and
/// FMA (x86-64-v3, see `.cargo/config.toml`), the portable loop otherwise.
#[inline]
fn dot_row(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: `dot_row_avx2` only needs AVX2 and FMA, and this code exists only in a
        // build compiled for CPUs that have both (the `cfg` above): the whole binary
        // already uses them.
        #[allow(unsafe_code)]
        unsafe {
            dot_row_avx2(w, x)
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_row_generic(w, x)
    }
}

/// The same sum as [`dot_row_generic`] with the integer products in one `vpmaddubsw`
/// (unsigned 4-bit weights times signed 8-bit activations, pairs added into 16 bits:
/// at most 2 * 15 * 128, no saturation) and one `vpmaddwd` per block, and the block
/// scales applied in an 8-lane float accumulator, reduced once per row instead of once
/// per block. Loads go through `_mm*_set_epi64x` from byte arrays, which the compiler
/// turns into plain unaligned loads, so there is no pointer arithmetic.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[target_feature(enable = "avx2,fma")]
fn dot_row_avx2(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
    use std::arch::x86_64::*;
    let u64_at = |b: &[u8], i: usize| -> i64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i * 8..i * 8 + 8]);
        i64::from_le_bytes(a)
    };
    let i64_at = |b: &[i8; QK], i: usize| -> i64 {
        let a: [u8; 8] = std::array::from_fn(|k| b[i * 8 + k] as u8);
        i64::from_le_bytes(a)
    };
    let low_nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let packed = _mm_set_epi64x(u64_at(&wb.qs, 1), u64_at(&wb.qs, 0));
        // ggml's order: the low nibbles are the block's first 16 values, the high ones
        // the last 16.
        let wq = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
            low_nibbles,
        );
        let xq = _mm256_set_epi64x(
            i64_at(&xb.qs, 3),
            i64_at(&xb.qs, 2),
            i64_at(&xb.qs, 1),
            i64_at(&xb.qs, 0),
        );
        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * xb.d), _mm256_cvtepi32_ps(sums), acc);
        mins += wb.m * xb.s;
    }
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let one = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    _mm_cvtss_f32(one) + mins
}

/// The portable dot product of one weight row with one activation row (on x86-64-v3
/// builds only the tests' reference for the AVX2 kernel).
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
#[inline]
fn dot_row_generic(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        // Unpack the nibbles to one i8 array, then one 32-lane multiply-accumulate:
        // the shape LLVM vectorizes to vpmovsxbw + vpmaddwd.
        let mut wq = [0i8; QK];
        for j in 0..QK / 2 {
            wq[j] = (wb.qs[j] & 0x0F) as i8;
            wq[j + QK / 2] = (wb.qs[j] >> 4) as i8;
        }
        let sumi: i32 = wq
            .iter()
            .zip(&xb.qs)
            .map(|(a, b)| *a as i16 as i32 * *b as i16 as i32)
            .sum();
        sum += wb.d * xb.d * sumi as f32 + wb.m * xb.s;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::quantized::QMatMul;

    #[test]
    fn the_kernel_is_as_accurate_as_candles_q4_1_matmul() {
        // Reference: the dequantized weights times the f32 input, in f32. Both ours and
        // candle's ggml-style kernel round the input to 8 bits per block, so both differ
        // from it by that rounding; ours must not be worse.
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (80, 128), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let exact_w = q.dequantize(&dev).unwrap();
        let ours = Q41Matrix::from_qtensor(&q).unwrap();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).unwrap();
            let reference = x.matmul(&exact_w.t().unwrap()).unwrap();
            let max_abs = |t: &Tensor| -> f32 {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            let max_err = |t: Tensor| max_abs(&(t - &reference).unwrap());
            let scale = max_abs(&reference);
            let ours_err = max_err(ours.forward(&x).unwrap());
            let theirs_err = max_err(theirs.forward(&x).unwrap());
            assert!(
                ours_err <= 1.5 * theirs_err + 1e-4,
                "ours {ours_err}, candle {theirs_err}"
            );
            assert!(
                ours_err < 0.01 * scale,
                "ours {ours_err} at output scale {scale}"
            );
        }
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn the_avx2_dot_product_is_the_portable_one() {
        // Same integer products, scales applied in another order: equal up to float
        // rounding. Reference: the portable loop, itself checked against the dequantized
        // f32 product above.
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 576), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let m = Q41Matrix::from_qtensor(&q).unwrap();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, 576, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_q8_1).collect();
        let nb = 576 / QK;
        for r in 0..4 {
            let row = &m.blocks[r * nb..(r + 1) * nb];
            let (fast, slow) = (dot_row(row, &acts), dot_row_generic(row, &acts));
            assert!(
                (fast - slow).abs() <= 1e-4 * slow.abs().max(1.0),
                "row {r}: avx2 {fast}, portable {slow}"
            );
        }
        // Extremes: every nibble 15 against every activation -128 (the largest pair sums).
        let wb = WeightBlock {
            d: 1.0,
            m: 0.0,
            qs: [0xFF; QK / 2],
        };
        let xb = ActBlock {
            d: 1.0,
            s: 0.0,
            qs: [-128; QK],
        };
        assert_eq!(dot_row(&[wb], &[xb]), (15 * -128 * QK as i32) as f32);
        assert_eq!(
            dot_row_generic(&[wb], &[xb]),
            (15 * -128 * QK as i32) as f32
        );
    }
}
