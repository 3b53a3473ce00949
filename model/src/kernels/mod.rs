//! The f32 building blocks of the CPU paths, defined once: the decode step
//! (`llama/decode.rs`), the training path (`train/host/`) and the Q4_1 kernels use them.
//! Reductions and `exp` are written to vectorize; the parallel ones run on candle's worker
//! pool. (The generic training graph in `train/graph.rs` is built from candle tensor ops
//! on any device, and is the reference these are tested against.)

/// `$fast` (a call into `avx2`) in builds for CPUs with AVX2, FMA and F16C
/// (`avx2_kernels`, set by `build.rs`), `$portable` otherwise.
macro_rules! with_avx2 {
    ($fast:expr, $portable:expr) => {{
        #[cfg(avx2_kernels)]
        {
            // SAFETY: the `avx2` kernels need only AVX2, FMA and F16C, and this code
            // exists only in a build compiled for CPUs that have all three (the `cfg`
            // above): the whole binary already uses them.
            #[allow(unsafe_code)]
            unsafe {
                $fast
            }
        }
        #[cfg(not(avx2_kernels))]
        {
            $portable
        }
    }};
}
pub(crate) use with_avx2;

/// Whether this CPU has AVX-VNNI (Intel since Alder Lake, AMD since Zen 4), checked once:
/// the integer dot-product kernels use its `vpdpbusd` where it is there.
#[cfg(avx2_kernels)]
pub(crate) fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| std::arch::is_x86_feature_detected!("avxvnni"))
}

/// `$vnni` where the CPU has AVX-VNNI, `$plain` otherwise: for callers that are
/// themselves `#[target_feature(enable = "avx2,fma,f16c")]` functions.
#[cfg(avx2_kernels)]
macro_rules! with_vnni {
    ($vnni:expr, $plain:expr) => {{
        if $crate::kernels::has_vnni() {
            // SAFETY: the CPU has AVX-VNNI (checked above); AVX2, FMA and F16C are the
            // calling function's own target features.
            #[allow(unsafe_code)]
            unsafe {
                $vnni
            }
        } else {
            $plain
        }
    }};
}
#[cfg(avx2_kernels)]
pub(crate) use with_vnni;

/// The 32 signed bytes of a quantized block's `qs` as one `__m256i`, by one unaligned
/// load. Built from byte arrays instead (`_mm256_set_epi64x`), LLVM made one load of it in
/// some kernels and, in the Q8_0 tile kernel unrolled, a 128-bit load, a broadcast and a
/// blend: decode was 5-8% slower. A macro, like [`hsum8`], so that it expands inside the
/// `#[target_feature]` kernels.
#[cfg(avx2_kernels)]
macro_rules! bytes32 {
    ($qs:expr) => {{
        let qs: &[i8; 32] = &$qs;
        // SAFETY: `qs` is 32 readable bytes, and `loadu` needs no alignment.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm256_loadu_si256(qs.as_ptr().cast())
        }
    }};
}
#[cfg(avx2_kernels)]
pub(crate) use bytes32;

/// The sum of an `__m256`'s eight lanes, added in the order of ggml's `hsum_float_8`.
#[cfg(avx2_kernels)]
macro_rules! hsum8 {
    ($v:expr) => {{
        use std::arch::x86_64::*;
        let v = $v;
        let half = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
        _mm_cvtss_f32(one)
    }};
}
#[cfg(avx2_kernels)]
pub(crate) use hsum8;

pub(crate) mod exp;
pub(crate) mod gemm;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod quant;
pub(crate) mod reduce;
pub(crate) mod rope;
pub(crate) mod shared;
