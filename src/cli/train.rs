//! `loraloop fine-tune` and `loraloop evaluate`.

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use loraloop_core::Config;
use loraloop_core::domain::ChatExample;
use loraloop_model::engine::LoadedModel;
use loraloop_model::lora::{LoraAdapter, read_peft_dir};
use loraloop_model::template::TemplateMessage;
use loraloop_model::train::{DenseLlama, LoraParams};
use loraloop_trainer::config::{Method, Objective, TrainFile};
use loraloop_trainer::evaluate::evaluate_tokenized;
use loraloop_trainer::events::{Ending, EvalMetrics, TrainEvent};
use loraloop_trainer::fingerprint::hash_model;
use loraloop_trainer::generate::greedy_reply;
use loraloop_trainer::preference::{
    PreferenceData, parse_preference_jsonl, parse_stored, train_preferences,
};
use loraloop_trainer::run::{TrainJob, auto_train_dtype, train};
use loraloop_trainer::tokenize::tokenize_dataset;
use loraloop_trainer::trainable::LORA_DTYPE;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct FineTuneArgs {
    /// A .gguf file or a Hugging Face model folder (default: base_model from the YAML, else
    /// the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: a JSONL file in any format `data import` reads.
    #[arg(long, value_name = "FILE", conflicts_with = "dataset")]
    pub data_path: Option<PathBuf>,
    /// Training data: a stored dataset (latest version unless --dataset-version).
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    #[arg(long, requires = "dataset")]
    pub dataset_version: Option<i64>,
    /// Held-out data for evaluation (default: val_set_size split off the training data).
    #[arg(long, value_name = "FILE")]
    pub eval_data_path: Option<PathBuf>,
    /// Where the adapter, checkpoints and trainer_state.json go (default: adapters/NAME).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Replace an earlier run in --output-dir.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue from a checkpoint-STEP folder (same data and settings).
    #[arg(long, value_name = "DIR")]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Start from an existing PEFT adapter instead of a fresh one.
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
    /// lora (default), full or freeze.
    #[arg(long)]
    pub method: Option<String>,
    /// With --method freeze: how many of the last layers train.
    #[arg(long)]
    pub freeze_layers: Option<usize>,
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per optimizer step; with a smaller --micro-batch-size the difference is
    /// made up by gradient accumulation.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Examples per forward/backward pass (default 4).
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub lora_r: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated, e.g. q_proj,v_proj (default: all seven).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    #[arg(long)]
    pub sequence_len: Option<usize>,
    /// A fraction (below 1) or a number of examples held out for evaluation.
    #[arg(long)]
    pub val_set_size: Option<f64>,
    #[arg(long)]
    pub eval_steps: Option<usize>,
    #[arg(long)]
    pub save_steps: Option<usize>,
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long)]
    pub sample_packing: bool,
    #[arg(long)]
    pub train_on_inputs: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Mix the base model's answers to general prompts into the data (on by default: a
    /// guard against forgetting; the report card measures what was kept).
    #[arg(long, overrides_with = "no_replay")]
    pub replay: bool,
    /// Train on the data alone, without replayed answers.
    #[arg(long)]
    pub no_replay: bool,
    /// The share of replayed answers in the training data (default 0.3).
    #[arg(long)]
    pub replay_ratio: Option<f64>,
    /// More replay prompts, one per line.
    #[arg(long, value_name = "FILE")]
    pub replay_prompts: Option<PathBuf>,
    /// Replayed answers teach only the base model's greedy tokens. By default they teach
    /// its whole next-token distribution (the top 64 tokens at each position).
    #[arg(long)]
    pub no_replay_distill: bool,
    /// The loss weight of replayed answers next to the data's own (default 1).
    #[arg(long)]
    pub replay_weight: Option<f64>,
    /// What to learn: sft (chat examples, the default), dpo (OpenAI preference JSONL:
    /// preferred over non-preferred replies) or kto (TRL's JSONL: replies labelled
    /// desirable or not), as `data build --kind` writes them.
    #[arg(long)]
    pub rl: Option<String>,
    /// DPO's and KTO's β (default 0.1).
    #[arg(long)]
    pub rl_beta: Option<f64>,
    /// Skip the report card (held-out scores and the retention probe) after training.
    #[arg(long)]
    pub no_card: bool,
    /// text-classification or image-classification (default: from the model and the
    /// data; an encoder or a ResNet, or a folder of images, trains a classifier).
    #[arg(long)]
    pub task: Option<String>,
    /// Classifiers: the held-out metric that picks the best checkpoint and drives early
    /// stopping: accuracy (default), macro_f1, loss, macro_precision, macro_recall,
    /// f1:LABEL, precision:LABEL or recall:LABEL.
    #[arg(long)]
    pub metric_for_best_model: Option<String>,
    /// Classifiers: the side images are resized and cropped to (default 224).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
    /// The base model's dtype while training: auto (bf16 on CUDA for LoRA, f32 otherwise),
    /// f32 or bf16. LoRA weights and optimizer state are f32 either way.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl FineTuneArgs {
    /// The flags as a YAML overlay.
    fn overlay(&self) -> TrainFile {
        let flag = |b: bool| b.then_some(true);
        TrainFile {
            finetuning_type: self.method.clone(),
            freeze_trainable_layers: self.freeze_layers,
            num_epochs: self.epochs,
            max_steps: self.max_steps,
            micro_batch_size: self.micro_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler.clone(),
            warmup_steps: self.warmup_steps,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            lora_r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            lora_target_modules: self.target_modules.clone(),
            sequence_len: self.sequence_len,
            val_set_size: self.val_set_size,
            eval_steps: self.eval_steps,
            save_steps: self.save_steps,
            early_stopping_patience: self.early_stopping_patience,
            gradient_checkpointing: flag(self.gradient_checkpointing),
            sample_packing: flag(self.sample_packing),
            train_on_inputs: flag(self.train_on_inputs),
            seed: self.seed,
            replay: if self.no_replay {
                Some(false)
            } else {
                flag(self.replay)
            },
            replay_ratio: self.replay_ratio,
            replay_prompts_file: self.replay_prompts.clone(),
            replay_distill: self.no_replay_distill.then_some(false),
            replay_weight: self.replay_weight,
            rl: self.rl.clone(),
            rl_beta: self.rl_beta,
            task: self.task.clone(),
            metric_for_best_model: self.metric_for_best_model.clone(),
            image_size: self.image_size,
            ..Default::default()
        }
    }
}

