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

#[inline]
fn dot_row(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
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
}
