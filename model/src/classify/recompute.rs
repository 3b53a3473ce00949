//! A network as a chain of segments (embeddings or stem, then one segment per encoder
//! layer or residual block) and a head that ends in the loss, and its backward pass with
//! or without gradient checkpointing.
//!
//! candle's autograd keeps every activation of the graph until `backward`. With
//! checkpointing, the forward pass keeps only each segment's input and drops the rest;
//! the backward pass then walks the segments from the top, recomputes one segment with
//! its input as a variable, and backpropagates `sum(output * upstream gradient)`, which
//! gives the segment's weight gradients and the gradient of its input for the segment
//! below (as `torch.utils.checkpoint` does). The recomputation draws the same dropout
//! masks (the generator's state is put back) and does not update batch-norm statistics
//! twice (`Pass::Replay`).

use super::ops;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Which forward pass a segment runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The pass whose side effects count (batch-norm running statistics).
    Record,
    /// A recomputation for the backward pass: the same outputs, no side effects.
    Replay,
}

/// What one backward pass produced.
pub struct Backward {
    /// The mean loss of the batch (a scalar).
    pub loss: Tensor,
    /// The logits, detached.
    pub logits: Tensor,
    /// Gradients of the trainable weights (`GradStore::get(var)`).
    pub grads: GradStore,
}

/// The gradients of `weights` alone. candle's backward also leaves a gradient for every
/// constant an op read (a dropout mask, a broadcast attention mask: each as large as the
/// activation); kept across segments, those would add up to what checkpointing saves.
fn only(mut store: GradStore, weights: &[Tensor]) -> GradStore {
    let mut kept = GradStore::default();
    for w in weights {
        if let Some(g) = store.remove(w) {
            kept.insert(w, g);
        }
    }
    kept
}

/// Run `segments` segments on `input` (`run(i, x, pass)` is segment `i`), then `head`
/// (features -> (loss, logits)), and backpropagate the loss to `weights`. `checkpoint`
/// trades one more forward pass for keeping only the segment boundaries in memory; the
/// gradients are the same either way.
pub fn backward(
    input: &Tensor,
    segments: usize,
    run: &mut dyn FnMut(usize, &Tensor, Pass) -> Result<Tensor>,
    head: &mut dyn FnMut(&Tensor) -> Result<(Tensor, Tensor)>,
    weights: &[Tensor],
    checkpoint: bool,
) -> Result<Backward> {
    if !checkpoint {
        let mut x = input.clone();
        for i in 0..segments {
            x = run(i, &x, Pass::Record)?;
        }
        let (loss, logits) = head(&x)?;
        let grads = only(loss.backward()?, weights);
        return Ok(Backward {
            loss: loss.detach(),
            logits: logits.detach(),
            grads,
        });
    }
    let mut inputs = Vec::with_capacity(segments);
    let mut masks = Vec::with_capacity(segments);
    // The lowest segment with a trainable weight: nothing below it needs a gradient.
    let mut lowest = None;
    let mut x = input.detach();
    for i in 0..segments {
        masks.push(ops::dropout_state());
        let y = run(i, &x, Pass::Record)?;
        if lowest.is_none() && y.track_op() {
            lowest = Some(i);
        }
        inputs.push(x);
        // Detaching drops the segment's graph and with it its activations.
        x = y.detach();
    }
    let top = Var::from_tensor(&x)?;
    let (loss, logits) = head(top.as_tensor())?;
    let mut grads = loss.backward()?;
    let mut upstream = grads.remove(top.as_tensor());
    let mut grads = only(grads, weights);
    drop(top);
    let after = ops::dropout_state();
    let lowest = lowest.unwrap_or(segments);
    for i in (lowest..segments).rev() {
        let Some(g) = upstream.take() else { break };
        ops::set_dropout_state(masks[i].clone());
        // No weight below the lowest trainable segment: its input needs no gradient.
        let needs_grad = i > lowest;
        let var = if needs_grad {
            Some(Var::from_tensor(&inputs[i])?)
        } else {
            None
        };
        let x = var.as_ref().map_or(&inputs[i], |v| v.as_tensor());
        let y = run(i, x, Pass::Replay)?;
        // candle leaves the gradient of a variable attached to the graph that computed it
        // (here, the segment above's weights): detached, it is the constant it should be.
        let mut seg = (y * g.detach())?.sum_all()?.backward()?;
        if let Some(v) = &var {
            upstream = seg.remove(v.as_tensor());
        }
        grads.extend(only(seg, weights))?;
        inputs.truncate(i);
    }
    ops::set_dropout_state(after);
    Ok(Backward {
        loss: loss.detach(),
        logits: logits.detach(),
        grads,
    })
}