/// Preference rows for `objective` from a JSONL file; `None` when it has problems (they
/// are listed on stderr).
async fn read_preferences(
    path: &Path,
    objective: Objective,
) -> anyhow::Result<Option<PreferenceData>> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    match parse_preference_jsonl(&bytes, objective) {
        Ok(d) => Ok(Some(d)),
        Err(problems) => {
            eprintln!(
                "{}: {} problem(s); nothing was trained:",
                path.display(),
                problems.len()
            );
            for p in problems.iter().take(20) {
                eprintln!("  {p}");
            }
            if problems.len() > 20 {
                eprintln!("  ... and {} more", problems.len() - 20);
            }
            Ok(None)
        }
    }
}

/// Examples from a JSONL file in any format `data import` reads, parsed and reported the
/// way `data import` does; `None` when it has errors (they are listed on stderr).
async fn read_examples(path: &Path) -> anyhow::Result<Option<Vec<ChatExample>>> {
    let outcome = super::data::read_and_parse(path, None).await?;
    if super::data::report_errors(path, &outcome, "nothing was trained or evaluated") {
        return Ok(None);
    }
    Ok(Some(outcome.examples))
}

fn load_model(path: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    if !path.exists() {
        bail!(
            "model {} not found; run `loraloop models fetch` for the default model, or pass --model PATH",
            path.display()
        );
    }
    LoadedModel::load(path, device).with_context(|| format!("cannot load {}", path.display()))
}

/// Step progress: a bar on a terminal, log lines otherwise (every step with -v).
struct StepProgress {
    bar: Option<ProgressBar>,
    every: usize,
}

