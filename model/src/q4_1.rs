//! A Q4_1 x Q8_1 matrix product for the CPU, with LoRA deltas fused in.
//!
//! candle 0.11 computes Q4_1 dot products with its scalar reference loop and converts the
//! four f16 block scales on every block. This kernel follows ggml's
//! `ggml_vec_dot_q4_1_q8_1` arithmetic (activations rounded to 8 bits per 32-value block,
//! `d_w * d_x * sum(q_w * q_x) + m_w * s_x`) on the weights in ggml's own 20-byte block
//! layout (decode reads every weight once per token, so bytes per weight set its speed),
//! and splits the output rows over candle's own worker pool (a second pool would fight it
//! for the same cores).
//!
//! [`forward_many`] runs several projections of the same input (q, k and v; gate and up)
//! in one trip through the pool, quantizing the input once, and computes each LoRA delta
//! `scale * B (A x)` inside the same trip: the rows of `A x` first, then every output row
//! adds its `B` row times `A x` while it is in cache. Decode with an adapter thus reads the
//! adapter's weights on all cores, with no extra tensors, copies or pool trips.

use crate::kernels::quant::{QK, round_block, weight_blocks};
use crate::kernels::reduce::dot_f32;
use crate::kernels::shared::SharedBuf;
use crate::kernels::with_avx2;
use crate::lora::host::{B_TILE, HostLora};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use std::sync::atomic::{AtomicUsize, Ordering};

/// ggml's `block_q4_1`: f16 `d`, f16 `m`, then 16 bytes of nibbles (value `j` of the
/// block is the low nibble of byte `j` for `j < 16`, the high nibble of byte `j - 16`
/// otherwise); weight = `d * q + m`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct WeightBlock {
    dm: [u16; 2],
    qs: [u8; QK / 2],
}

impl WeightBlock {
    fn d(&self) -> f32 {
        f16::from_bits(self.dm[0]).to_f32()
    }
    fn m(&self) -> f32 {
        f16::from_bits(self.dm[1]).to_f32()
    }
}

/// A block of 32 activations rounded to 8 bits: `x ≈ d * q`, `s = d * sum(q)`.
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

/// Output rows per work item: one tile of a host LoRA's `B`.
const ROWS_PER_ITEM: usize = B_TILE;

impl Q41Matrix {
    /// From a Q4_1 `QTensor` (ggml block layout: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols, blocks) = weight_blocks(q, GgmlDType::Q4_1, 20, |b| {
            let mut qs = [0u8; QK / 2];
            qs.copy_from_slice(&b[4..20]);
            WeightBlock {
                dm: [
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                ],
                qs,
            }
        })?;
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The dense `[rows, cols]` f32 matrix (`d * q + m` per weight, ggml's nibble order:
    /// low nibbles are the first half of a block). Training dequantizes once.
    pub fn dequantize(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in &self.blocks {
            let start = out.len();
            out.resize(start + QK, 0f32);
            let dst = &mut out[start..];
            let (d, m) = (b.d(), b.m());
            for (j, &q) in b.qs.iter().enumerate() {
                dst[j] = d * (q & 0x0F) as f32 + m;
                dst[j + QK / 2] = d * (q >> 4) as f32 + m;
            }
        }
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// `x [.., cols] @ W^T -> [.., rows]`, f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut out = forward_many(x, &[(self, None)])?;
        Ok(out.pop().expect("one projection in, one out"))
    }
}

/// `x [.., cols] @ W_i^T (+ scale_i * B_i (A_i x))` for each `(W_i, lora_i)`, all with
/// the same input: one quantization of `x`, one trip through the worker pool.
pub fn forward_many(
    x: &Tensor,
    projections: &[(&Q41Matrix, Option<&HostLora>)],
) -> candle_core::Result<Vec<Tensor>> {
    let dims = x.dims();
    let cols = dims[dims.len() - 1];
    let xs = x
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    forward_many_host(&xs, cols, projections)?
        .into_iter()
        .zip(projections)
        .map(|(data, (w, _))| {
            let mut shape = dims.to_vec();
            *shape.last_mut().expect("x has a last dimension") = w.rows;
            Tensor::from_vec(data, shape, &Device::Cpu)
        })
        .collect()
}

