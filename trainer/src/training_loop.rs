//! The training loop as a type: a run that is set up steps through its planned optimizer
//! steps (micro-batches with gradient accumulation, clipping, AdamW on a schedule),
//! evaluates on the held-out examples, saves checkpoints, stops early or on cancel, and
//! saves its final weights.

use crate::checkpoint::{EvalEntry, LogEntry, SaveCtx, TrainerState};
use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::evaluate::evaluate_tokenized;
use crate::events::{Ending, EvalMetrics, TrainEvent};
use crate::optim::{AdamW, global_norm};
use crate::tokenize::TokenizedExample;
use crate::trainable::Trainable;
use crate::yield_to::YieldTo;
use loraloop_core::domain::ChatExample;
use loraloop_model::train::{Grads, PassOptions, PassStats, Pause, Row, TrainBatch};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub ending: Ending,
    pub steps: usize,
    /// Tokens in the batches this run trained on (a resumed run counts from its resume).
    pub trained_tokens: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalMetrics>,
    pub output_dir: PathBuf,
    /// The folder with the trained weights (the output folder; a checkpoint if cancelled).
    pub adapter_dir: PathBuf,
    pub state: TrainerState,
    /// The examples held out of training (for the report card).
    pub heldout: Vec<ChatExample>,
}

/// A run ready to step: what trains, the planned steps, the optimizer and the trainer
/// state (fresh, or restored from a checkpoint).
pub(crate) struct TrainingLoop<'a> {
    pub config: TrainConfig,
    pub trainable: Trainable,
    pub opt: AdamW,
    pub state: TrainerState,
    /// The optimizer steps of the whole run, each its epoch and its micro-batches.
    pub steps: Vec<(usize, Vec<Vec<Row>>)>,
    pub eval_examples: Vec<TokenizedExample>,
    pub save: SaveCtx<'a>,
    pub output_dir: PathBuf,
    /// Give way to chat between micro-batches (a job inside `serve`).
    pub yield_to: Option<YieldTo>,
    /// Time paused for chat so far.
    pub paused: std::time::Duration,
}

/// The end of optimizer step `step` (0-based) of `total`: the accumulated gradients'
/// global norm, clipped to `max_grad_norm`, and AdamW at the scheduled learning rate.
/// Returns the learning rate and the norm before clipping.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_gradients(
    c: &TrainConfig,
    tr: &mut Trainable,
    opt: &mut AdamW,
    names: &[String],
    grads: &Grads,
    step: usize,
    warmup: usize,
    total: usize,
) -> Result<(f64, f64), TrainError> {
    let grad_norm = global_norm(names.iter().filter_map(|n| grads.get(n)))?;
    let clip = if c.max_grad_norm > 0.0 && grad_norm > c.max_grad_norm {
        c.max_grad_norm / (grad_norm + 1e-6)
    } else {
        1.0
    };
    let lr = c.learning_rate * c.lr_scheduler.factor(step, warmup, total);
    opt.begin_step();
    for name in names {
        let Some(g) = grads.get(name) else { continue };
        let g = if clip < 1.0 { (g * clip)? } else { g.clone() };
        let p = tr
            .param(name)
            .ok_or_else(|| TrainError::Invalid(format!("lost parameter {name}")))?;
        *p = opt.update(name, p, &g, lr)?;
    }
    Ok((lr, grad_norm))
}

/// What one optimizer step did.
struct StepReport {
    loss: f64,
    accuracy: f64,
    learning_rate: f64,
    grad_norm: f64,
    tokens: usize,
}