impl StepProgress {
    fn new(verbose: u8, logging_steps: usize) -> Self {
        Self {
            bar: None,
            every: if verbose > 0 { 1 } else { logging_steps.max(1) },
        }
    }

    fn on(&mut self, e: &TrainEvent) {
        match e {
            TrainEvent::Started {
                total_steps,
                train_examples,
                eval_examples,
                truncated,
                dropped,
                trainable_params,
                resumed_from_step,
            } => {
                eprintln!(
                    "training: {train_examples} examples ({eval_examples} held out), {total_steps} steps, {trainable_params} trainable parameters{}",
                    if *resumed_from_step > 0 {
                        format!(", resuming at step {resumed_from_step}")
                    } else {
                        String::new()
                    }
                );
                if *truncated > 0 || *dropped > 0 {
                    eprintln!(
                        "{truncated} example(s) truncated to sequence_len, {dropped} left out with nothing to train on"
                    );
                }
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(*total_steps as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:25}] step {pos}/{len} eta {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_position(*resumed_from_step as u64);
                    bar.enable_steady_tick(Duration::from_millis(250));
                    self.bar = Some(bar);
                }
            }
            TrainEvent::Step {
                step,
                total_steps,
                epoch,
                loss,
                learning_rate,
                tokens_per_sec,
                eta_secs,
                grad_norm,
                ..
            } => {
                let line = format!(
                    "loss {loss:.4} lr {learning_rate:.2e} {tokens_per_sec:.0} tok/s"
                );
                if let Some(bar) = &self.bar {
                    bar.set_position(*step as u64);
                    bar.set_message(line);
                } else if step % self.every == 0 || step == total_steps {
                    tracing::info!(
                        "step {step}/{total_steps} epoch {epoch:.2} loss {loss:.4} lr {learning_rate:.3e} grad_norm {grad_norm:.3} {tokens_per_sec:.0} tok/s eta {eta_secs:.0}s"
                    );
                }
            }
            TrainEvent::Eval {
                step,
                eval_loss,
                perplexity,
                accuracy,
            } => self.println(&format!(
                "eval at step {step}: loss {eval_loss:.4}, perplexity {perplexity:.2}, token accuracy {:.1}%",
                accuracy * 100.0
            )),
            TrainEvent::Checkpoint { step, path } => {
                self.println(&format!("checkpoint at step {step}: {}", path.display()))
            }
            TrainEvent::EarlyStop {
                step,
                best_eval_loss,
            } => self.println(&format!(
                "early stopping at step {step}: eval loss has not improved on {best_eval_loss:.4}"
            )),
            TrainEvent::Message { text } => self.println(text),
        }
    }

    fn println(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The training YAML (if any) with the flags laid over it.
pub fn merged_file(args: &FineTuneArgs, training_yaml: Option<&Path>) -> anyhow::Result<TrainFile> {
    let file = match training_yaml {
        Some(p) => TrainFile::read(p)?,
        None => TrainFile::default(),
    };
    Ok(file.merge(args.overlay()))
}

pub async fn fine_tune(
    config: &Config,
    args: &FineTuneArgs,
    training_yaml: Option<PathBuf>,
    verbose: u8,
) -> anyhow::Result<ExitCode> {
    let file = match &training_yaml {
        Some(p) => TrainFile::read(p)?,
        None => TrainFile::default(),
    };
    let mut merged = file.clone().merge(args.overlay());
    if let Some(b) = args.batch_size {
        if b == 0 {
            bail!("--batch-size must be at least 1");
        }
        let micro = merged.micro_batch_size.unwrap_or(4).min(b);
        if b % micro != 0 {
            bail!(
                "--batch-size {b} is not a multiple of the micro batch size {micro}; pick a --micro-batch-size that divides it"
            );
        }
        merged.micro_batch_size = Some(micro);
        merged.gradient_accumulation_steps = Some(b / micro);
    }
    // Data.
    let data_path = match args.data_path.clone() {
        Some(p) => Some(p),
        None => file.dataset_path()?,
    };
    // A stored dataset trains by its kind: DPO or KTO rows set the objective.
    let stored = match (&data_path, &args.dataset) {
        (None, Some(name)) => {
            let db = super::data::open_db(config).await?;
            let d = db.dataset(name, args.dataset_version).await?;
            if merged.rl.is_none() && d.objective() != Objective::Sft {
                merged.rl = Some(d.kind.clone());
            }
            Some((db, d))
        }
        _ => None,
    };
    let c = merged.validate()?;
    let preferences = match (&data_path, c.objective) {
        (_, Objective::Sft) => None,
        (None, objective) if stored.is_some() => {
            let (db, d) = stored.as_ref().expect("checked");
            if d.objective() != objective {
                bail!(
                    "{} v{} holds {} rows, but --rl {} trains on {} rows",
                    d.name,
                    d.version,
                    d.kind,
                    objective.as_str(),
                    objective.as_str()
                );
            }
            let lines = db.dataset_lines(d.id).await?;
            Some(parse_stored(&lines, objective).map_err(|p| {
                anyhow::anyhow!("{} v{} does not parse: {}", d.name, d.version, p[0])
            })?)
        }
        (Some(p), objective) => match read_preferences(p, objective).await? {
            Some(d) => Some(d),
            None => return Ok(ExitCode::FAILURE),
        },
        (None, objective) => bail!(
            "--rl {} trains on a preference file: pass --data-path FILE (`data build --kind {}` writes one)",
            objective.as_str(),
            objective.as_str()
        ),
    };
    let (examples, data_name) = match (&data_path, &args.dataset) {
        (Some(p), _) if preferences.is_some() => (
            Vec::new(),
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into()),
        ),
        (None, Some(_)) if preferences.is_some() => {
            let (_, d) = stored.as_ref().expect("a stored dataset");
            (Vec::new(), format!("{}-v{}", d.name, d.version))
        }
        (Some(p), _) => (
            match read_examples(p).await? {
                Some(ex) => ex,
                None => return Ok(ExitCode::FAILURE),
            },
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into()),
        ),
        (None, Some(_)) => {
            let (db, d) = stored.as_ref().expect("a stored dataset");
            let ex = db.dataset_examples(d.id).await?;
            (
                ex.into_iter().map(|e| e.example).collect(),
                format!("{}-v{}", d.name, d.version),
            )
        }
        (None, None) => bail!(
            "no training data: pass --data-path FILE or --dataset NAME (or datasets: in the YAML)"
        ),
    };
    if examples.is_empty() && preferences.is_none() {
        bail!("the training data holds no examples");
    }
    let eval_examples = match &args.eval_data_path {
        Some(p) => match read_examples(p).await? {
            Some(ex) => Some(ex),
            None => return Ok(ExitCode::FAILURE),
        },
        None => None,
    };
    let model_path = args
        .model
        .clone()
        .or_else(|| file.base_model.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| config.model_path());
    let output_dir = args
        .output_dir
        .clone()
        .or_else(|| file.output_dir.clone())
        .unwrap_or_else(|| PathBuf::from("adapters").join(&data_name));

    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)"
                );
                cancel.store(true, Ordering::SeqCst);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let overwrite = args.overwrite;
    let no_card = args.no_card;
    let config = config.clone();
    let resume = args.resume_from_checkpoint.clone();
    let init = args.init_adapter.clone().or(file.lora_model_dir.clone());
    let device = super::resolve_device(args.device.as_deref(), &config)?;
    let dtype = super::train_dtype(&args.dtype, &device, c.method)?;
    eprintln!(
        "training on {} with the base model in {dtype:?} (LoRA weights and optimizer state f32)",
        loraloop_model::device::device_name(&device)
    );
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<ExitCode> {
        let model = load_model(&model_path, &device)?;
        eprintln!("hashing {} ...", model_path.display());
        let base_hash = hash_model(&model_path)?;
        let mut progress = StepProgress::new(verbose, c.logging_steps);
        let job = TrainJob {
            model: &model,
            base_model_name: model_path.display().to_string(),
            base_model_hash: base_hash.clone(),
            examples,
            eval_examples,
            config: c.clone(),
            output_dir,
            overwrite,
            resume_from: resume,
            init_adapter: init,
            dtype,
            yield_to: None,
        };
        let outcome = match &preferences {
            Some(data) => train_preferences(job, data, &cancel, &mut |e| progress.on(e)),
            None => train(job, &cancel, &mut |e| progress.on(e)),
        };
        progress.finish();
        let outcome = outcome?;
        match outcome.ending {
            Ending::Cancelled => {
                println!(
                    "stopped at step {}; checkpoint saved in {} (continue with --resume-from-checkpoint {})",
                    outcome.steps,
                    outcome.adapter_dir.display(),
                    outcome.adapter_dir.display()
                );
                return Ok(ExitCode::from(130));
            }
            Ending::EarlyStopped => println!("stopped early at step {}", outcome.steps),
            Ending::Finished => {}
        }
        println!(
            "trained {} steps; final training loss {}",
            outcome.steps,
            outcome.final_loss.map_or("-".into(), |l| format!("{l:.4}"))
        );
        if let Some(m) = outcome.eval {
            println!("{}", metrics_line("eval", &m));
        }
        println!("adapter: {}", outcome.output_dir.display());
        if c.method == Method::Lora && !no_card {
            let dense = DenseLlama::from_llama(&model.llama, dtype)?;
            let card = super::card::make(
                &config,
                &model,
                &dense,
                &outcome.output_dir,
                &outcome.heldout,
                &base_hash,
                c.sequence_len,
            )?;
            super::card::report(&card, &outcome.output_dir)?;
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
    .context("the trainer panicked")??;
    Ok(result)
}

fn metrics_line(label: &str, m: &EvalMetrics) -> String {
    format!(
        "{label}: loss {:.4}, perplexity {:.2}, token accuracy {:.1}% over {} tokens",
        m.loss,
        m.perplexity,
        m.accuracy * 100.0,
        m.tokens
    )
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// A .gguf file or a Hugging Face model folder (default: the configured model), or a
    /// classifier checkpoint folder.
    #[arg(long, alias = "model-path")]
    pub model: Option<PathBuf>,
    /// A PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The evaluation data (any format `data import` reads; for a classifier, a JSONL/CSV
    /// of texts or a folder of class folders of images).
    #[arg(long, value_name = "FILE")]
    pub data_path: PathBuf,
    /// Base vs adapter side by side, with a few sample generations.
    #[arg(long, requires = "adapter")]
    pub compare: bool,
    /// Sample generations shown with --compare.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Longest example in tokens (longer ones are truncated; default 1024).
    #[arg(long, value_parser = at_least_one)]
    pub sequence_len: Option<usize>,
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
}

impl EvaluateArgs {
    /// The flags for a language model that a classifier checkpoint cannot use, if any was
    /// given (they would be ignored).
    pub fn language_model_flags(&self) -> Option<&'static str> {
        if self.adapter.is_some() {
            Some("--adapter")
        } else if self.sequence_len.is_some() {
            Some("--sequence-len")
        } else {
            None
        }
    }
}