/// [`forward_many`] on host memory: `xs` holds `n` rows of `cols`; each result holds `n`
/// rows of its projection's outputs.
pub fn forward_many_host(
    xs: &[f32],
    cols: usize,
    projections: &[(&Q41Matrix, Option<&HostLora>)],
) -> candle_core::Result<Vec<Vec<f32>>> {
    if cols == 0 || !xs.len().is_multiple_of(cols) {
        candle_core::bail!("Q4_1 matmul: {} inputs are not rows of {cols}", xs.len());
    }
    for (w, lora) in projections {
        if w.cols != cols {
            candle_core::bail!("Q4_1 matmul: input has {cols} columns, weight {}", w.cols);
        }
        if let Some(l) = lora
            && (l.in_dim() != cols || l.out_dim() != w.rows)
        {
            candle_core::bail!(
                "LoRA pair of [{}, {}] on a [{}, {}] weight",
                l.out_dim(),
                l.in_dim(),
                w.rows,
                w.cols
            );
        }
    }
    let n = xs.len() / cols;
    let acts: Vec<ActBlock> = xs.chunks_exact(QK).map(quantize_q8_1).collect();
    let nb = cols / QK;

    // The work: first every LoRA `A` row (its dot products with each input row go to
    // `u`), then the weight rows in items of `ROWS_PER_ITEM`. Workers claim chunks of each
    // from two shared cursors (one claim per item made the cursor's cache line bounce
    // between cores thousands of times per token), the `A` rows first. A worker that has
    // weight rows of a projection with an adapter waits until all `A` rows are done: they
    // were all claimed before it moved on, by workers that are running them.
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let a_rows: usize = projections
        .iter()
        .map(|(_, l)| l.map_or(0, |l| l.rank()))
        .sum();
    let mut a_start = Vec::with_capacity(projections.len());
    let mut item_start = Vec::with_capacity(projections.len() + 1);
    let (mut a_acc, mut item_acc) = (0, 0);
    for (w, l) in projections {
        a_start.push(a_acc);
        a_acc += l.map_or(0, |l| l.rank());
        item_start.push(item_acc);
        item_acc += w.rows.div_ceil(ROWS_PER_ITEM);
    }
    item_start.push(item_acc);
    let total_items = item_acc;
    // About eight claims per thread per phase: few enough that claiming is cheap, enough
    // that a thread slowed by another process leaves its share to the others.
    let a_chunk = a_rows.div_ceil(threads * 8).max(1);
    let item_chunk = total_items.div_ceil(threads * 8).max(1);

    // `u[a_row * n + t]`: `A` row times input row `t`.
    let u: Vec<AtomicF32> = (0..a_rows * n).map(|_| AtomicF32::default()).collect();
    let a_done = CacheLine(AtomicUsize::new(0));
    let a_cursor = CacheLine(AtomicUsize::new(0));
    let cursor = CacheLine(AtomicUsize::new(0));
    // Results by input row (`[n, rows]`), one buffer per projection; every work item
    // writes only its own weight rows' columns.
    let mut out_data: Vec<Vec<f32>> = projections
        .iter()
        .map(|(w, _)| vec![0f32; w.rows * n])
        .collect();
    let outs: Vec<SharedBuf> = out_data.iter_mut().map(|v| SharedBuf::new(v)).collect();

    let a_row = |row: usize| {
        // Which projection's adapter, which of its rows.
        let p = a_start.partition_point(|&s| s <= row) - 1;
        let lora = projections[p]
            .1
            .expect("A rows belong to projections with an adapter");
        let a = lora.a_row16(row - a_start[p]);
        if n == 1 {
            u[row].set(dot_f16(a, xs));
        } else {
            let a: Vec<f32> = a.iter().map(|&h| f16::from_bits(h).to_f32()).collect();
            for t in 0..n {
                u[row * n + t].set(dot_f32(&a, &xs[t * cols..(t + 1) * cols]));
            }
        }
    };
    let weight_rows = |item: usize| {
        let p = item_start.partition_point(|&s| s <= item) - 1;
        let (w, lora) = projections[p];
        let r0 = (item - item_start[p]) * ROWS_PER_ITEM;
        let r1 = (r0 + ROWS_PER_ITEM).min(w.rows);
        // The item's results by weight row (`[r1 - r0, n]`): in the output itself for one
        // input row, else in a scratch tile that is copied out at the end.
        let mut scratch = Vec::new();
        let dst: &mut [f32] = if n == 1 {
            // SAFETY: rows `r0..r1` of projection `p` are this work item's alone (the
            // cursor hands each item out once).
            #[allow(unsafe_code)]
            unsafe {
                outs[p].slice_mut(r0..r1)
            }
        } else {
            scratch.resize((r1 - r0) * n, 0f32);
            &mut scratch
        };
        rows_dot(&w.blocks[r0 * nb..r1 * nb], nb, &acts, n, dst);
        if let Some(lora) = lora {
            while a_done.0.load(Ordering::Acquire) < a_rows {
                std::hint::spin_loop();
            }
            // y[r, t] += sum_j (sB)[r, j] u[j, t], as rank-many multiply-adds of
            // contiguous runs: over this item's rows for one input row (decode), over the
            // input rows for one weight row otherwise.
            let rank = lora.rank();
            let tile = lora.b_tile16(r0 / ROWS_PER_ITEM);
            let uj = |j: usize, t: usize| u[(a_start[p] + j) * n + t].get();
            if n == 1 {
                // With one input row, `u` of this projection is `rank` consecutive values.
                let first = a_start[p];
                tile_axpy_f16(dst, &u[first..first + rank], tile);
            } else {
                let us: Vec<f32> = (0..rank * n).map(|k| uj(k / n, k % n)).collect();
                for (i, d) in dst.chunks_exact_mut(n).enumerate() {
                    for (j, bj) in tile.chunks_exact(ROWS_PER_ITEM).enumerate() {
                        let b = f16::from_bits(bj[i]).to_f32();
                        for (d, u) in d.iter_mut().zip(&us[j * n..(j + 1) * n]) {
                            *d += b * u;
                        }
                    }
                }
            }
        }
        if n > 1 {
            for t in 0..n {
                // SAFETY: columns `r0..r1` of every output row of projection `p` are this
                // work item's alone.
                #[allow(unsafe_code)]
                let out = unsafe { outs[p].slice_mut(t * w.rows + r0..t * w.rows + r1) };
                for (o, row) in out.iter_mut().zip(dst.chunks_exact(n)) {
                    *o = row[t];
                }
            }
        }
    };
    let work = || {
        loop {
            let start = a_cursor.0.fetch_add(a_chunk, Ordering::Relaxed);
            if start >= a_rows {
                break;
            }
            let end = a_rows.min(start + a_chunk);
            (start..end).for_each(a_row);
            a_done.0.fetch_add(end - start, Ordering::Release);
        }
        loop {
            let start = cursor.0.fetch_add(item_chunk, Ordering::Relaxed);
            if start >= total_items {
                break;
            }
            (start..total_items.min(start + item_chunk)).for_each(weight_rows);
        }
    };
    // One claim per thread; each then drains the shared cursor (inline, in order, when
    // called from inside the pool).
    pool.execute_chunked(threads, |range| range.for_each(|_| work()));
    drop(outs);

    Ok(out_data)
}

