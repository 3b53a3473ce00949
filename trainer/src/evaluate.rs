//! Loss, perplexity and token accuracy of a model (and its LoRA) on tokenized examples.

use crate::batch::{BatchPlan, batches_in_order};
use crate::events::EvalMetrics;
use crate::tokenize::TokenizedExample;
use loraloop_model::train::{DenseLlama, LoraParams, PassStats, TrainBatch};

/// Evaluate on tokenized examples.
pub fn evaluate_tokenized(
    model: &DenseLlama,
    lora: Option<&LoraParams>,
    examples: &[TokenizedExample],
    micro_batch_size: usize,
    sequence_len: usize,
) -> candle_core::Result<EvalMetrics> {
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let plan = BatchPlan {
        micro_batch_size,
        sequence_len,
        sample_packing: false,
        seed: 0,
    };
    let mut total = PassStats::default();
    for rows in batches_in_order(&refs, &plan) {
        let batch = TrainBatch::new(&rows, model)?;
        total.add(&model.evaluate(lora, &batch)?);
    }
    Ok(total.into())
}
