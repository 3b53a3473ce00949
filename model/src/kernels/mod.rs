//! The f32 building blocks of the CPU paths, defined once: the decode step
//! (`llama/decode.rs`), the training path (`train/host.rs`) and the Q4_1 kernels use them.
//! Reductions and `exp` are written to vectorize; the parallel ones run on candle's worker
//! pool. (The generic training graph in `train/mod.rs` is built from candle tensor ops on
//! any device, and is the reference these are tested against.)

pub(crate) mod exp;
pub(crate) mod gemm;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod reduce;
pub(crate) mod rope;
pub(crate) mod shared;
