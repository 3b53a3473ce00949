//! A training run set up from a job: the settings checked against the model, the resume
//! state, the data split and tokenization, the trainable parameters, the planned steps
//! and the optimizer; then [`TrainingLoop`] runs it.

use crate::batch::BatchPlan;
use crate::checkpoint::{self, Checkpoint, SaveCtx, TrainerState};
use crate::config::{Method, TrainConfig};
use crate::error::TrainError;
use crate::events::TrainEvent;
use crate::fingerprint::data_fingerprint;
use crate::optim::{AdamW, AdamWConfig};
use crate::plan::{plan_steps, split_examples};
use crate::replay;
use crate::tokenize::{TokenizeReport, TokenizedExample, tokenize_dataset};
use crate::trainable::{LORA_DTYPE, Trainable, peft_config, read_adapter};
use crate::training_loop::{TrainOutcome, TrainingLoop};
use candle_core::DType;
use loraloop_core::domain::ChatExample;
use loraloop_model::engine::LoadedModel;
use loraloop_model::llama::LlamaConfig;
use loraloop_model::train::{BaseTrain, DenseLlama, LoraParams};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

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
    /// Give way to chat between micro-batches (a job inside `serve`).
    pub yield_to: Option<crate::yield_to::YieldTo>,
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Refuse an output folder that holds a different run (unless `overwrite`); with
/// `overwrite`, remove what an earlier run wrote there (and nothing else).
pub(crate) fn prepare_output_dir(
    dir: &Path,
    overwrite: bool,
    resuming: bool,
) -> Result<(), TrainError> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainError::Invalid(format!(
            "output folder {} is a file",
            dir.display()
        )));
    }
    if dir.is_dir() && !resuming {
        // A killed write's scratch is never a run to keep: the run it was part of starts
        // over here (a worker's job killed while writing its first checkpoint).
        for e in std::fs::read_dir(dir)
            .map_err(|e| write_err(dir, e))?
            .flatten()
        {
            if checkpoint::is_scratch_name(&e.file_name().to_string_lossy()) {
                std::fs::remove_dir_all(e.path()).map_err(|err| write_err(&e.path(), err))?;
            }
        }
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

/// Refuse settings the model cannot train with.
pub(crate) fn check_settings(c: &TrainConfig, model: &LlamaConfig) -> Result<(), TrainError> {
    let n_layers = model.num_layers;
    if c.method == Method::Lora {
        for m in &c.lora_target_modules {
            let p = loraloop_model::llama::Projection::from_hf_name(m)
                .ok_or_else(|| TrainError::Invalid(format!("unknown target module {m}")))?;
            let (inp, out) = model.projection_dims(p);
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
    if c.sequence_len > model.max_position_embeddings {
        return Err(TrainError::Invalid(format!(
            "sequence_len {} exceeds the model's context of {}",
            c.sequence_len, model.max_position_embeddings
        )));
    }
    Ok(())
}

/// The base model's answers to the replay prompts that join `n_train` examples, and in
/// how many epochs they take turns (each epoch replays different prompts while the pool
/// lasts: more of what the base model knows is held in place for the same steps).
fn replay_examples(
    model: &LoadedModel,
    c: &TrainConfig,
    n_train: usize,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(Vec<ChatExample>, usize), TrainError> {
    let prompts = replay::prompts(c.replay_prompts_file.as_deref()).map_err(|e| {
        TrainError::Invalid(format!(
            "cannot read the replay prompts {}: {e}",
            c.replay_prompts_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ))
    })?;
    let say = |text: String| TrainEvent::Message { text };
    let wanted = replay::replay_count(n_train, c.replay_ratio, prompts.len());
    // Epochs the job starts: with max_steps, about as many as those steps span.
    let epochs = match c.max_steps {
        Some(steps) => {
            let per_step = (c.micro_batch_size * c.gradient_accumulation_steps).max(1);
            let per_epoch = (n_train + wanted).div_ceil(per_step).max(1);
            steps.div_ceil(per_epoch) as f64
        }
        None => c.num_epochs,
    };
    let rounds = replay::rounds(wanted, prompts.len(), epochs);
    on_event(&say(format!(
        "replay: the base model answers {} of {} general prompts",
        wanted * rounds,
        prompts.len()
    )));
    let picked = replay::pick(&prompts, wanted * rounds, c.seed);
    let answers = replay::base_answers(model, &picked, &mut |_, _| {})
        .map_err(|e| TrainError::Invalid(format!("replay: {e}")))?;
    on_event(&say(if answers.is_empty() {
        "replay: the base model gave no usable answers; training without replay".to_string()
    } else if rounds > 1 {
        format!(
            "replay: mixing about {} of the base model's answers into {n_train} examples each epoch, different ones in each of {rounds} epochs",
            answers.len() / rounds
        )
    } else {
        format!(
            "replay: mixing {} of the base model's answers into {n_train} examples",
            answers.len()
        )
    }));
    Ok((answers, rounds))
}

/// The replayed answers as training examples: tokenized, and with `replay_distill` the
/// base model's next-token distributions as their targets.
fn replay_tokens(
    replayed: &[ChatExample],
    tr: &Trainable,
    c: &TrainConfig,
    report: &mut TokenizeReport,
    model: &LoadedModel,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<Vec<TokenizedExample>, TrainError> {
    if replayed.is_empty() {
        return Ok(Vec::new());
    }
    let (mut toks, r) = match tokenize_dataset(
        replayed,
        &model.tokenizer,
        &model.template,
        c.sequence_len,
        c.train_on_inputs,
    ) {
        Ok(t) => t,
        Err(crate::tokenize::TokenizeError::NothingToTrain { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    report.examples += r.examples;
    report.truncated += r.truncated;
    report.dropped += r.dropped;
    report.tokens += r.tokens;
    report.scored_tokens += r.scored_tokens;
    if c.replay_weight != 1.0 {
        for t in &mut toks {
            t.weights
                .iter_mut()
                .for_each(|w| *w *= c.replay_weight as f32);
        }
    }
    if c.replay_distill {
        let kept = replay::distill(&tr.model, &mut toks, c.sequence_len, replay::DISTILL_TOP_K)?;
        on_event(&TrainEvent::Message {
            text: format!(
                "replay: the answers teach the base model's next-token distribution (its top {} tokens, {:.1}% of the probability)",
                replay::DISTILL_TOP_K,
                100.0 * kept
            ),
        });
    }
    Ok(toks)
}

/// The model and what trains, as a run starts: LoRA from the checkpoint, the starting
/// adapter or fresh; the base's trainable part by method.
pub(crate) fn initial_trainable(
    job: &TrainJob<'_>,
    c: &TrainConfig,
    resume: Option<&Checkpoint>,
) -> Result<Trainable, TrainError> {
    let n_layers = job.model.llama.config.num_layers;
    let dense = DenseLlama::from_llama(&job.model.llama, job.dtype)?;
    let base = match c.method {
        Method::Lora => BaseTrain::frozen(n_layers),
        Method::Full => BaseTrain::full(),
        Method::Freeze => BaseTrain {
            first_layer: n_layers - c.freeze_trainable_layers,
            embeddings: false,
            final_norm: false,
        },
    };
    let peft = peft_config(c, &job.base_model_name);
    let lora = match c.method {
        Method::Lora => Some(match (resume, &job.init_adapter) {
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
    Ok(Trainable {
        model: dense,
        lora,
        base,
    })
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
    let dir = job.output_dir.clone();
    let existed = dir.exists();
    let result = train_inner(job, cancel, on_event).map_err(|e| e.classify_oom(&c));
    // A run that failed before it wrote anything takes away the folder it made
    // (`remove_dir` removes only an empty one: checkpoints stay).
    if result.is_err() && !existed {
        let _ = std::fs::remove_dir(&dir);
    }
    result
}

fn train_inner(
    mut job: TrainJob<'_>,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome, TrainError> {
    let c = job.config.clone();
    check_settings(&c, &job.model.llama.config)?;

    // Resume state first: it fixes the data split and everything after.
    let resume = match &job.resume_from {
        Some(dir) => Some(Checkpoint::load(dir).map_err(|e| {
            TrainError::Invalid(format!("cannot resume from {}: {e}", dir.display()))
        })?),
        None => None,
    };
    prepare_output_dir(&job.output_dir, job.overwrite, resume.is_some())?;

    let examples = std::mem::take(&mut job.examples);
    let (train_ex, eval_ex) = match job.eval_examples.take() {
        Some(v) => (examples, v),
        None => split_examples(examples, c.val_set_size, c.seed)?,
    };
    let mut tr = initial_trainable(&job, &c, resume.as_ref())?;
    if c.method != Method::Lora
        && let Some(ck) = &resume
    {
        ck.restore_base(&mut tr.model)?;
    }
    let tok = &job.model.tokenizer;
    let tpl = &job.model.template;
    let (mut train_tok, mut report): (Vec<TokenizedExample>, TokenizeReport) =
        tokenize_dataset(&train_ex, tok, tpl, c.sequence_len, c.train_on_inputs)?;
    // Replay joins the training side only: the held-out examples stay the job's own data.
    if c.replay && c.method == Method::Lora {
        let (replayed, rounds) = replay_examples(job.model, &c, train_ex.len(), on_event)?;
        let mut replay_tok = replay_tokens(&replayed, &tr, &c, &mut report, job.model, on_event)?;
        if rounds > 1 {
            for (i, t) in replay_tok.iter_mut().enumerate() {
                t.rotation = Some((i % rounds, rounds));
            }
        }
        train_tok.extend(replay_tok);
    }
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
    on_event(&TrainEvent::Started {
        total_steps: total,
        train_examples: train_tok.len(),
        eval_examples: eval_tok.len(),
        truncated: report.truncated,
        dropped: report.dropped,
        trainable_params: tr.count(),
        resumed_from_step: state.global_step,
    });
    let save = SaveCtx {
        output_dir: &job.output_dir,
        peft_config: tr.lora.as_ref().map(|l| l.config.clone()),
        model: job.model,
        base_model_hash: &job.base_model_hash,
    };
    let mut outcome = TrainingLoop {
        config: c,
        trainable: tr,
        opt,
        state,
        steps,
        eval_examples: eval_tok,
        save,
        output_dir: job.output_dir.clone(),
        yield_to: job.yield_to.clone(),
        paused: std::time::Duration::ZERO,
    }
    .run(cancel, on_event)?;
    outcome.heldout = eval_ex;
    Ok(outcome)
}
