//! A Q8_0 x Q8_0 matrix product for the CPU, for many input rows at once: the output
//! projection of GGUF models whose head is Q8_0 (SmolLM2's tied embeddings, 49152 x 576).
//!
//! Continuous batching runs the head for every sequence of a decode step. candle's
//! quantized matmul computes each (input row, output row) pair in its own call of ggml's
//! `vec_dot_q8_0_q8_0`, converting both f16 block scales each time; `perf` put 17% of a
//! 32-chat run there. This kernel does the same arithmetic (activations rounded to 8 bits
//! per 32-value block, `d_w * d_x * sum(q_w * q_x)` per block, summed in eight float
//! lanes and reduced once per pair as candle does, so the logits are candle's to the
//! bit) with each weight block loaded and its scale converted once for four input rows,
//! and `vpdpbusd` where the CPU has AVX-VNNI.

use crate::kernels::pool::pool_items;
use crate::kernels::quant::{QK, round_block, weight_blocks};
use crate::kernels::shared::SharedBuf;
use crate::kernels::with_avx2;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// Output rows per work item: a tile of weights small enough to stay in L1 while every
/// input row passes over it.
const ROWS_PER_ITEM: usize = 16;

/// ggml's `block_q8_0` (value `j` = `d * qs[j]`), with `d` kept as the f32 it converts to.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Block {
    d: f32,
    qs: [i8; QK],
}

/// A Q8_0 matrix `[rows, cols]`, row-major blocks.
#[derive(Debug)]
pub struct Q80Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<Block>,
}

impl Q80Matrix {
    /// From a Q8_0 `QTensor` (ggml block layout: f16 d, then 32 signed bytes).
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols, blocks) = weight_blocks(q, GgmlDType::Q8_0, 2 + QK, |b| Block {
            d: f16::from_le_bytes([b[0], b[1]]).to_f32(),
            qs: std::array::from_fn(|j| b[2 + j] as i8),
        })?;
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The dense `[rows, cols]` f32 matrix (training dequantizes once).
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        let out: Vec<f32> = self
            .blocks
            .iter()
            .flat_map(|b| b.qs.map(|q| b.d * q as f32))
            .collect();
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// `x [.., cols] @ W^T -> [.., rows]`, f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let xs = x
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dimension") = self.rows;
        Tensor::from_vec(self.forward_rows(&xs)?.concat(), shape, &Device::Cpu)
    }

    /// `xs` (rows of `cols`) times `W^T`: each input row's `rows` outputs in a vector of
    /// its own (the logits of each sequence of a decode step).
    pub fn forward_rows(&self, xs: &[f32]) -> candle_core::Result<Vec<Vec<f32>>> {
        let cols = self.cols;
        if !xs.len().is_multiple_of(cols) {
            candle_core::bail!("Q8_0 matmul: {} inputs are not rows of {cols}", xs.len());
        }
        let n = xs.len() / cols;
        let nb = cols / QK;
        let acts: Vec<Block> = xs.chunks_exact(QK).map(quantize).collect();
        let mut out: Vec<Vec<f32>> = (0..n).map(|_| vec![0f32; self.rows]).collect();
        let dst: Vec<SharedBuf> = out.iter_mut().map(|v| SharedBuf::new(v)).collect();
        let items = self.rows.div_ceil(ROWS_PER_ITEM);
        pool_items(items, |item| {
            let r0 = item * ROWS_PER_ITEM;
            let r1 = (r0 + ROWS_PER_ITEM).min(self.rows);
            let w = &self.blocks[r0 * nb..r1 * nb];
            let mut tile = [0f32; 4 * ROWS_PER_ITEM];
            for t0 in (0..n).step_by(4) {
                let k = (n - t0).min(4);
                tile_dot(w, nb, &acts[t0 * nb..(t0 + k) * nb], &mut tile);
                for (t, got) in tile.chunks_exact(ROWS_PER_ITEM).take(k).enumerate() {
                    // SAFETY: columns `r0..r1` of every output row are this item's alone.
                    #[allow(unsafe_code)]
                    let d = unsafe { dst[t0 + t].slice_mut(r0..r1) };
                    d.copy_from_slice(&got[..r1 - r0]);
                }
            }
        });
        drop(dst);
        Ok(out)
    }
}

