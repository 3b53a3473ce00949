//! The training loop: data split and tokenization, micro-batches with gradient
//! accumulation, AdamW with clipping and a schedule, evaluation and early stopping,
//! checkpoints that resume exactly, cancellation, and the final adapter.

use crate::batch::{BatchPlan, batches_in_order, epoch_batches, epoch_order};
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::{Method, TrainConfig};
use crate::optim::{AdamW, AdamWConfig, global_norm};
use crate::tokenize::{TokenizeReport, TokenizedExample, tokenize_dataset};
use candle_core::DType;
use loraloop_core::domain::ChatExample;
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::{PeftConfig, TargetModules, read_peft_dir};
use loraloop_model::train::{
    BaseTrain, DenseLlama, Grads, LoraParams, PassOptions, PassStats, Row, TrainBatch,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the loss became {loss} at step {step}; training stopped (lower the learning rate); the last good checkpoint is {last_checkpoint}"
    )]
    NonFiniteLoss {
        step: usize,
        loss: f64,
        last_checkpoint: String,
    },
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
    #[error(transparent)]
    Adapter(#[from] loraloop_model::lora::AdapterError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}", oom_message(.detail, .micro_batch_size, .gradient_checkpointing))]
    OutOfMemory {
        /// The device's own error text.
        detail: String,
        micro_batch_size: usize,
        gradient_checkpointing: bool,
    },
}

fn oom_message(detail: &str, micro_batch_size: &usize, gradient_checkpointing: &bool) -> String {
    let (micro_batch_size, gradient_checkpointing) = (*micro_batch_size, *gradient_checkpointing);
    let mut fixes = Vec::new();
    if micro_batch_size > 1 {
        fixes.push(format!(
            "a smaller micro_batch_size (now {micro_batch_size}; raise gradient_accumulation_steps to keep the effective batch)"
        ));
    }
    if !gradient_checkpointing {
        fixes.push("gradient_checkpointing: true".to_string());
    }
    fixes.push("a shorter sequence_len".to_string());
    format!(
        "the GPU ran out of memory during training ({detail}); try {}. The server and the active adapter are not affected",
        fixes.join(", or ")
    )
}

/// Whether a candle error is the device running out of memory: the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` (cudarc's `DriverError` prints as
/// `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`), cuBLAS's
/// `CUBLAS_STATUS_ALLOC_FAILED` and cuRAND's `CURAND_STATUS_ALLOCATION_FAILED` (both print
/// their status name).
pub fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string();
    [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CURAND_STATUS_ALLOCATION_FAILED",
    ]
    .iter()
    .any(|k| text.contains(k))
}

impl TrainError {
    /// A device out-of-memory error as `OutOfMemory` (with what to change), others as they are.
    pub fn classify_oom(self, c: &TrainConfig) -> Self {
        match self {
            Self::Candle(e) if is_out_of_memory(&e) => Self::OutOfMemory {
                detail: e.to_string().lines().next().unwrap_or_default().to_string(),
                micro_batch_size: c.micro_batch_size,
                gradient_checkpointing: c.gradient_checkpointing,
            },
            other => other,
        }
    }
}

/// The LoRA weights' dtype, on every device: they and AdamW's state stay f32 whatever
/// the base model's dtype (mixed precision, as PEFT keeps adapter weights in f32).
pub const LORA_DTYPE: DType = DType::F32;

/// The LoRA of the PEFT adapter folder `dir`, to train further on `dense`: the adapter's
/// shape (rank, alpha, targets) and weights, with `lora_dropout` (this run's) instead of
/// the dropout it was trained with.
pub(crate) fn read_adapter(
    dir: &Path,
    dense: &DenseLlama,
    lora_dropout: f64,
) -> Result<LoraParams, loraloop_model::lora::AdapterError> {
    let (cfg, tensors) = read_peft_dir(dir, &dense.device)?;
    let mut p = LoraParams::from_tensors(cfg, &tensors, &dense.config, LORA_DTYPE)?;
    p.config.lora_dropout = lora_dropout;
    Ok(p)
}

