//! A DPO or KTO run: each example is two rows (DPO: the preferred and the non-preferred
//! completion; KTO: the completion and a mismatched one for the reference point), the
//! reference log-probabilities are computed once before training (the base model, or the
//! adapter the run starts from: no second copy of anything), and each optimizer step
//! turns the loss's derivative per completion into token weights of the ordinary
//! cross-entropy backward.

use super::data::PreferenceData;
use super::loss::{KtoWeights, dpo, kto, kto_reference_point};
use crate::batch::{BatchPlan, batches_in_order, epoch_order};
use crate::checkpoint::{SaveCtx, TrainerState};
use crate::config::{Objective, TrainConfig};
use crate::error::TrainError;
use crate::events::{Ending, TrainEvent};
use crate::optim::{AdamW, AdamWConfig};
use crate::run::{TrainJob, check_settings, initial_trainable, prepare_output_dir};
use crate::tokenize::{TokenizedExample, tokenize_example};
use crate::trainable::Trainable;
use crate::training_loop::{TrainOutcome, apply_gradients};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use loraloop_model::train::{Grads, PassOptions, Pause, Row, TrainBatch};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Two rows and, for KTO, the label of the first.
struct Unit {
    rows: [TokenizedExample; 2],
    desirable: bool,
}

/// The prompt and the completion as one example whose only trained turn is the
/// completion (earlier assistant turns are context).
fn as_example(prompt: &[ChatMessage], completion: &str) -> ChatExample {
    let mut messages: Vec<ChatMessage> = prompt
        .iter()
        .cloned()
        .map(|mut m| {
            if m.role == Role::Assistant {
                m.weight = Some(0.0);
            }
            m
        })
        .collect();
    messages.push(ChatMessage::new(Role::Assistant, completion));
    ChatExample { messages }
}

