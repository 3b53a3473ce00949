//! LoRA dropout masks from a counter-based hash of (seed, element): nothing stored for the
//! backward pass, which draws the same mask again.

use crate::llama::Projection;
use candle_core::Result;
use candle_core::Tensor;

/// An inverted-dropout mask (0 or `1 / (1 - p)`) drawn from `seed`, so recomputation
/// under gradient checkpointing draws the same one.
pub(super) fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let m = Dropout::new(p, seed).values(x.elem_count());
    Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// The LoRA dropout of one projection in one pass: element `i` (row-major) of the input
/// is kept, and scaled by `1 / (1 - p)`, when a 32-bit hash of `(seed, i)` is at least
/// `p * 2^32`. Counter-based, so no mask has to be stored: the backward pass (and the
/// recomputation under gradient checkpointing) recomputes any element's factor, and the
/// loops over it vectorize (a sequential generator drew 150 M random numbers per step
/// of the 135M model, and the masks took 600 MB).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dropout {
    pub(super) seed_lo: u32,
    pub(super) seed_hi: u32,
    pub(super) threshold: u32,
    pub(super) keep: f32,
}

impl Dropout {
    pub(super) fn new(p: f64, seed: u64) -> Self {
        Self {
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            // `as` saturates: p just below 1 gives u32::MAX.
            threshold: (p * 4_294_967_296.0) as u32,
            keep: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// Chris Wellons' `lowbias32` integer hash.
    #[inline(always)]
    pub(super) fn hash(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }

    /// 0 or `1 / (1 - p)` for element `i`.
    #[inline(always)]
    pub(super) fn factor(&self, i: usize) -> f32 {
        let h = Self::hash(Self::hash(i as u32 ^ self.seed_lo).wrapping_add(self.seed_hi));
        if h >= self.threshold { self.keep } else { 0.0 }
    }

    pub(super) fn values(&self, len: usize) -> Vec<f32> {
        (0..len).map(|i| self.factor(i)).collect()
    }

    /// `x` times the mask.
    pub(super) fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, v)| v * self.factor(i))
            .collect()
    }
}

pub(super) fn mix_seed(seed: u64, layer: usize, p: Projection) -> u64 {
    // splitmix64 of (seed, layer, projection): distinct, well-spread streams.
    let mut z = seed
        .wrapping_add((layer as u64) << 8 | p.index() as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::Dropout;

    #[test]
    pub(super) fn dropout_drops_a_p_fraction_scales_the_rest_and_depends_on_the_seed() {
        let n = 1 << 20;
        for p in [0.05, 0.1, 0.5] {
            let m = Dropout::new(p, 12345).values(n);
            let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            // Binomial: the standard deviation of the fraction is sqrt(p (1 - p) / n),
            // at most 0.0005 here; 0.003 is six of those.
            assert!((dropped - p).abs() < 0.003, "p {p}: dropped {dropped}");
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(m.iter().all(|&v| v == 0.0 || v == keep));
            // Inverted dropout keeps the mean: E[factor] = 1.
            let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((mean - 1.0).abs() < 0.01, "p {p}: mean {mean}");
        }
        // Other seeds (also differing only in the high half) give other masks, the same
        // seed the same one; neighbouring elements are not correlated.
        let a = Dropout::new(0.5, 1).values(4096);
        assert_eq!(a, Dropout::new(0.5, 1).values(4096));
        for other in [2, 1 | (1 << 32)] {
            let b = Dropout::new(0.5, other).values(4096);
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            assert!(
                (1800..2300).contains(&same),
                "seed {other}: {same} of 4096 agree"
            );
        }
        let pairs = a.windows(2).filter(|w| w[0] == w[1]).count();
        assert!((1800..2300).contains(&pairs), "{pairs} equal neighbours");
    }
}
