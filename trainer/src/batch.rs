//! Micro-batches: shuffled per epoch from the seed (so a resumed run sees the same order),
//! padded to the longest row of the batch, or packed several examples to a row with
//! `sample_packing` (each example attends only to itself, positions restart at 0).

use crate::tokenize::TokenizedExample;
use loraloop_model::train::{Row, SoftTarget};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// Token id written into padding (never attended to, never scored).
const PAD: u32 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    pub micro_batch_size: usize,
    pub sequence_len: usize,
    pub sample_packing: bool,
    pub seed: u64,
}

/// The order of examples in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Append one example to a row under construction as segment `segment`.
fn push_example(row: &mut Row, ex: &TokenizedExample, segment: u32) {
    let n = ex.tokens.len();
    let offset = row.tokens.len() as u32;
    row.soft.extend(ex.soft.iter().map(|s| SoftTarget {
        position: offset + s.position,
        ..s.clone()
    }));
    for t in 0..n {
        row.tokens.push(ex.tokens[t]);
        row.positions.push(t as u32);
        row.segments.push(segment);
        // Position t predicts token t + 1, with that token's weight.
        match (ex.tokens.get(t + 1), ex.weights.get(t + 1)) {
            (Some(&next), Some(&w)) if w > 0.0 => {
                row.targets.push(next as i32);
                row.weights.push(w);
            }
            _ => {
                row.targets.push(-1);
                row.weights.push(0.0);
            }
        }
    }
}

fn pad_to(row: &mut Row, len: usize) {
    while row.tokens.len() < len {
        row.tokens.push(PAD);
        row.positions.push(0);
        row.segments.push(0);
        row.targets.push(-1);
        row.weights.push(0.0);
    }
}

/// Rows for a list of examples in order: one example per row, or packed.
fn rows_of(examples: &[&TokenizedExample], plan: &BatchPlan) -> Vec<Row> {
    let mut rows = Vec::new();
    if plan.sample_packing {
        let mut row = Row::default();
        let mut segment = 0;
        for ex in examples {
            if !row.tokens.is_empty() && row.tokens.len() + ex.tokens.len() > plan.sequence_len {
                rows.push(std::mem::take(&mut row));
                segment = 0;
            }
            segment += 1;
            push_example(&mut row, ex, segment);
        }
        if !row.tokens.is_empty() {
            rows.push(row);
        }
    } else {
        for ex in examples {
            let mut row = Row::default();
            push_example(&mut row, ex, 1);
            rows.push(row);
        }
    }
    rows
}

/// The micro-batches of one epoch, each padded to its longest row.
pub fn epoch_batches(
    examples: &[TokenizedExample],
    plan: &BatchPlan,
    epoch: usize,
) -> Vec<Vec<Row>> {
    let this_epoch: Vec<&TokenizedExample> =
        examples.iter().filter(|e| e.trains_in(epoch)).collect();
    let order = epoch_order(this_epoch.len(), plan.seed, epoch);
    let ordered: Vec<&TokenizedExample> = order.iter().map(|&i| this_epoch[i]).collect();
    batches_in_order(&ordered, plan)
}

/// Micro-batches of examples in the given order (evaluation uses the dataset's order).
pub fn batches_in_order(examples: &[&TokenizedExample], plan: &BatchPlan) -> Vec<Vec<Row>> {
    let rows = rows_of(examples, plan);
    rows.chunks(plan.micro_batch_size.max(1))
        .map(|chunk| {
            let len = chunk.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
            chunk
                .iter()
                .cloned()
                .map(|mut r| {
                    pad_to(&mut r, len);
                    r
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(tokens: &[u32], weights: &[f32]) -> TokenizedExample {
        TokenizedExample {
            tokens: tokens.to_vec(),
            weights: weights.to_vec(),
            ..Default::default()
        }
    }

    fn plan(packing: bool) -> BatchPlan {
        BatchPlan {
            micro_batch_size: 2,
            sequence_len: 8,
            sample_packing: packing,
            seed: 1,
        }
    }

    #[test]
    fn targets_are_the_next_token_with_its_weight_and_rows_are_padded() {
        let a = ex(&[10, 11, 12, 13], &[0., 0., 1., 0.5]);
        let b = ex(&[20, 21], &[0., 1.]);
        let rows = batches_in_order(&[&a, &b], &plan(false));
        assert_eq!(rows.len(), 1);
        let [r0, r1] = rows[0].as_slice() else {
            panic!("two rows")
        };
        assert_eq!(r0.targets, [-1, 12, 13, -1]);
        assert_eq!(r0.weights, [0., 1., 0.5, 0.]);
        assert_eq!(r1.tokens, [20, 21, PAD, PAD]);
        assert_eq!(r1.segments, [1, 1, 0, 0]);
        assert_eq!(r1.targets, [21, -1, -1, -1]);
    }

    #[test]
    fn packing_puts_examples_in_one_row_with_their_own_segments_and_positions() {
        let a = ex(&[1, 2, 3], &[0., 1., 1.]);
        let b = ex(&[4, 5, 6, 7], &[0., 0., 1., 1.]);
        let c = ex(&[8, 9], &[0., 1.]);
        let rows = batches_in_order(&[&a, &b, &c], &plan(true));
        // a + b = 7 tokens fit in 8; c starts a new row.
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].len(), 2);
        let r = &rows[0][0];
        assert_eq!(r.tokens, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(r.positions, [0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(r.segments, [1, 1, 1, 2, 2, 2, 2]);
        // No target crosses from one example into the next.
        assert_eq!(r.targets, [2, 3, -1, -1, 6, 7, -1]);
        assert_eq!(rows[0][1].tokens, [8, 9, PAD, PAD, PAD, PAD, PAD]);
    }

    #[test]
    fn soft_targets_move_with_their_example_into_a_packed_row() {
        let a = ex(&[1, 2, 3], &[0., 1., 1.]);
        let mut b = ex(&[4, 5, 6, 7], &[0., 0., 1., 1.]);
        b.soft = vec![SoftTarget {
            position: 2,
            tokens: vec![7, 9],
            probs: vec![0.75, 0.25],
        }];
        let rows = batches_in_order(&[&a, &b], &plan(true));
        let r = &rows[0][0];
        assert_eq!(r.soft.len(), 1);
        // b starts at row position 3: its position 2 (predicting 7) is row position 5.
        assert_eq!(r.soft[0].position, 5);
        assert_eq!(r.targets[5], 7);
        assert_eq!(r.soft[0].tokens, [7, 9]);
    }

    #[test]
    fn each_epoch_has_its_own_order_and_the_same_seed_repeats_it() {
        assert_eq!(epoch_order(50, 3, 0), epoch_order(50, 3, 0));
        assert_ne!(epoch_order(50, 3, 0), epoch_order(50, 3, 1));
        let mut sorted = epoch_order(50, 3, 1);
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