/// The base model's dtype for training on `device` when none is asked for: bf16 on CUDA
/// for LoRA (the frozen base), f32 otherwise. Full and freeze training update base
/// weights, which have no f32 master copy here, so they stay f32 on every device.
pub fn auto_train_dtype(device: &candle_core::Device, method: Method) -> DType {
    if device.is_cuda() && method == Method::Lora {
        DType::BF16
    } else {
        DType::F32
    }
}

/// `auto`, `f32` or `bf16` (the `--dtype` option); `None` for `auto`.
pub fn parse_train_dtype(s: &str) -> Result<Option<DType>, String> {
    match s {
        "auto" => Ok(None),
        "f32" | "float32" => Ok(Some(DType::F32)),
        "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
        other => Err(format!(
            "unknown dtype {other:?}: expected auto, f32 or bf16"
        )),
    }
}

/// What the trainer reports while it runs (the CLI prints it; the job worker stores it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        train_examples: usize,
        eval_examples: usize,
        truncated: usize,
        dropped: usize,
        trainable_params: usize,
        resumed_from_step: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: f64,
        loss: f64,
        learning_rate: f64,
        grad_norm: f64,
        tokens_per_sec: f64,
        eta_secs: f64,
    },
    Eval {
        step: usize,
        eval_loss: f64,
        perplexity: f64,
        accuracy: f64,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
    EarlyStop {
        step: usize,
        best_eval_loss: f64,
    },
    Message {
        text: String,
    },
}

/// Loss, perplexity and mean token accuracy of a model on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    pub tokens: usize,
}

impl From<PassStats> for EvalMetrics {
    fn from(s: PassStats) -> Self {
        Self {
            loss: s.loss(),
            perplexity: s.loss().exp(),
            accuracy: s.accuracy(),
            tokens: s.scored,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Finished,
    EarlyStopped,
    Cancelled,
}

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
}

/// Everything a run needs.
pub struct TrainJob<'a> {
    pub model: &'a LoadedModel,
    /// How the base model is named in `base_model_name_or_path`.
    pub base_model_name: String,
    /// SHA-256 of the base model's weights.
    pub base_model_hash: String,
    pub examples: Vec<ChatExample>,
    /// Held-out examples; `None`: split `val_set_size` off `examples`.
    pub eval_examples: Option<Vec<ChatExample>>,
    pub config: TrainConfig,
    pub output_dir: PathBuf,
    pub overwrite: bool,
    pub resume_from: Option<PathBuf>,
    pub init_adapter: Option<PathBuf>,
    /// The base model's dtype (see [`auto_train_dtype`]); LoRA weights are [`LORA_DTYPE`].
    pub dtype: DType,
}

/// The trainable parameters of a run.
pub struct Trainable {
    pub model: DenseLlama,
    pub lora: Option<LoraParams>,
    pub base: BaseTrain,
}

impl Trainable {
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.lora {
            Some(l) => l.named_params().into_iter().map(|(n, _)| n).collect(),
            None => Vec::new(),
        };
        let n_layers = self.model.blocks.len();
        for (name, _) in self.model.named_params() {
            if base_param_trains(&name, &self.base, n_layers) {
                names.push(name);
            }
        }
        names
    }

    pub fn param(&mut self, name: &str) -> Option<&mut candle_core::Tensor> {
        if name.starts_with("base_model.") {
            self.lora.as_mut()?.param_mut(name)
        } else {
            self.model.param_mut(name)
        }
    }

    pub fn count(&mut self) -> usize {
        self.names()
            .iter()
            .map(|n| self.param(n).map_or(0, |t| t.elem_count()))
            .sum()
    }
}

pub(crate) fn base_param_trains(name: &str, base: &BaseTrain, n_layers: usize) -> bool {
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => base.embeddings,
        "model.norm.weight" => base.final_norm,
        _ => name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= base.first_layer && i < n_layers),
    }
}

/// PEFT's config for these settings.
pub fn peft_config(c: &TrainConfig, base_model_name: &str) -> PeftConfig {
    let mut p = PeftConfig::new(c.lora_r, c.lora_alpha, &[]);
    p.target_modules = TargetModules::List(c.lora_target_modules.clone());
    p.lora_dropout = c.lora_dropout;
    p.use_rslora = c.use_rslora;
    p.base_model_name_or_path = Some(base_model_name.to_string());
    p.inference_mode = true;
    p
}

