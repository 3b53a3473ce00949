//! A LoRA pair's weights in host memory, laid out for the CPU kernels: `A` by rows, and
//! `scale * B` in tiles of [`B_TILE`] outputs, in f32 and rounded to f16.

use crate::kernels::reduce::dot_f32;

/// A LoRA pair in host memory, for the CPU paths (`crate::q4_1::forward_many` fuses it
/// into the base matmul).
#[derive(Debug)]
pub struct HostLora {
    r: usize,
    in_dim: usize,
    out_dim: usize,
    /// `A`, `[r, in]`: row `j` is what `x` is dotted with for `u[j]`.
    a: Vec<f32>,
    /// `scale * B` in tiles of `B_TILE` outputs: tile `k` holds, for each `j < r`, the
    /// `B_TILE` values `(sB)[k * B_TILE + i, j]` (zero past the last output). A worker
    /// that owns a tile of output rows adds `u[j]` times each of its `r` runs: contiguous
    /// multiply-adds with no horizontal sums, over memory read front to back (per-output
    /// dot products with horizontal sums, or a `[r, out]` layout read in scattered
    /// 64-byte pieces, each cost more than the arithmetic).
    b_tiles: Vec<f32>,
    /// `a` and `b_tiles` rounded to f16 (bit patterns), for the Q4_1 kernel: decode reads
    /// the whole adapter every token, so half the bytes is most of its cost, and f16's
    /// 11-bit mantissa is far finer than the 4-bit base weights it is added to (llama.cpp
    /// applies its LoRA adapters in f16 the same way).
    a16: Vec<u16>,
    b_tiles16: Vec<u16>,
}

impl HostLora {
    pub fn rank(&self) -> usize {
        self.r
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// Row `j` of `A`.
    pub fn a_row(&self, j: usize) -> &[f32] {
        &self.a[j * self.in_dim..(j + 1) * self.in_dim]
    }
    /// Tile `k` of `scale * B`: `r` runs of `B_TILE` outputs.
    pub fn b_tile(&self, k: usize) -> &[f32] {
        let len = self.r * B_TILE;
        &self.b_tiles[k * len..(k + 1) * len]
    }
    /// `ys += scale * B (A x)` for each row of `xs` (`n` rows of `in_dim`) and `ys` (`n`
    /// rows of `out_dim`), in f32: two small loops, with `u = A x` for one row at a time.
    /// (`crate::q4_1::add_lora_f16` is the same over the f16 copies.)
    pub fn add_delta(&self, xs: &[f32], ys: &mut [f32]) {
        let mut u = vec![0f32; self.r];
        for (xr, yr) in xs
            .chunks_exact(self.in_dim)
            .zip(ys.chunks_exact_mut(self.out_dim))
        {
            for (j, uj) in u.iter_mut().enumerate() {
                *uj = dot_f32(self.a_row(j), xr);
            }
            for (k, yt) in yr.chunks_mut(B_TILE).enumerate() {
                for (&uj, bj) in u.iter().zip(self.b_tile(k).chunks_exact(B_TILE)) {
                    for (yo, b) in yt.iter_mut().zip(bj) {
                        *yo += uj * b;
                    }
                }
            }
        }
    }

    /// [`HostLora::a_row`] in f16.
    pub fn a_row16(&self, j: usize) -> &[u16] {
        &self.a16[j * self.in_dim..(j + 1) * self.in_dim]
    }
    /// [`HostLora::b_tile`] in f16.
    pub fn b_tile16(&self, k: usize) -> &[u16] {
        let len = self.r * B_TILE;
        &self.b_tiles16[k * len..(k + 1) * len]
    }
}

/// Output rows per tile of a host LoRA `B` (and per work item of the Q4_1 kernel).
pub const B_TILE: usize = 16;

impl HostLora {
    /// From `A` (`[r, in]`, row-major) and `scale * B` (`[out, r]`, row-major).
    pub(crate) fn new(
        a: Vec<f32>,
        b_scaled: &[f32],
        r: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Self {
        let b_tiles = tile_b(b_scaled, out_dim, r);
        let to16 = |v: &[f32]| -> Vec<u16> {
            v.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect()
        };
        Self {
            r,
            in_dim,
            out_dim,
            a16: to16(&a),
            b_tiles16: to16(&b_tiles),
            a,
            b_tiles,
        }
    }
}

/// `b` (`[out, r]`, row-major) in the tiled layout of `HostLora::b_tiles`.
fn tile_b(b: &[f32], out: usize, r: usize) -> Vec<f32> {
    let tiles = out.div_ceil(B_TILE);
    let mut t = vec![0f32; tiles * r * B_TILE];
    for o in 0..out {
        let (k, i) = (o / B_TILE, o % B_TILE);
        for j in 0..r {
            t[(k * r + j) * B_TILE + i] = b[o * r + j];
        }
    }
    t
}