/// A value alone on its cache line (two lines: the adjacent-line prefetcher pairs them),
/// so workers updating one atomic do not slow down readers of its neighbours.
#[repr(align(128))]
struct CacheLine<T>(T);

/// `dst[i * n + t]` = weight row `i` of `w` (`nb` blocks each) times activation row `t`.
fn rows_dot(w: &[WeightBlock], nb: usize, acts: &[ActBlock], n: usize, dst: &mut [f32]) {
    with_avx2!(
        avx2::rows_dot(w, nb, acts, n, dst),
        rows_dot_with(w, nb, acts, n, dst, dot_row_generic, |w, x| {
            x.map(|x| dot_row_generic(w, x))
        })
    )
}

/// The loops of [`rows_dot`] around a one-row and a four-row kernel. Four input rows at
/// a time against each weight row (prompt processing): the weight nibbles are unpacked
/// once for all four, and the four activation rows and the item's weight rows stay in L1.
#[inline(always)]
fn rows_dot_with(
    w: &[WeightBlock],
    nb: usize,
    acts: &[ActBlock],
    n: usize,
    dst: &mut [f32],
    one: impl Fn(&[WeightBlock], &[ActBlock]) -> f32,
    four: impl Fn(&[WeightBlock], [&[ActBlock]; 4]) -> [f32; 4],
) {
    let act = |t: usize| &acts[t * nb..(t + 1) * nb];
    let quads = n / 4 * 4;
    for t in (0..quads).step_by(4) {
        for (wr, d) in w.chunks_exact(nb).zip(dst.chunks_exact_mut(n)) {
            d[t..t + 4].copy_from_slice(&four(wr, [act(t), act(t + 1), act(t + 2), act(t + 3)]));
        }
    }
    for (wr, d) in w.chunks_exact(nb).zip(dst.chunks_exact_mut(n)) {
        for (t, v) in d.iter_mut().enumerate().skip(quads) {
            *v = one(wr, act(t));
        }
    }
}

