//! Which examples train and which evaluate, and the optimizer steps of a run: the same
//! for the same data and seed, so a resumed run skips to its step.

use crate::batch::{BatchPlan, epoch_batches, epoch_order};
use crate::error::TrainError;
use crate::tokenize::TokenizedExample;
use loraloop_core::domain::ChatExample;
use loraloop_model::train::Row;

/// Split `val_set_size` (a fraction below 1, or a count) off the examples, the same
/// way for the same seed. A count that leaves nothing to train on is refused (a
/// fraction below 1 always leaves some).
pub fn split_examples(
    examples: Vec<ChatExample>,
    val_set_size: f64,
    seed: u64,
) -> Result<(Vec<ChatExample>, Vec<ChatExample>), TrainError> {
    let n = examples.len();
    let n_val = if val_set_size < 1.0 {
        (val_set_size * n as f64).floor() as usize
    } else {
        val_set_size as usize
    };
    if n_val >= n && n > 0 {
        return Err(TrainError::Invalid(format!(
            "val_set_size {n_val} holds out all {n} example(s), leaving none to train on: give a smaller count, or a fraction below 1"
        )));
    }
    if n_val == 0 {
        return Ok((examples, Vec::new()));
    }
    let order = epoch_order(n, seed ^ 0x5EED, usize::MAX);
    let val_set: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let mut train = Vec::with_capacity(n - n_val);
    let mut val = Vec::with_capacity(n_val);
    for (i, e) in examples.into_iter().enumerate() {
        if val_set.contains(&i) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, val))
}

/// The optimizer steps of the run, each a list of micro-batches, with the epoch they
/// belong to: the same list for the same data and seed, so a resume skips to its step.
pub(crate) fn plan_steps(
    examples: &[TokenizedExample],
    plan: &BatchPlan,
    accum: usize,
    num_epochs: f64,
    max_steps: Option<usize>,
) -> Vec<(usize, Vec<Vec<Row>>)> {
    // One epoch's micro-batches, `accum` to a step (the last step may have fewer).
    let epoch_steps = |epoch: usize| -> Vec<(usize, Vec<Vec<Row>>)> {
        let mut it = epoch_batches(examples, plan, epoch).into_iter().peekable();
        let mut steps = Vec::new();
        while it.peek().is_some() {
            steps.push((epoch, it.by_ref().take(accum).collect()));
        }
        steps
    };
    let mut steps = epoch_steps(0);
    if steps.is_empty() {
        return steps; // no examples: nothing to repeat
    }
    let by_epochs = (num_epochs * steps.len() as f64).ceil() as usize;
    let total = max_steps.unwrap_or(by_epochs).max(1);
    // Further epochs until there are enough steps (fractional epochs, max_steps).
    let mut epoch = 1;
    while steps.len() < total {
        steps.extend(epoch_steps(epoch));
        epoch += 1;
    }
    steps.truncate(total);
    steps
}
