//! The f32 CPU path of the training graph, for layers whose base weights are frozen (LoRA
//! training, and the frozen layers of `freeze`), and for the output head when it is
//! frozen: the same arithmetic as the generic candle graph in `mod.rs` (which stays the
//! path for CUDA, bf16, f64 and trainable base weights, and the reference the tests check
//! this one against), organised for two CPU cores:
//!
//! - q/k/v are one matrix product with the stacked `[q; k; v]` weights, and so are gate
//!   and up; the LoRA `B` products accumulate straight into the projection's output and
//!   the residual products into a copy of the residual, through `gemm` with strides (no
//!   transposed or contiguous copies, no separate add passes);
//! - attention works on the `[tokens, q | k | v]` rows as they are, one (sequence, head)
//!   at a time on the worker pool, in blocks of 64 query rows that only multiply the key
//!   columns a row can see (causal, and within its packed example), so the masked half of
//!   the scores is never computed;
//! - norms, rope, SiLU and the softmax are single passes over memory, with a vectorizable
//!   `exp`; the output head's softmax, loss, accuracy and gradient are one pass per row
//!   over its logits, which become the logits' gradient in place.

mod attention;
mod head;
mod layer;
mod lora;

pub(crate) use head::head;
pub(crate) use layer::{HostCache, Keep, layer_bwd, layer_fwd};

use crate::train::batch::TrainBatch;
use crate::train::dense::DenseLlama;
use crate::train::lora_params::LoraParams;
use candle_core::DType;

/// Whether the host path runs this pass: f32 on the CPU, f32 LoRA weights, a batch it
/// can mask.
pub(super) fn applies(model: &DenseLlama, lora: Option<&LoraParams>, batch: &TrainBatch) -> bool {
    model.device.is_cpu()
        && model.dtype == DType::F32
        && batch.host.is_some()
        && lora.is_none_or(|l| {
            l.layers.iter().flatten().flatten().all(|ab| {
                ab.a.dtype() == DType::F32
                    && ab.b.dtype() == DType::F32
                    && ab.a.device().is_cpu()
                    && ab.b.device().is_cpu()
            })
        })
}