/// The units of `data` (KTO's second row: the prompt with the next example's completion,
/// as TRL pairs them), truncated to `sequence_len`; and how many were dropped for having
/// no completion token left.
fn units(job: &TrainJob<'_>, data: &PreferenceData) -> Result<(Vec<Unit>, usize), TrainError> {
    let c = &job.config;
    let tok = |i: usize, ex: &ChatExample| -> Result<TokenizedExample, TrainError> {
        let mut t = tokenize_example(ex, i, &job.model.tokenizer, &job.model.template, false)?;
        t.tokens.truncate(c.sequence_len);
        t.weights.truncate(c.sequence_len);
        Ok(t)
    };
    let mut out = Vec::new();
    let mut dropped = 0;
    match data {
        PreferenceData::Pairs(pairs) => {
            for (i, p) in pairs.iter().enumerate() {
                let rows = [
                    tok(i, &as_example(&p.prompt, &p.preferred))?,
                    tok(i, &as_example(&p.prompt, &p.non_preferred))?,
                ];
                if rows.iter().any(|r| r.scored() == 0) {
                    dropped += 1;
                    continue;
                }
                out.push(Unit {
                    rows,
                    desirable: true,
                });
            }
        }
        PreferenceData::Kto(rows) => {
            for (i, r) in rows.iter().enumerate() {
                let other = &rows[(i + 1) % rows.len()].completion;
                let pair = [
                    tok(i, &as_example(&r.prompt, &r.completion))?,
                    tok(i, &as_example(&r.prompt, other))?,
                ];
                if pair.iter().any(|r| r.scored() == 0) {
                    dropped += 1;
                    continue;
                }
                out.push(Unit {
                    rows: pair,
                    desirable: r.label,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "no preference example has completion tokens left after truncation to sequence_len {} ({dropped} dropped)",
            c.sequence_len
        )));
    }
    Ok((out, dropped))
}

/// The padded rows of some units, two per unit in order.
fn rows_of(units: &[&Unit], c: &TrainConfig) -> Vec<Row> {
    let examples: Vec<&TokenizedExample> = units.iter().flat_map(|u| u.rows.iter()).collect();
    let plan = BatchPlan {
        micro_batch_size: examples.len(),
        sequence_len: c.sequence_len,
        sample_packing: false,
        seed: c.seed,
    };
    batches_in_order(&examples, &plan).pop().unwrap_or_default()
}

/// Loss of a micro-batch (the mean over its examples) and `dL/dπ` of each of its rows,
/// from the policy's and the reference's summed log-probabilities, two rows per example
/// (DPO: preferred, non-preferred; KTO: the completion, labelled `desirable[i]`, and the
/// mismatched one).
pub fn micro_loss(
    c: &TrainConfig,
    desirable: &[bool],
    policy: &[f64],
    reference: &[f64],
) -> (f64, Vec<f64>) {
    let n = desirable.len() as f64;
    let mut loss = 0.0;
    let mut d = vec![0.0; policy.len()];
    match c.objective {
        Objective::Kto => {
            let (pk, rk): (Vec<f64>, Vec<f64>) = (0..desirable.len())
                .map(|i| (policy[2 * i + 1], reference[2 * i + 1]))
                .unzip();
            let z0 = kto_reference_point(&pk, &rk);
            let w = KtoWeights {
                desirable: c.kto_desirable_weight,
                undesirable: c.kto_undesirable_weight,
            };
            for (i, &label) in desirable.iter().enumerate() {
                let (l, g) = kto(policy[2 * i], reference[2 * i], label, z0, c.rl_beta, w);
                loss += l / n;
                d[2 * i] = g / n;
            }
        }
        _ => {
            for i in 0..desirable.len() {
                let (l, g) = dpo(
                    policy[2 * i],
                    policy[2 * i + 1],
                    reference[2 * i],
                    reference[2 * i + 1],
                    c.rl_beta,
                );
                loss += l / n;
                d[2 * i] = g / n;
                d[2 * i + 1] = -g / n;
            }
        }
    }
    (loss, d)
}

/// `rows` with each row's weights times `-d` of that row: the cross-entropy backward of
/// these rows is the gradient of the preference loss (d log p = -d nll).
pub fn weighted(mut rows: Vec<Row>, d: &[f64]) -> Vec<Row> {
    for (r, &g) in rows.iter_mut().zip(d) {
        for w in &mut r.weights {
            *w *= -g as f32;
        }
    }
    rows
}

/// Train on preferences; see the module's doc.
pub fn train_preferences(
    job: TrainJob<'_>,
    data: &PreferenceData,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let mut c = job.config.clone();
    check_settings(&c, &job.model.llama.config)?;
    if job.resume_from.is_some() {
        return Err(TrainError::Invalid(
            "dpo and kto runs cannot resume from a checkpoint yet; start the run again".into(),
        ));
    }
    if c.lora_dropout > 0.0 {
        // TRL's preference trainers disable dropout: the log-probabilities the loss is
        // computed from must be those the backward differentiates.
        on_event(&TrainEvent::Message {
            text: format!(
                "{}: lora_dropout {} set to 0 (as TRL does)",
                c.objective.as_str(),
                c.lora_dropout
            ),
        });
        c.lora_dropout = 0.0;
    }
    prepare_output_dir(&job.output_dir, job.overwrite, false)?;
    let (units, dropped) = units(&job, data)?;
    on_event(&TrainEvent::Message {
        text: format!(
            "{}: training on {} row(s), beta {}; the reference is the model as the run starts",
            c.objective.as_str(),
            data.len(),
            c.rl_beta
        ),
    });
    let mut tr: Trainable = initial_trainable(&job, &c, None)?;
    // The reference: the model as the run starts (fresh LoRA adds nothing to the base).
    let per_micro = c.micro_batch_size.max(1);
    let mut reference = vec![[0.0f64; 2]; units.len()];
    for (k, chunk) in units.chunks(per_micro).enumerate() {
        let refs: Vec<&Unit> = chunk.iter().collect();
        let batch = TrainBatch::new(&rows_of(&refs, &c), &tr.model)?;
        let lp = tr.model.row_log_probs(tr.lora.as_ref(), &batch)?;
        for (j, pair) in lp.chunks(2).enumerate() {
            reference[k * per_micro + j] = [pair[0], pair[1]];
        }
    }
    let per_step = per_micro * c.gradient_accumulation_steps.max(1);
    let steps_per_epoch = units.len().div_ceil(per_step);
    let epochs = c.num_epochs.ceil().max(1.0) as usize;
    let mut total = (c.num_epochs * steps_per_epoch as f64).ceil().max(1.0) as usize;
    if let Some(m) = c.max_steps {
        total = total.min(m);
    }
    let warmup = c
        .warmup_steps
        .unwrap_or_else(|| (c.warmup_ratio * total as f64).ceil() as usize);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: c.adam_beta1,
        beta2: c.adam_beta2,
        eps: c.adam_epsilon,
        weight_decay: c.weight_decay,
    });
    let mut state = TrainerState::new(
        &c,
        total,
        format!("{}:{}", c.objective.as_str(), units.len()),
        job.base_model_hash.clone(),
    );
    on_event(&TrainEvent::Started {
        total_steps: total,
        train_examples: units.len(),
        eval_examples: 0,
        truncated: 0,
        dropped,
        trainable_params: tr.count(),
        resumed_from_step: 0,
    });
    let names = tr.names();
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut grads = Grads::default();
    let mut ending = Ending::Finished;
    let mut step = 0;
    // Chat first, as in SFT runs: a pause between micro-batches while replies are made.
    let mut paused = std::time::Duration::ZERO;
    let mut pauses = crate::yield_to::PauseReport::default();
    'epochs: for epoch in 0..epochs {
        let order = epoch_order(units.len(), c.seed, epoch);
        for step_units in order.chunks(per_step).take(steps_per_epoch) {
            if step == total {
                break 'epochs;
            }
            grads.clear();
            let micro: Vec<&[usize]> = step_units.chunks(per_micro).collect();
            let n_micro = micro.len() as f64;
            let mut loss = 0.0;
            let mut tokens = 0;
            let waiter = crate::yield_to::Waiter::new(job.yield_to.as_ref(), cancel);
            let wait = || waiter.wait();
            for (k, idx) in micro.iter().enumerate() {
                // The log-probabilities' pass has no pause point: wait before it too.
                wait();
                let us: Vec<&Unit> = idx.iter().map(|&i| &units[i]).collect();
                let rows = rows_of(&us, &c);
                let batch = TrainBatch::new(&rows, &tr.model)?;
                let policy = tr.model.row_log_probs(tr.lora.as_ref(), &batch)?;
                let refs: Vec<f64> = idx.iter().flat_map(|&i| reference[i]).collect();
                let labels: Vec<bool> = us.iter().map(|u| u.desirable).collect();
                let (l, d) = micro_loss(&c, &labels, &policy, &refs);
                loss += l / n_micro;
                tokens += batch.tokens();
                let batch = TrainBatch::new(&weighted(rows, &d), &tr.model)?;
                let opts = PassOptions {
                    grad_scale: 1.0 / n_micro,
                    checkpointing: c.gradient_checkpointing,
                    dropout_seed: c.seed ^ ((step as u64) << 20) ^ k as u64,
                    pause: Some(Pause(&wait)),
                };
                tr.model
                    .forward_backward(tr.lora.as_ref(), &tr.base, &batch, &opts, &mut grads)?;
            }
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss,
                    last_checkpoint: "none (preference runs write no checkpoints yet)".into(),
                });
            }
            paused += waiter.paused();
            let (lr, grad_norm) =
                apply_gradients(&c, &mut tr, &mut opt, &names, &grads, step, warmup, total)?;
            if let Some(text) = pauses.due(paused, started.elapsed()) {
                on_event(&TrainEvent::Message { text });
            }
            step += 1;
            tokens_done += tokens;
            let elapsed = started.elapsed().as_secs_f64();
            state.global_step = step;
            state.epoch = epoch as f64 + 1.0;
            state.log_history.push(crate::checkpoint::LogEntry {
                step,
                loss,
                learning_rate: lr,
                grad_norm,
                tokens_per_sec: tokens_done as f64 / elapsed.max(1e-9),
            });
            on_event(&TrainEvent::Step {
                step,
                total_steps: total,
                epoch: state.epoch,
                loss,
                learning_rate: lr,
                grad_norm,
                tokens_per_sec: tokens_done as f64 / elapsed.max(1e-9),
                eta_secs: elapsed / step as f64 * (total - step) as f64,
                accuracy: None,
            });
            if cancel.load(Ordering::SeqCst) && step < total {
                ending = Ending::Cancelled;
                break 'epochs;
            }
        }
    }
    state.final_loss = state.log_history.last().map(|l| l.loss);
    state.ending = Some(ending);
    let save = SaveCtx {
        output_dir: &job.output_dir,
        peft_config: tr.lora.as_ref().map(|l| l.config.clone()),
        model: job.model,
        base_model_hash: &job.base_model_hash,
    };
    save.save_final(&tr, &state)?;
    Ok(TrainOutcome {
        ending,
        steps: step,
        trained_tokens: tokens_done,
        final_loss: state.final_loss,
        eval: None,
        output_dir: job.output_dir.clone(),
        adapter_dir: job.output_dir.clone(),
        state,
        heldout: Vec::new(),
    })
}