/// A count that must be at least 1, as a flag's value parser.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub async fn evaluate(config: &Config, args: &EvaluateArgs) -> anyhow::Result<ExitCode> {
    let Some(examples) = read_examples(&args.data_path).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let adapter_dir = args.adapter.clone();
    let seq = args.sequence_len.unwrap_or(1024);
    let (compare, samples, json) = (args.compare, args.samples, args.json);
    let config = config.clone();
    let device = super::resolve_device(args.device.as_deref(), &config)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<ExitCode> {
        let model = load_model(&model_path, &device)?;
        let dense = DenseLlama::from_llama(&model.llama, auto_train_dtype(&device, Method::Lora))?;
        let lora = match &adapter_dir {
            Some(dir) => {
                super::check_adapter_base(dir, &model_path)?;
                let (cfg, tensors) = read_peft_dir(dir, &device)
                    .with_context(|| format!("cannot read the adapter {}", dir.display()))?;
                Some(LoraParams::from_tensors(cfg, &tensors, &dense.config, LORA_DTYPE)?)
            }
            None => None,
        };
        let (tok, report) = tokenize_dataset(&examples, &model.tokenizer, &model.template, seq, false)?;
        if report.truncated > 0 || report.dropped > 0 {
            eprintln!(
                "{} example(s) truncated to {seq} tokens, {} left out with no assistant tokens left: the figures cover {} of {} example(s)",
                report.truncated,
                report.dropped,
                examples.len() - report.dropped,
                examples.len()
            );
        }
        let with = evaluate_tokenized(&dense, lora.as_ref(), &tok, 4, seq)?;
        let card = match &adapter_dir {
            Some(dir) => {
                let hash = hash_model(&model_path)?;
                Some(super::card::make(&config, &model, &dense, dir, &examples, &hash, seq)?)
            }
            None => None,
        };
        let base = if compare {
            Some(evaluate_tokenized(&dense, None, &tok, 4, seq)?)
        } else {
            None
        };
        let mut sample_rows = Vec::new();
        if compare {
            let adapter = LoraAdapter::load(adapter_dir.as_deref().expect("compare requires adapter"), &model.llama.config, &model.llama.device)?;
            for ex in examples.iter().take(samples) {
                let Some(last_user) = ex.messages.iter().rposition(|m| m.role == loraloop_core::domain::Role::User) else {
                    continue;
                };
                let msgs: Vec<TemplateMessage> = ex.messages[..=last_user]
                    .iter()
                    .map(|m| TemplateMessage::new(m.role.as_str(), m.content.clone()))
                    .collect();
                let b = greedy_reply(&model, None, &msgs, 64).map_err(anyhow::Error::msg)?;
                let a = greedy_reply(&model, Some(&adapter), &msgs, 64).map_err(anyhow::Error::msg)?;
                sample_rows.push((ex.messages[last_user].content.clone(), b, a));
            }
        }
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "metrics": with,
                    "base_metrics": base,
                    "samples": sample_rows.iter().map(|(p, b, a)| serde_json::json!({"prompt": p, "base": b, "adapter": a})).collect::<Vec<_>>(),
                    "report_card": card,
                })
            );
        } else if let Some(b) = base {
            println!("| metric | base | adapter |");
            println!("| --- | --- | --- |");
            println!("| loss | {:.4} | {:.4} |", b.loss, with.loss);
            println!("| perplexity | {:.2} | {:.2} |", b.perplexity, with.perplexity);
            println!("| token accuracy | {:.1}% | {:.1}% |", b.accuracy * 100.0, with.accuracy * 100.0);
            println!("({} scored tokens)", with.tokens);
            for (p, b, a) in &sample_rows {
                println!("\nprompt:  {p}\nbase:    {b}\nadapter: {a}");
            }
        } else {
            println!("{}", metrics_line(if lora.is_some() { "adapter" } else { "base" }, &with));
        }
        if let (Some(card), false) = (&card, json) {
            println!("\n{}", super::card::render(card));
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
    .context("the evaluator panicked")?
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Where job outputs go (each job in job-ID/).
    #[arg(long, default_value = "adapters")]
    pub adapters_dir: PathBuf,
    /// Seconds between looks at an empty queue.
    #[arg(long, default_value_t = 2.0)]
    pub poll_secs: f64,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
}

pub async fn worker(config: &Config, args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let db = super::data::open_db(config).await?;
    let shutdown = Arc::new(AtomicBool::new(false));
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nstopping: the running job saves a checkpoint and goes back to the queue"
                );
                shutdown.store(true, Ordering::SeqCst);
            }
        });
    }
    let device = super::resolve_device(args.device.as_deref(), config)?;
    eprintln!(
        "worker: waiting for training jobs in {} (training on {})",
        config.database_path.display(),
        loraloop_model::device::device_name(&device)
    );
    loraloop_trainer::worker::run_worker(
        db,
        loraloop_trainer::worker::WorkerOptions {
            models_dir: config.models_dir.clone(),
            adapters_dir: args.adapters_dir.clone(),
            poll_interval: Duration::from_secs_f64(args.poll_secs.max(0.05)),
            device,
            shared_model: None,
            gate: loraloop_trainer::job_card::GateOptions::from_config(config),
            yield_to: None,
        },
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