impl TrainingLoop<'_> {
    /// Run from the state's step to the end (or an early stop, or `cancel`), reporting
    /// through `on_event`; then evaluate and save the final weights.
    pub fn run(
        mut self,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome, TrainError> {
        let total = self.steps.len();
        let steps_per_epoch = self.steps.iter().filter(|(e, _)| *e == 0).count().max(1);
        let warmup = self
            .config
            .warmup_steps
            .unwrap_or_else(|| (self.config.warmup_ratio * total as f64).ceil() as usize);
        let names = self.trainable.names();
        let start_step = self.state.global_step;
        let started = Instant::now();
        let mut tokens_done = 0usize;
        let mut ending = Ending::Finished;
        let mut last_eval = None;
        let mut grads = Grads::default();
        let mut pauses = crate::yield_to::PauseReport::default();
        let steps = std::mem::take(&mut self.steps);
        for (step, (epoch, micro)) in steps.iter().enumerate().skip(start_step) {
            let r = self.step(step, micro, &names, warmup, total, &mut grads, cancel)?;
            if let Some(text) = pauses.due(self.paused, started.elapsed()) {
                on_event(&TrainEvent::Message { text });
            }
            tokens_done += r.tokens;
            let state = &mut self.state;
            state.trained_tokens += r.tokens;
            state.global_step = step + 1;
            state.epoch = *epoch as f64
                + (((step + 1) - epoch * steps_per_epoch) as f64 / steps_per_epoch as f64).min(1.0);
            let elapsed = started.elapsed().as_secs_f64();
            let done_here = step + 1 - start_step;
            let tps = tokens_done as f64 / elapsed.max(1e-9);
            let eta = elapsed / done_here as f64 * (total - step - 1) as f64;
            state.log_history.push(LogEntry {
                step: step + 1,
                loss: r.loss,
                learning_rate: r.learning_rate,
                grad_norm: r.grad_norm,
                tokens_per_sec: tps,
            });
            on_event(&TrainEvent::Step {
                step: step + 1,
                total_steps: total,
                epoch: state.epoch,
                loss: r.loss,
                learning_rate: r.learning_rate,
                grad_norm: r.grad_norm,
                tokens_per_sec: tps,
                eta_secs: eta,
                accuracy: Some(r.accuracy).filter(|a| a.is_finite()),
            });

            let is_last = step + 1 == total;
            let mut stop_early = false;
            if let Some(every) = self.config.eval_steps
                && (step + 1) % every == 0
                && !is_last
                && let Some(m) = self.evaluate()?
            {
                stop_early = self.record_eval(step + 1, m, on_event);
                last_eval = Some(m);
            }
            let cancelled = cancel.load(Ordering::SeqCst);
            let save_now = self
                .config
                .save_steps
                .is_some_and(|every| (step + 1) % every == 0)
                || cancelled
                || stop_early;
            if save_now && !is_last {
                let path = self.save_checkpoint()?;
                on_event(&TrainEvent::Checkpoint {
                    step: step + 1,
                    path,
                });
            }
            if cancelled && !is_last {
                ending = Ending::Cancelled;
                break;
            }
            if stop_early {
                ending = Ending::EarlyStopped;
                on_event(&TrainEvent::EarlyStop {
                    step: step + 1,
                    best_eval_loss: self.state.best_eval_loss.unwrap_or(f64::NAN),
                });
                break;
            }
        }

        // Final evaluation, adapter and state.
        if ending != Ending::Cancelled
            && let Some(m) = self.evaluate()?
        {
            let at = self.state.global_step;
            self.record_eval(at, m, on_event);
            last_eval = Some(m);
        }
        self.state.final_loss = self.state.log_history.last().map(|l| l.loss);
        self.state.final_eval = last_eval;
        self.state.ending = Some(ending);
        let adapter_dir = if ending == Ending::Cancelled {
            self.save_checkpoint()?
        } else {
            // The final step's checkpoint too, so a later run can resume from the end.
            let path = self.save_checkpoint()?;
            on_event(&TrainEvent::Checkpoint {
                step: self.state.global_step,
                path,
            });
            self.save.save_final(&self.trainable, &self.state)?;
            self.output_dir.clone()
        };
        Ok(TrainOutcome {
            ending,
            steps: self.state.global_step,
            // The whole run's, not this process's: a resumed run counts what came before.
            trained_tokens: self.state.trained_tokens,
            final_loss: self.state.final_loss,
            eval: last_eval,
            output_dir: self.output_dir,
            adapter_dir,
            state: self.state,
            heldout: Vec::new(),
        })
    }

    /// One optimizer step (index `step`): forward and backward over its micro-batches,
    /// the gradient normalised by the step's total weight and clipped, then AdamW.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        step: usize,
        micro: &[Vec<Row>],
        names: &[String],
        warmup: usize,
        total: usize,
        grads: &mut Grads,
        cancel: &AtomicBool,
    ) -> Result<StepReport, TrainError> {
        let c = &self.config;
        let tr = &mut self.trainable;
        // Build the step's batches and the total weight its gradient is normalised by.
        let batches = micro
            .iter()
            .map(|rows| TrainBatch::new(rows, &tr.model))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weight: f64 = batches.iter().map(TrainBatch::weight_sum).sum();
        let mut stats = PassStats::default();
        let mut tokens = 0;
        grads.clear();
        // Chat first: the passes wait before each layer while replies are being made.
        let waiter = crate::yield_to::Waiter::new(self.yield_to.as_ref(), cancel);
        let wait = || waiter.wait();
        for (k, b) in batches.iter().enumerate() {
            let opts = PassOptions {
                grad_scale: if weight > 0.0 { 1.0 / weight } else { 0.0 },
                checkpointing: c.gradient_checkpointing,
                dropout_seed: c.seed ^ ((step as u64) << 20) ^ k as u64,
                pause: Some(Pause(&wait)),
            };
            let s = tr
                .model
                .forward_backward(tr.lora.as_ref(), &tr.base, b, &opts, grads)?;
            stats.add(&s);
            tokens += b.tokens();
        }
        self.paused += waiter.paused();
        let loss = stats.loss();
        if !loss.is_finite() && stats.weight_sum > 0.0 {
            return Err(TrainError::NonFiniteLoss {
                step: step + 1,
                loss,
                last_checkpoint: self
                    .state
                    .last_checkpoint
                    .clone()
                    .unwrap_or_else(|| "none (no checkpoint was written yet)".into()),
            });
        }
        let (learning_rate, grad_norm) =
            apply_gradients(c, tr, &mut self.opt, names, grads, step, warmup, total)?;
        Ok(StepReport {
            loss,
            accuracy: stats.accuracy(),
            learning_rate,
            grad_norm,
            tokens,
        })
    }

    /// The held-out examples' metrics (None: there are none).
    fn evaluate(&self) -> candle_core::Result<Option<EvalMetrics>> {
        if self.eval_examples.is_empty() {
            return Ok(None);
        }
        let tr = &self.trainable;
        evaluate_tokenized(
            &tr.model,
            tr.lora.as_ref(),
            &self.eval_examples,
            self.config.micro_batch_size,
            self.config.sequence_len,
        )
        .map(Some)
    }

    /// Write `checkpoint-STEP/` and remember it as the last one; its path.
    fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let path = self
            .save
            .save_checkpoint(&self.trainable, &self.opt, &self.state)?;
        self.state.last_checkpoint = Some(path.display().to_string());
        Ok(path)
    }

    /// Record an evaluation; returns whether early stopping triggers.
    fn record_eval(
        &mut self,
        step: usize,
        m: EvalMetrics,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> bool {
        on_event(&TrainEvent::Eval {
            step,
            eval_loss: m.loss,
            perplexity: m.perplexity,
            accuracy: m.accuracy,
        });
        let state = &mut self.state;
        state.eval_history.push(EvalEntry { step, metrics: m });
        match state.best_eval_loss {
            Some(best) if m.loss >= best => state.evals_without_improvement += 1,
            _ => {
                state.best_eval_loss = Some(m.loss);
                state.evals_without_improvement = 0;
            }
        }
        self.config
            .early_stopping_patience
            .is_some_and(|p| state.evals_without_improvement >= p)
    }
}