/// candle's (and ggml's) `quantize_row_q8_0` of one block, `d` rounded to f16 as stored.
fn quantize(x: &[f32]) -> Block {
    let (d, qs) = round_block(x);
    Block {
        d: f16::from_f32(d).to_f32(),
        qs,
    }
}

/// `out[t * ROWS_PER_ITEM + i]` = weight row `i` of `w` (`nb` blocks each) times input row
/// `t` of `acts` (one to four rows of `nb` blocks).
fn tile_dot(w: &[Block], nb: usize, acts: &[Block], out: &mut [f32]) {
    with_avx2!(
        avx2::tile_dot(w, nb, acts, out),
        for (t, x) in acts.chunks_exact(nb).enumerate() {
            for (i, wr) in w.chunks_exact(nb).enumerate() {
                out[t * ROWS_PER_ITEM + i] = dot_generic(wr, x);
            }
        }
    )
}

/// One weight row times one input row, block by block (the portable path, and the
/// tests' reference).
#[cfg(any(test, not(avx2_kernels)))]
fn dot_generic(w: &[Block], x: &[Block]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(wb, xb)| {
            let sum: i32 = wb
                .qs
                .iter()
                .zip(&xb.qs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
            wb.d * xb.d * sum as f32
        })
        .sum()
}

#[cfg(avx2_kernels)]
mod avx2 {
    use super::*;
    use crate::kernels::with_vnni;

    /// Products of a weight block's magnitudes (`aw`, unsigned) with an input block
    /// signed by the weights' signs (`sx`), four adjacent ones per 32-bit lane, as floats:
    /// `vpmaddubsw` + `vpmaddwd` (pairs of at most 128 * 127 fit 16 bits).
    macro_rules! block_sums {
        ($aw:expr, $sx:expr) => {
            _mm256_cvtepi32_ps(_mm256_madd_epi16(
                _mm256_maddubs_epi16($aw, $sx),
                _mm256_set1_epi16(1),
            ))
        };
    }

