//! The `k` largest entries of a row of scores, and the base model's most likely next
//! tokens at every scored position of some examples: what distilled replay learns and
//! what the retention probe compares adapters against.

use crate::batch::{BatchPlan, batches_in_order};
use crate::tokenize::TokenizedExample;
use loraloop_model::train::{DenseLlama, TrainBatch};
use serde::{Deserialize, Serialize};

/// A next-token distribution kept as its most likely tokens (most likely first) and
/// their log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopTokens {
    pub tokens: Vec<u32>,
    pub log_probs: Vec<f32>,
}

/// The base model's (`dense` without an adapter) `k` most likely next tokens at every
/// scored position of `examples`, example by example and in order: one pass per 8
/// examples, keeping only the top tokens of each position.
pub fn base_top_k(
    dense: &DenseLlama,
    examples: &[&TokenizedExample],
    sequence_len: usize,
    k: usize,
) -> candle_core::Result<Vec<TopTokens>> {
    let plan = BatchPlan {
        micro_batch_size: 8,
        sequence_len,
        sample_packing: false,
        seed: 0,
    };
    let mut out = Vec::new();
    for rows in batches_in_order(examples, &plan) {
        let batch = TrainBatch::new(&rows, dense)?;
        let lp: Vec<Vec<f32>> = dense
            .scored_log_probs(None, &batch)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        for row in lp {
            let tokens = top_k(&row, k);
            let log_probs = tokens.iter().map(|&t| row[t as usize]).collect();
            out.push(TopTokens { tokens, log_probs });
        }
    }
    Ok(out)
}

/// Indices of the `k` largest values, largest first (`k` is clamped to 1..=len).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if idx.is_empty() {
        return idx;
    }
    let k = k.clamp(1, idx.len());
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]);
    idx.select_nth_unstable_by(k - 1, by_value);
    idx.truncate(k);
    idx.sort_by(by_value);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_come_first() {
        let v = [0.1, 3.0, -1.0, 2.5, 7.0, 0.0];
        assert_eq!(top_k(&v, 3), [4, 1, 3]);
        assert_eq!(top_k(&v, 100).len(), 6);
        assert_eq!(top_k(&v, 0), [4]);
        assert!(top_k(&[], 4).is_empty());
    }
}