/// `a` (f16 bit patterns) dotted with `x`.
fn dot_f16(a: &[u16], x: &[f32]) -> f32 {
    with_avx2!(
        avx2::dot_f16(a, x),
        a.iter()
            .zip(x)
            .map(|(&a, x)| f16::from_bits(a).to_f32() * x)
            .sum()
    )
}

/// `y += scale * B (A x)` for one row, from the pair's f16 copies, with the kernels
/// [`forward_many_host`] applies a pair with for one input row: a row on its own adapter
/// in a batch of rows on others (`crate::llama::decode`) gets the numbers it gets alone.
pub(crate) fn add_lora_f16(lora: &HostLora, x: &[f32], y: &mut [f32]) {
    let u: Vec<AtomicF32> = (0..lora.rank())
        .map(|j| {
            let v = AtomicF32::default();
            v.set(dot_f16(lora.a_row16(j), x));
            v
        })
        .collect();
    for (k, dst) in y.chunks_mut(ROWS_PER_ITEM).enumerate() {
        tile_axpy_f16(dst, &u, lora.b_tile16(k));
    }
}

/// `dst[i] += sum_j us[j] * tile[j * ROWS_PER_ITEM + i]` for one LoRA `B` tile in f16
/// (`dst`: up to `ROWS_PER_ITEM` outputs).
fn tile_axpy_f16(dst: &mut [f32], us: &[AtomicF32], tile: &[u16]) {
    if dst.len() == ROWS_PER_ITEM {
        with_avx2!(
            {
                avx2::tile_axpy_f16(dst, us, tile);
                return;
            },
            ()
        )
    }
    for (c, bj) in us.iter().zip(tile.chunks_exact(ROWS_PER_ITEM)) {
        let c = c.get();
        for (d, &b) in dst.iter_mut().zip(bj) {
            *d += c * f16::from_bits(b).to_f32();
        }
    }
}

/// An f32 that several workers can write (each element by one worker) and read after a
/// release/acquire handshake.
#[derive(Default)]
struct AtomicF32(std::sync::atomic::AtomicU32);

impl AtomicF32 {
    fn set(&self, v: f32) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// ggml's `quantize_row_q8_1`: d = max|x| / 127, q = round(x / d), s = d * sum(q), both
/// scales rounded to f16 as ggml stores them.
fn quantize_q8_1(x: &[f32]) -> ActBlock {
    let (d, qs) = round_block(x);
    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
    ActBlock {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(sum as f32 * d).to_f32(),
        qs,
    }
}

/// The portable dot product of one weight row with one activation row (on x86-64-v3
/// builds only the tests' reference for the AVX2 kernel).
#[cfg(any(test, not(avx2_kernels)))]
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
        sum += wb.d() * xb.d * sumi as f32 + wb.m() * xb.s;
    }
    sum
}

/// The AVX2 + FMA + F16C kernels (x86-64-v3 builds only; callers go through
/// `with_avx2!`).
#[cfg(avx2_kernels)]
mod avx2 {
    use super::*;
    use crate::kernels::{hsum8, with_vnni};
    use std::arch::x86_64::*;