/// Split `val_set_size` (a fraction below 1, or a count) off the examples, the same
/// way for the same seed.
pub fn split_examples(
    examples: Vec<ChatExample>,
    val_set_size: f64,
    seed: u64,
) -> (Vec<ChatExample>, Vec<ChatExample>) {
    let n = examples.len();
    let n_val = if val_set_size < 1.0 {
        (val_set_size * n as f64).floor() as usize
    } else {
        val_set_size as usize
    };
    // Keep at least one training example.
    let n_val = n_val.min(n.saturating_sub(1));
    if n_val == 0 {
        return (examples, Vec::new());
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
    (train, val)
}

/// The optimizer steps of the run, each a list of micro-batches, with the epoch they
/// belong to: the same list for the same data and seed, so a resume skips to its step.
fn plan_steps(
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

fn write_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Refuse an output folder that holds a different run (unless `overwrite`); with
/// `overwrite`, remove what an earlier run wrote there (and nothing else).
fn prepare_output_dir(dir: &Path, overwrite: bool, resuming: bool) -> Result<(), TrainError> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainError::Invalid(format!(
            "output folder {} is a file",
            dir.display()
        )));
    }
    if dir.is_dir() && !resuming {
        let ours = checkpoint::run_files(dir).map_err(|e| write_err(dir, e))?;
        let others = std::fs::read_dir(dir)
            .map_err(|e| write_err(dir, e))?
            .filter_map(Result::ok)
            .filter(|e| !ours.contains(&e.path()))
            .count();
        if !ours.is_empty() || others > 0 {
            if !overwrite {
                return Err(TrainError::Invalid(format!(
                    "output folder {} already holds {}; pass --overwrite to replace that run, or --resume-from-checkpoint to continue it",
                    dir.display(),
                    if ours.is_empty() {
                        "other files".to_string()
                    } else {
                        "a training run".to_string()
                    }
                )));
            }
            for p in ours {
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| write_err(&p, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))
}

/// Run a training job. `cancel` is checked after every optimizer step; when set, the run
/// saves a checkpoint and returns `Ending::Cancelled`. A device out-of-memory error comes
/// back as `TrainError::OutOfMemory`.
pub fn train(
    job: TrainJob<'_>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let c = job.config.clone();
    train_inner(job, cancel, on_event).map_err(|e| e.classify_oom(&c))
}

fn train_inner(
    job: TrainJob<'_>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let c = job.config.clone();
    let llama = &job.model.llama;
    let n_layers = llama.config.num_layers;
    if c.method == Method::Lora {
        for m in &c.lora_target_modules {
            let p = loraloop_model::llama::Projection::from_hf_name(m)
                .ok_or_else(|| TrainError::Invalid(format!("unknown target module {m}")))?;
            let (inp, out) = llama.config.projection_dims(p);
            if c.lora_r > inp.min(out) {
                return Err(TrainError::Invalid(format!(
                    "lora_r {} is larger than {m} ({inp} -> {out}); the rank must be at most {}",
                    c.lora_r,
                    inp.min(out)
                )));
            }
        }
    }
    if c.method == Method::Freeze && c.freeze_trainable_layers > n_layers {
        return Err(TrainError::Invalid(format!(
            "freeze_trainable_layers {} exceeds the model's {n_layers} layers",
            c.freeze_trainable_layers
        )));
    }
    if c.sequence_len > llama.config.max_position_embeddings {
        return Err(TrainError::Invalid(format!(
            "sequence_len {} exceeds the model's context of {}",
            c.sequence_len, llama.config.max_position_embeddings
        )));
    }

    // Resume state first: it fixes the data split and everything after.
    let resume = match &job.resume_from {
        Some(dir) => Some(Checkpoint::load(dir).map_err(|e| {
            TrainError::Invalid(format!("cannot resume from {}: {e}", dir.display()))
        })?),
        None => None,
    };
    prepare_output_dir(&job.output_dir, job.overwrite, resume.is_some())?;

    let (train_ex, eval_ex) = match job.eval_examples {
        Some(v) => (job.examples, v),
        None => split_examples(job.examples, c.val_set_size, c.seed),
    };
    let tok = &job.model.tokenizer;
    let tpl = &job.model.template;
    let (train_tok, report): (Vec<TokenizedExample>, TokenizeReport) =
        tokenize_dataset(&train_ex, tok, tpl, c.sequence_len, c.train_on_inputs)?;
    let eval_tok = if eval_ex.is_empty() {
        Vec::new()
    } else {
        match tokenize_dataset(&eval_ex, tok, tpl, c.sequence_len, c.train_on_inputs) {
            Ok((t, _)) => t,
            Err(crate::tokenize::TokenizeError::NothingToTrain { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    };
    let data_hash = data_fingerprint(&train_tok);

    let dense = DenseLlama::from_llama(llama, job.dtype)?;
    let base = match c.method {
        Method::Lora => BaseTrain::frozen(n_layers),
        Method::Full => BaseTrain::full(),
        Method::Freeze => BaseTrain {
            first_layer: n_layers - c.freeze_trainable_layers,
            embeddings: false,
            final_norm: false,
        },
    };
    let peft = peft_config(&c, &job.base_model_name);
    let lora = match c.method {
        Method::Lora => Some(match (&resume, &job.init_adapter) {
            (Some(ck), _) => ck.lora_params(&dense)?,
            (None, Some(dir)) => {
                let mut p = read_adapter(dir, &dense, c.lora_dropout)?;
                p.config.base_model_name_or_path = Some(job.base_model_name.clone());
                p
            }
            (None, None) => {
                LoraParams::init(peft, &dense.config, c.seed, LORA_DTYPE, &dense.device)?
            }
        }),
        _ => None,
    };
    let mut tr = Trainable {
        model: dense,
        lora,
        base,
    };
    if c.method != Method::Lora
        && let Some(ck) = &resume
    {
        ck.restore_base(&mut tr.model)?;
    }

    let plan = BatchPlan {
        micro_batch_size: c.micro_batch_size,
        sequence_len: c.sequence_len,
        sample_packing: c.sample_packing,
        seed: c.seed,
    };
    let steps = plan_steps(
        &train_tok,
        &plan,
        c.gradient_accumulation_steps,
        c.num_epochs,
        c.max_steps,
    );
    let total = steps.len();
    let steps_per_epoch = steps.iter().filter(|(e, _)| *e == 0).count().max(1);
    let warmup = c
        .warmup_steps
        .unwrap_or_else(|| (c.warmup_ratio * total as f64).ceil() as usize);

    let mut opt = AdamW::new(AdamWConfig {
        beta1: c.adam_beta1,
        beta2: c.adam_beta2,
        eps: c.adam_epsilon,
        weight_decay: c.weight_decay,
    });
    let mut state = TrainerState::new(&c, total, data_hash.clone(), job.base_model_hash.clone());
    if let Some(ck) = &resume {
        if ck.state.data_hash != data_hash {
            return Err(TrainError::Invalid(
                "the checkpoint was trained on different data (or different tokenization settings); resume with the same dataset and settings".into(),
            ));
        }
        ck.restore_optimizer(&mut opt, &tr.model.device)?;
        state = ck.state.clone();
        state.total_steps = total;
    }
    let start_step = state.global_step;
    let names = tr.names();
    on_event(&TrainEvent::Started {
        total_steps: total,
        train_examples: train_tok.len(),
        eval_examples: eval_tok.len(),
        truncated: report.truncated,
        dropped: report.dropped,
        trainable_params: tr.count(),
        resumed_from_step: start_step,
    });

    let run_eval = |tr: &Trainable| -> candle_core::Result<Option<EvalMetrics>> {
        if eval_tok.is_empty() {
            return Ok(None);
        }
        evaluate_tokenized(
            &tr.model,
            tr.lora.as_ref(),
            &eval_tok,
            c.micro_batch_size,
            c.sequence_len,
        )
        .map(Some)
    };
    let ctx = SaveCtx {
        output_dir: &job.output_dir,
        peft_config: tr.lora.as_ref().map(|l| l.config.clone()),
        model: job.model,
        base_model_hash: &job.base_model_hash,
    };

    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut ending = Ending::Finished;
    let mut last_eval = None;
    let mut grads = Grads::default();
    for (step, (epoch, micro)) in steps.iter().enumerate().skip(start_step) {
        // Build the step's batches and the total weight its gradient is normalised by.
        let batches = micro
            .iter()
            .map(|rows| TrainBatch::new(rows, &tr.model))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weight: f64 = batches.iter().map(TrainBatch::weight_sum).sum();
        let mut stats = PassStats::default();
        grads.clear();
        for (k, b) in batches.iter().enumerate() {
            let opts = PassOptions {
                grad_scale: if weight > 0.0 { 1.0 / weight } else { 0.0 },
                checkpointing: c.gradient_checkpointing,
                dropout_seed: c.seed ^ ((step as u64) << 20) ^ k as u64,
            };
            let s = tr
                .model
                .forward_backward(tr.lora.as_ref(), &tr.base, b, &opts, &mut grads)?;
            stats.add(&s);
            tokens_done += b.tokens();
        }
        let loss = stats.loss();
        if !loss.is_finite() && stats.weight_sum > 0.0 {
            return Err(TrainError::NonFiniteLoss {
                step: step + 1,
                loss,
                last_checkpoint: state
                    .last_checkpoint
                    .clone()
                    .unwrap_or_else(|| "none (no checkpoint was written yet)".into()),
            });
        }
        let grad_norm = global_norm(names.iter().filter_map(|n| grads.get(n)))?;
        let clip = if c.max_grad_norm > 0.0 && grad_norm > c.max_grad_norm {
            c.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = c.learning_rate * c.lr_scheduler.factor(step, warmup, total);
        opt.begin_step();
        for name in &names {
            let Some(g) = grads.get(name) else { continue };
            let g = if clip < 1.0 { (g * clip)? } else { g.clone() };
            let p = tr
                .param(name)
                .ok_or_else(|| TrainError::Invalid(format!("lost parameter {name}")))?;
            *p = opt.update(name, p, &g, lr)?;
        }
        state.global_step = step + 1;
        state.epoch = *epoch as f64
            + (((step + 1) - epoch * steps_per_epoch) as f64 / steps_per_epoch as f64).min(1.0);
        let elapsed = started.elapsed().as_secs_f64();
        let done_here = step + 1 - start_step;
        let tps = tokens_done as f64 / elapsed.max(1e-9);
        let eta = elapsed / done_here as f64 * (total - step - 1) as f64;
        state.log_history.push(checkpoint::LogEntry {
            step: step + 1,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens_per_sec: tps,
        });
        on_event(&TrainEvent::Step {
            step: step + 1,
            total_steps: total,
            epoch: state.epoch,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens_per_sec: tps,
            eta_secs: eta,
        });

        let is_last = step + 1 == total;
        let mut stop_early = false;
        if let Some(every) = c.eval_steps
            && (step + 1) % every == 0
            && !is_last
            && let Some(m) = run_eval(&tr)?
        {
            stop_early = record_eval(&mut state, &c, step + 1, m, on_event);
            last_eval = Some(m);
        }
        let cancelled = cancel.load(Ordering::SeqCst);
        let save_now =
            c.save_steps.is_some_and(|every| (step + 1) % every == 0) || cancelled || stop_early;
        if save_now && !is_last {
            let path = ctx.save_checkpoint(&tr, &opt, &state)?;
            state.last_checkpoint = Some(path.display().to_string());
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
                best_eval_loss: state.best_eval_loss.unwrap_or(f64::NAN),
            });
            break;
        }
    }

    // Final evaluation, adapter and state.
    if ending != Ending::Cancelled
        && let Some(m) = run_eval(&tr)?
    {
        let at = state.global_step;
        record_eval(&mut state, &c, at, m, on_event);
        last_eval = Some(m);
    }
    state.final_loss = state.log_history.last().map(|l| l.loss);
    state.final_eval = last_eval;
    state.ending = Some(ending);
    let adapter_dir = if ending == Ending::Cancelled {
        let p = ctx.save_checkpoint(&tr, &opt, &state)?;
        state.last_checkpoint = Some(p.display().to_string());
        p
    } else {
        // The final step's checkpoint too, so a later run can resume from the end.
        let p = ctx.save_checkpoint(&tr, &opt, &state)?;
        state.last_checkpoint = Some(p.display().to_string());
        on_event(&TrainEvent::Checkpoint {
            step: state.global_step,
            path: p,
        });
        ctx.save_final(&tr, &state)?;
        job.output_dir.clone()
    };
    Ok(TrainOutcome {
        ending,
        steps: state.global_step,
        trained_tokens: tokens_done,
        final_loss: state.final_loss,
        eval: last_eval,
        output_dir: job.output_dir.clone(),
        adapter_dir,
        state,
    })
}

/// Record an evaluation; returns whether early stopping triggers.
fn record_eval(
    state: &mut TrainerState,
    c: &TrainConfig,
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
    state
        .eval_history
        .push(checkpoint::EvalEntry { step, metrics: m });
    match state.best_eval_loss {
        Some(best) if m.loss >= best => state.evals_without_improvement += 1,
        _ => {
            state.best_eval_loss = Some(m.loss);
            state.evals_without_improvement = 0;
        }
    }
    c.early_stopping_patience
        .is_some_and(|p| state.evals_without_improvement >= p)
}

/// A fingerprint of the tokenized training data (resume refuses other data).
fn data_fingerprint(examples: &[TokenizedExample]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in examples {
        h.update((e.tokens.len() as u64).to_le_bytes());
        for (t, w) in e.tokens.iter().zip(&e.weights) {
            h.update(t.to_le_bytes());
            h.update(w.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Where and how a run writes its weights.
pub(crate) struct SaveCtx<'a> {
    pub output_dir: &'a Path,
    pub peft_config: Option<PeftConfig>,
    pub model: &'a LoadedModel,
    pub base_model_hash: &'a str,
}

/// SHA-256 of a model's weights: the `.gguf` file, or a folder's `*.safetensors` files in
/// name order.
pub fn hash_model(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    for f in files.drain(..) {
        let mut file = std::fs::File::open(&f)?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod oom_tests {
    use super::*;

    /// An error with the text cudarc gives a failed allocation: `DriverError`'s `Display`
    /// is its `Debug`, `DriverError(<CUresult name>, "<cuGetErrorString text>")`
    /// (cudarc 0.19 `src/driver/result.rs`), wrapped by candle as `Error::Cuda`.
    #[derive(Debug)]
    struct FakeDriverError;
    impl std::fmt::Display for FakeDriverError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
        }
    }
    impl std::error::Error for FakeDriverError {}

    fn config(micro: usize, gc: bool) -> TrainConfig {
        let yaml = format!("micro_batch_size: {micro}\ngradient_checkpointing: {gc}\n");
        crate::config::TrainFile::parse(&yaml, "test")
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_cuda_out_of_memory_error_says_so_and_what_to_change() {
        let e = TrainError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError)));
        let msg = e.classify_oom(&config(8, false)).to_string();
        assert!(
            msg.starts_with("the GPU ran out of memory during training"),
            "{msg}"
        );
        assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{msg}");
        assert!(msg.contains("micro_batch_size (now 8"), "{msg}");
        assert!(msg.contains("gradient_checkpointing: true"), "{msg}");
        assert!(msg.contains("not affected"), "{msg}");

        // Checkpointing already on and one row per batch: only what is left to change.
        let e = TrainError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError)));
        let msg = e.classify_oom(&config(1, true)).to_string();
        assert!(!msg.contains("micro_batch_size") && !msg.contains("gradient_checkpointing"));
        assert!(msg.contains("shorter sequence_len"), "{msg}");

        // cuBLAS's failed workspace allocation (its status name is its Display).
        let e = TrainError::Candle(candle_core::Error::Msg(
            "CublasError(CUBLAS_STATUS_ALLOC_FAILED)".into(),
        ));
        assert!(matches!(
            e.classify_oom(&config(4, false)),
            TrainError::OutOfMemory { .. }
        ));
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        let e = TrainError::Candle(candle_core::Error::Msg("shape mismatch in matmul".into()));
        let msg = e.classify_oom(&config(4, false)).to_string();
        assert_eq!(msg, "shape mismatch in matmul");
        let e = TrainError::Invalid("lora_r 999 is larger".into());
        assert!(matches!(
            e.classify_oom(&config(4, false)),
            TrainError::Invalid(_)
        ));
    }
}