    /// [`block_sums`] in one AVX-VNNI `vpdpbusd`: the same four products per lane.
    macro_rules! block_sums_vnni {
        ($aw:expr, $sx:expr) => {
            _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), $aw, $sx))
        };
    }

    macro_rules! tile_kernel {
        ($features:literal, $sums:ident) => {
            /// Four (or fewer) input rows against each weight row of the tile: each weight
            /// block is loaded once for all of them. Per pair, candle's arithmetic: eight
            /// float lanes, `fma(d_w * d_x, sums, acc)` per block, reduced as its
            /// `hsum_float_8`.
            #[target_feature(enable = $features)]
            pub(in super::super) fn tile_dot(
                w: &[Block],
                nb: usize,
                acts: &[Block],
                out: &mut [f32],
            ) {
                let k = acts.len() / nb;
                let load = |b: &Block| crate::kernels::bytes32!(b.qs);
                for (i, wr) in w.chunks_exact(nb).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for (b, wb) in wr.iter().enumerate() {
                        let wq = load(wb);
                        let aw = _mm256_sign_epi8(wq, wq);
                        for (t, acc) in acc.iter_mut().enumerate().take(k) {
                            let xb = &acts[t * nb + b];
                            let sx = _mm256_sign_epi8(load(xb), wq);
                            let d = _mm256_set1_ps(wb.d * xb.d);
                            *acc = _mm256_fmadd_ps(d, $sums!(aw, sx), *acc);
                        }
                    }
                    for (t, acc) in acc.iter().enumerate().take(k) {
                        out[t * ROWS_PER_ITEM + i] = crate::kernels::hsum8!(*acc);
                    }
                }
            }
        };
    }

    pub(super) mod plain {
        use super::super::*;
        use std::arch::x86_64::*;
        tile_kernel!("avx2,fma,f16c", block_sums);
    }

    pub(super) mod vnni {
        use super::super::*;
        use std::arch::x86_64::*;
        tile_kernel!("avx2,fma,f16c,avxvnni", block_sums_vnni);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn tile_dot(w: &[Block], nb: usize, acts: &[Block], out: &mut [f32]) {
        with_vnni!(
            vnni::tile_dot(w, nb, acts, out),
            plain::tile_dot(w, nb, acts, out)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::random_quantized;
    use candle_core::Module;
    use candle_core::quantized::QMatMul;

    #[test]
    fn the_kernel_gives_candles_q8_0_matmul_to_the_bit() {
        // Reference: candle's own Q8_0 matmul (ggml's `vec_dot_q8_0_q8_0`) on the same
        // quantized weights; both round the input to 8 bits per block the same way.
        let dev = Device::Cpu;
        let q = random_quantized(83, 128, GgmlDType::Q8_0);
        let ours = Q80Matrix::from_qtensor(&q).unwrap();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for rows in [1, 3, 4, 6, 9] {
            let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).unwrap();
            let want = theirs.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let got = ours.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
                assert_eq!(got, want, "{rows} rows");
            } else {
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
    }

    #[cfg(avx2_kernels)]
    #[test]
    fn the_vnni_kernel_gives_the_avx2_kernels_sums_to_the_bit() {
        if !crate::kernels::has_vnni() {
            eprintln!("SKIPPED: this CPU has no AVX-VNNI");
            return;
        }
        let m = Q80Matrix::from_qtensor(&random_quantized(ROWS_PER_ITEM, 128, GgmlDType::Q8_0))
            .unwrap();
        let x = crate::testing::randn_vec(3 * 128, 3.0);
        let acts: Vec<Block> = x.chunks_exact(QK).map(quantize).collect();
        let (mut a, mut b) = ([0f32; 4 * ROWS_PER_ITEM], [0f32; 4 * ROWS_PER_ITEM]);
        // SAFETY: this build targets AVX2, FMA and F16C; the CPU has AVX-VNNI (checked).
        #[allow(unsafe_code)]
        unsafe {
            avx2::vnni::tile_dot(&m.blocks, 4, &acts, &mut a);
            avx2::plain::tile_dot(&m.blocks, 4, &acts, &mut b);
        }
        assert_eq!(a, b);
    }

    #[test]
    fn the_simd_kernel_agrees_with_the_portable_loop() {
        // Hand-made extremes: -128 weights (whose magnitude is 128) against 127 inputs,
        // where a 16-bit pair sum comes closest to saturating.
        let nb = 2;
        let w: Vec<Block> = (0..ROWS_PER_ITEM * nb)
            .map(|i| Block {
                d: 0.5 + i as f32 * 0.01,
                qs: std::array::from_fn(|j| {
                    if (i + j) % 3 == 0 {
                        -128
                    } else {
                        (j as i8) - 16
                    }
                }),
            })
            .collect();
        let acts: Vec<Block> = (0..3 * nb)
            .map(|i| Block {
                d: 0.25 + i as f32 * 0.1,
                qs: std::array::from_fn(|j| if j % 2 == 0 { 127 } else { -127 + i as i8 }),
            })
            .collect();
        let mut out = [0f32; 4 * ROWS_PER_ITEM];
        tile_dot(&w, nb, &acts, &mut out);
        for t in 0..3 {
            for i in 0..ROWS_PER_ITEM {
                let want = dot_generic(&w[i * nb..(i + 1) * nb], &acts[t * nb..(t + 1) * nb]);
                let got = out[t * ROWS_PER_ITEM + i];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }
}