    // The pieces the kernels below share, as macros: expanded in place inside the
    // `#[target_feature]` kernels (as functions they were not inlined into them, and
    // decode lost a sixth of its speed).

    /// A weight block's 32 nibbles as 32 bytes, in ggml's order: the low nibbles are the
    /// block's first 16 values, the high ones the last 16. (Loads go through
    /// `_mm*_set_epi*` from byte arrays, which the compiler turns into plain unaligned
    /// loads, so there is no pointer arithmetic.)
    macro_rules! weight_nibbles {
        ($wb:expr) => {{
            let u64_at = |i: usize| -> i64 {
                let mut a = [0u8; 8];
                a.copy_from_slice(&$wb.qs[i * 8..i * 8 + 8]);
                i64::from_le_bytes(a)
            };
            let packed = _mm_set_epi64x(u64_at(1), u64_at(0));
            _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
                _mm256_set1_epi8(0x0F),
            )
        }};
    }

    /// A weight block's f16 `d` and `m` as `[d, m, 0, 0]` (one `vcvtph2ps`).
    macro_rules! weight_scales {
        ($wb:expr) => {
            _mm_cvtph_ps(_mm_cvtsi32_si128(
                ($wb.dm[0] as u32 | ($wb.dm[1] as u32) << 16) as i32,
            ))
        };
    }

    /// `sum(q_w * q_x)` of a block pair as eight f32 lanes: `vpmaddubsw` (unsigned 4-bit
    /// weights times signed 8-bit activations, pairs added into 16 bits: at most
    /// 2 * 15 * 128, no saturation), then `vpmaddwd` with ones.
    macro_rules! block_sums {
        ($wq:expr, $xb:expr) => {{
            let xq = crate::kernels::bytes32!($xb.qs);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16($wq, xq), _mm256_set1_epi16(1));
            _mm256_cvtepi32_ps(sums)
        }};
    }

    /// [`block_sums`] in one AVX-VNNI `vpdpbusd`: each 32-bit lane gets the same four
    /// products added as `vpmaddubsw` + `vpmaddwd` give it, so the sums are identical.
    macro_rules! block_sums_vnni {
        ($wq:expr, $xb:expr) => {{
            let xq = crate::kernels::bytes32!($xb.qs);
            _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), $wq, xq))
        }};
    }

    /// [`super::rows_dot`] with the kernels inlined into its loops (one call per work
    /// item instead of one per weight row), AVX-VNNI's where the CPU has it.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rows_dot(
        w: &[WeightBlock],
        nb: usize,
        acts: &[ActBlock],
        n: usize,
        dst: &mut [f32],
    ) {
        with_vnni!(
            vnni::rows_dot(w, nb, acts, n, dst),
            plain::rows_dot(w, nb, acts, n, dst)
        )
    }

    /// One weight row times one activation row (the tests' entry point).
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_row(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
        with_vnni!(vnni::dot_row(w, x), plain::dot_row(w, x))
    }

    /// One weight row times four activation rows (the tests' entry point).
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_row4(w: &[WeightBlock], x: [&[ActBlock]; 4]) -> [f32; 4] {
        with_vnni!(vnni::dot_row4(w, x), plain::dot_row4(w, x))
    }

    /// Eight f16 bit patterns as eight f32 (`vcvtph2ps`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) fn f16x8(h: &[u16]) -> std::arch::x86_64::__m256 {
        let q = |i: usize| -> i64 {
            (h[i] as u64
                | (h[i + 1] as u64) << 16
                | (h[i + 2] as u64) << 32
                | (h[i + 3] as u64) << 48) as i64
        };
        _mm256_cvtph_ps(_mm_set_epi64x(q(4), q(0)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_f16(a: &[u16], x: &[f32]) -> f32 {
        let f32x8 = |v: &[f32]| _mm256_set_ps(v[7], v[6], v[5], v[4], v[3], v[2], v[1], v[0]);
        let (ac, xc) = (a.chunks_exact(16), x.chunks_exact(16));
        let tail: f32 = ac
            .remainder()
            .iter()
            .zip(xc.remainder())
            .map(|(&a, x)| f16::from_bits(a).to_f32() * x)
            .sum();
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (a, x) in ac.zip(xc) {
            s0 = _mm256_fmadd_ps(f16x8(&a[..8]), f32x8(&x[..8]), s0);
            s1 = _mm256_fmadd_ps(f16x8(&a[8..]), f32x8(&x[8..]), s1);
        }
        hsum8!(_mm256_add_ps(s0, s1)) + tail
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn tile_axpy_f16(dst: &mut [f32], us: &[AtomicF32], tile: &[u16]) {
        const _: () = assert!(ROWS_PER_ITEM == 16);
        let (mut y0, mut y1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (c, bj) in us.iter().zip(tile.chunks_exact(ROWS_PER_ITEM)) {
            let c = _mm256_set1_ps(c.get());
            y0 = _mm256_fmadd_ps(c, f16x8(&bj[..8]), y0);
            y1 = _mm256_fmadd_ps(c, f16x8(&bj[8..]), y1);
        }
        // SAFETY: `__m256` and `[f32; 8]` have the same size and every bit pattern is a
        // valid value of both.
        #[allow(unsafe_code)]
        let (lo, hi) = unsafe {
            (
                std::mem::transmute::<__m256, [f32; 8]>(y0),
                std::mem::transmute::<__m256, [f32; 8]>(y1),
            )
        };
        for (d, o) in dst.iter_mut().zip(lo.iter().chain(&hi)) {
            *d += o;
        }
    }

    /// The row kernels, for one set of target features and one block-sum macro.
    macro_rules! row_kernels {
        ($features:literal, $sums:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) fn rows_dot(
                w: &[WeightBlock],
                nb: usize,
                acts: &[ActBlock],
                n: usize,
                dst: &mut [f32],
            ) {
                rows_dot_with(
                    w,
                    nb,
                    acts,
                    n,
                    dst,
                    |w, x| dot_row(w, x),
                    |w, x| dot_row4(w, x),
                )
            }

            /// [`dot_row`] for four activation rows at once: each weight block is unpacked and
            /// its scales converted once, then multiplied with the four activation blocks into four
            /// accumulators (same per-row arithmetic, so the same sums up to float rounding).
            #[target_feature(enable = $features)]
            #[inline]
            pub(in super::super) fn dot_row4(w: &[WeightBlock], x: [&[ActBlock]; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut mins = [0f32; 4];
                for (b, wb) in w.iter().enumerate() {
                    let wq = weight_nibbles!(wb);
                    let dm = weight_scales!(wb);
                    let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                    for k in 0..4 {
                        let xb = &x[k][b];
                        acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), $sums!(wq, xb), acc[k]);
                        mins[k] += m * xb.s;
                    }
                }
                std::array::from_fn(|k| crate::kernels::hsum8!(acc[k]) + mins[k])
            }

            /// The same sum as [`dot_row_generic`] with the integer products in one `vpmaddubsw`
            /// and one `vpmaddwd` per block (`$sums`), both f16 scales of a block converted
            /// by one `vcvtph2ps`, and the block scales applied in an 8-lane float accumulator,
            /// reduced once per row instead of once per block.
            #[target_feature(enable = $features)]
            #[inline]
            pub(in super::super) fn dot_row(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                // Lane 1 accumulates `m_w * s_x`.
                let mut mins = _mm_setzero_ps();
                for (wb, xb) in w.iter().zip(x) {
                    // [d_w, m_w, 0, 0] * [d_x, s_x, 0, 0]
                    let scales = _mm_mul_ps(weight_scales!(wb), _mm_set_ps(0.0, 0.0, xb.s, xb.d));
                    let sums = $sums!(weight_nibbles!(wb), xb);
                    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), sums, acc);
                    mins = _mm_add_ps(mins, scales);
                }
                crate::kernels::hsum8!(acc) + _mm_cvtss_f32(_mm_movehdup_ps(mins))
            }
        };
    }

    /// AVX2 + FMA + F16C: what every x86-64-v3 CPU has.
    pub(super) mod plain {
        use super::super::*;
        use std::arch::x86_64::*;
        row_kernels!("avx2,fma,f16c", block_sums);
    }

    /// With AVX-VNNI's `vpdpbusd` (Intel since Alder Lake, AMD since Zen 4).
    pub(super) mod vnni {
        use super::super::*;
        use std::arch::x86_64::*;
        row_kernels!("avx2,fma,f16c,avxvnni", block_sums_vnni);
    }

    /// The kernels against the portable loop and against their AVX-VNNI variants.
    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::testing::{randn_vec, random_quantized};

        /// [`super::dot_row`], whose target features this build has.
        fn dot_row(w: &[WeightBlock], x: &[ActBlock]) -> f32 {
            with_avx2!(super::dot_row(w, x), dot_row_generic(w, x))
        }

        /// [`super::dot_row4`], likewise.
        fn dot_row4(w: &[WeightBlock], x: [&[ActBlock]; 4]) -> [f32; 4] {
            with_avx2!(super::dot_row4(w, x), x.map(|x| dot_row_generic(w, x)))
        }

        #[test]
        fn the_vnni_kernel_gives_the_avx2_kernels_sums_to_the_bit() {
            if !crate::kernels::has_vnni() {
                eprintln!("SKIPPED: this CPU has no AVX-VNNI");
                return;
            }
            let m = Q41Matrix::from_qtensor(&random_quantized(5, 576, GgmlDType::Q4_1)).unwrap();
            let nb = 576 / QK;
            let n = 6;
            let x = randn_vec(n * 576, 3.0);
            let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_q8_1).collect();
            let (mut a, mut b) = (vec![0f32; 5 * n], vec![0f32; 5 * n]);
            // SAFETY: this build targets AVX2, FMA and F16C; the CPU has AVX-VNNI (checked).
            #[allow(unsafe_code)]
            unsafe {
                vnni::rows_dot(&m.blocks, nb, &acts, n, &mut a);
                plain::rows_dot(&m.blocks, nb, &acts, n, &mut b);
            }
            assert_eq!(a, b);
        }

        #[test]
        fn the_avx2_dot_product_is_the_portable_one() {
            // Same integer products, scales applied in another order: equal up to float
            // rounding. Reference: the portable loop, itself checked against the dequantized
            // f32 product (in the file's `tests`).
            let q = random_quantized(4, 576, GgmlDType::Q4_1);
            let m = Q41Matrix::from_qtensor(&q).unwrap();
            let x = randn_vec(576, 1.0);
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
            // Four activation rows at once: each the portable loop's sum for that row.
            let rows4: Vec<Vec<ActBlock>> = (0..4)
                .map(|_| {
                    let x = randn_vec(576, 1.0);
                    x.chunks_exact(QK).map(quantize_q8_1).collect()
                })
                .collect();
            for r in 0..4 {
                let row = &m.blocks[r * nb..(r + 1) * nb];
                let got = dot_row4(row, [&rows4[0], &rows4[1], &rows4[2], &rows4[3]]);
                for (k, g) in got.iter().enumerate() {
                    let want = dot_row_generic(row, &rows4[k]);
                    assert!(
                        (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "row {r}, input {k}: four at once {g}, portable {want}"
                    );
                }
            }
            // Extremes: every nibble 15 against every activation -128 (the largest pair sums).
            let wb = WeightBlock {
                dm: [f16::ONE.to_bits(), f16::ZERO.to_bits()],
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs, random_quantized};
    use candle_core::Module;
    use candle_core::quantized::QMatMul;

    #[test]
    fn the_kernel_is_as_accurate_as_candles_q4_1_matmul() {
        // Reference: the dequantized weights times the f32 input, in f32. Both ours and
        // candle's ggml-style kernel round the input to 8 bits per block, so both differ
        // from it by that rounding; ours must not be worse.
        let dev = Device::Cpu;
        let q = random_quantized(80, 128, GgmlDType::Q4_1);
        let exact_w = q.dequantize(&dev).unwrap();
        let ours = Q41Matrix::from_qtensor(&q).unwrap();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (rows, 128), &dev).unwrap();
            let reference = x.matmul(&exact_w.t().unwrap()).unwrap();
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

    #[test]
    fn fused_lora_deltas_are_the_plain_f32_product_of_b_a_and_x() {
        // Reference: `x A16^T (sB)16^T` by candle's f32 matmul, a computation that shares
        // nothing with the fused kernel, where `A16` and `(sB)16` are `A` and `scale * B`
        // rounded to f16 as the kernel stores them. The base part is taken out by running
        // the same matrices without adapters: the kernel is deterministic, so what is
        // left is the delta alone, equal to the reference up to f32 rounding; and within
        // f16 rounding (0.3% of its size) of the unrounded `scale * x A^T B^T`. Three
        // projections of one input (as q, k, v go), one of them without an adapter, ranks
        // 16 and 4; one and five input rows (the decode and prompt paths).
        let dev = Device::Cpu;
        let cols = 96;
        let shapes = [(64, Some(16)), (32, None), (40, Some(4))];
        let mats: Vec<Q41Matrix> = shapes
            .iter()
            .map(|&(rows, _)| {
                Q41Matrix::from_qtensor(&random_quantized(rows, cols, GgmlDType::Q4_1)).unwrap()
            })
            .collect();
        let scale = 2.0;
        let pairs: Vec<Option<(Tensor, Tensor, crate::lora::LoraPair)>> = shapes
            .iter()
            .map(|&(rows, rank)| {
                rank.map(|r| {
                    let a = Tensor::randn(0f32, 0.5, (r, cols), &dev).unwrap();
                    let b = Tensor::randn(0f32, 0.5, (rows, r), &dev).unwrap();
                    let pair = crate::lora::LoraPair::new(&a, &b, scale).unwrap();
                    (a, b, pair)
                })
            })
            .collect();
        for n in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (n, cols), &dev).unwrap();
            let with: Vec<(&Q41Matrix, Option<&HostLora>)> = mats
                .iter()
                .zip(&pairs)
                .map(|(m, p)| (m, p.as_ref().map(|(_, _, l)| l.host().unwrap())))
                .collect();
            let without: Vec<(&Q41Matrix, Option<&HostLora>)> =
                mats.iter().map(|m| (m, None)).collect();
            let got = forward_many(&x, &with).unwrap();
            let base = forward_many(&x, &without).unwrap();
            for (i, p) in pairs.iter().enumerate() {
                let delta = (&got[i] - &base[i]).unwrap();
                let r16 = |t: &Tensor| {
                    t.to_dtype(candle_core::DType::F16)
                        .unwrap()
                        .to_dtype(candle_core::DType::F32)
                        .unwrap()
                };
                let product = |a: &Tensor, sb: &Tensor| {
                    x.matmul(&a.t().unwrap())
                        .unwrap()
                        .matmul(&sb.t().unwrap())
                        .unwrap()
                };
                let (want, exact) = match p {
                    Some((a, b, _)) => {
                        let sb = b.affine(scale, 0.0).unwrap();
                        (product(&r16(a), &r16(&sb)), product(a, &sb))
                    }
                    None => (delta.zeros_like().unwrap(), delta.zeros_like().unwrap()),
                };
                assert_eq!(delta.dims(), want.dims());
                let err = max_abs(&(&delta - &want).unwrap());
                let size = max_abs(&want);
                assert!(
                    err <= 1e-4 * size.max(1.0),
                    "projection {i}, {n} rows: delta off by {err} (size {size})"
                );
                let f16_err = max_abs(&(&delta - &exact).unwrap());
                assert!(
                    f16_err <= 3e-3 * size.max(1.0),
                    "projection {i}, {n} rows: f16 rounding moved the delta by {f16_err} (size {size})"
                );
                if p.is_some() {
                    assert!(size > 1.0, "the delta must be large enough to see");
                }
            }
            // The single-projection entry point is the same kernel.
            let single = mats[1].forward(&x).unwrap();
            assert_eq!(
                single.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                base[1].flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn a_lora_pair_that_does_not_fit_the_weight_is_refused() {
        let dev = Device::Cpu;
        let m = Q41Matrix::from_qtensor(&random_quantized(64, 64, GgmlDType::Q4_1)).unwrap();
        let a = Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (32, 4), &dev).unwrap();
        let pair = crate::lora::LoraPair::new(&a, &b, 1.0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 64), &dev).unwrap();
        let err = forward_many(&x, &[(&m, pair.host())]).unwrap_err();
        assert!(err.to_string().contains("LoRA pair"), "{err}");
    }
}
