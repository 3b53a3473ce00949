//! `fine-tune`, `evaluate` and `predict` for classifiers: a BERT-family encoder on
//! labelled texts or a ResNet on class folders of images. `fine-tune` comes here when the
//! task says so (`--task`, the YAML's `task`), when the model is an encoder or a ResNet,
//! or when the data is a folder of images.

use super::train::FineTuneArgs;
use crate::progress::Progress;
use anyhow::{Context, bail};
use clap::Args;
use loraloop_core::Config;
use loraloop_model::classify::{self, Classifier, Task};
use loraloop_trainer::classify::data::{self, Examples};
use loraloop_trainer::classify::{ClassifyEvent, ClassifySettings, Run};
use loraloop_trainer::config::TrainFile;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A model name as given: a path when one exists, else a folder of that name in the
/// models directory, else the name itself (a bare `resnet18|34|50`).
pub fn resolve_model(config: &Config, name: &Path) -> PathBuf {
    if name.exists() {
        return name.to_path_buf();
    }
    let in_models = config.models_dir.join(name);
    if in_models.exists() {
        return in_models;
    }
    name.to_path_buf()
}

/// The classifier task of `fine-tune` with these flags and settings, or `None` for a
/// chat-model fine-tune.
pub fn task_for(
    config: &Config,
    args: &FineTuneArgs,
    file: &TrainFile,
) -> anyhow::Result<Option<Task>> {
    let data = match args.data_path.clone() {
        Some(p) => Some(p),
        None => file.dataset_path()?,
    };
    let model = args
        .model
        .clone()
        .or_else(|| file.base_model.clone().map(PathBuf::from));
    task_of(config, file, model.as_deref(), data.as_deref())
}

/// The classifier task of a fine-tune, or `None` for an LLM fine-tune.
fn task_of(
    config: &Config,
    file: &TrainFile,
    model: Option<&Path>,
    data: Option<&Path>,
) -> anyhow::Result<Option<Task>> {
    if let Some(t) = file.task.as_deref() {
        return match Task::parse(t) {
            Some(task) => Ok(Some(task)),
            None if matches!(t, "sft" | "chat" | "causal-lm" | "text-generation") => Ok(None),
            None => bail!(
                "unknown task {t:?}; expected text-classification, image-classification or text-generation"
            ),
        };
    }
    if let Some(task) = model.and_then(|m| classify::detect_task(&resolve_model(config, m))) {
        return Ok(Some(task));
    }
    Ok(data
        .filter(|d| data::is_image_folder(d))
        .map(|_| Task::ImageClassification))
}

pub async fn fine_tune(
    config: &Config,
    args: &FineTuneArgs,
    mut file: TrainFile,
    task: Task,
) -> anyhow::Result<ExitCode> {
    if let Some(b) = args.batch_size {
        file.micro_batch_size = Some(b);
        file.gradient_accumulation_steps = None;
    }
    let model_name = args
        .model
        .clone()
        .or_else(|| file.base_model.clone().map(PathBuf::from))
        .context("a classifier fine-tune needs --model (a folder, a models-directory name, or resnet18|34|50)")?;
    let model_path = resolve_model(config, &model_name);
    let data_path = match args.data_path.clone() {
        Some(p) => Some(p),
        None => file.dataset_path()?,
    }
    .context("a classifier fine-tune needs --data-path (a JSONL/CSV file of texts or a folder of images)")?;
    if args.dataset.is_some() {
        bail!("--dataset names a chat dataset; a classifier reads --data-path");
    }
    let settings = ClassifySettings::from_file(&file, task)?;
    let output_dir = args
        .output_dir
        .clone()
        .or_else(|| file.output_dir.clone())
        .unwrap_or_else(|| {
            let stem = model_name
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "model".into());
            PathBuf::from("classifiers").join(format!("{stem}-{}", task.name()))
        });
    if has_checkpoints(&output_dir) && !args.overwrite {
        bail!(
            "{} already holds checkpoints; pass --overwrite to replace them, or choose another --output-dir",
            output_dir.display()
        );
    }
    let data::Prepared {
        labels,
        train,
        eval,
    } = data::prepare(
        &data_path,
        args.eval_data_path.as_deref(),
        task,
        settings.val_set_size,
        settings.seed,
    )
    .map_err(anyhow::Error::msg)?;
    let device = super::resolve_device(args.device.as_deref(), config)?;
    let seed = settings.seed;
    let base_name = model_name.display().to_string();
    let (img_size, max_len) = (settings.image_size, settings.max_length);
    let base = tokio::task::spawn_blocking(move || {
        classify::load_base(&model_path, img_size, max_len, seed, &device)
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    if base.random {
        eprintln!(
            "note: no weights found for {base_name} (no such file or folder, none in the models directory): training from a RANDOM initialization of {base_name}. For a pretrained start, pass --model path/to/folder with its safetensors."
        );
    }
    if base.arch.task() != task {
        bail!(
            "{base_name} is a {} model but the task is {}",
            base.arch.task().name(),
            task.name()
        );
    }
    eprintln!(
        "fine-tuning {base_name} for {} ({}): {} training and {} held-out examples, {} labels {:?}, {} epoch(s), batch {}, learning rate {:e}",
        task.name(),
        settings.method.name(),
        train.len(),
        eval.len(),
        labels.len(),
        labels,
        settings.epochs,
        settings.batch_size,
        settings.learning_rate
    );
    let terminal = std::io::stderr().is_terminal();
    let out_dir = output_dir.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut bar: Option<Progress> = None;
        let mut on_event = |e: ClassifyEvent| match e {
            ClassifyEvent::Started { trainable_params, total_params, total_steps, .. } => {
                eprintln!("training {trainable_params} of {total_params} parameters, {total_steps} steps");
                bar = Some(Progress::new("training", total_steps as u64, false));
            }
            ClassifyEvent::Step { step, loss, .. } => {
                if let Some(b) = bar.as_mut() {
                    b.set(step as u64);
                }
                if !terminal {
                    tracing::debug!(step, loss, "step");
                }
            }
            ClassifyEvent::Evaluated { epoch, train_loss, metrics, best, .. } => {
                eprintln!(
                    "epoch {epoch}: train loss {train_loss:.4}, eval loss {:.4}, accuracy {:.2}%, macro-F1 {:.4}{}",
                    metrics.loss,
                    metrics.accuracy * 100.0,
                    metrics.macro_f1,
                    if best { " (best so far)" } else { "" }
                );
            }
            ClassifyEvent::Saved { dir, .. } => tracing::info!("saved {}", dir.display()),
            ClassifyEvent::Best { .. } => {}
            ClassifyEvent::Message { text } => eprintln!("{text}"),
            ClassifyEvent::EarlyStopped { epoch, best_epoch } => {
                eprintln!("early stopping after epoch {epoch}: no improvement since epoch {best_epoch}")
            }
        };
        let run = Run { base, base_name, labels, train, eval, settings: &settings, output_dir: out_dir };
        let r = loraloop_trainer::classify::train(run, &mut on_event, &|| false);
        if let Some(b) = bar {
            b.finish();
        }
        r
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    eprintln!(
        "{} steps in {:.1} s of training ({:.2} s/step)",
        outcome.steps,
        outcome.train_seconds,
        outcome.train_seconds / outcome.steps.max(1) as f64
    );
    if let Some(best) = &outcome.best_checkpoint {
        println!("best checkpoint: {}", best.display());
    }
    println!(
        "checkpoints and trainer_state.json in {}",
        output_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn has_checkpoints(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        })
        .unwrap_or(false)
}

/// Load a classifier checkpoint for evaluate / predict.
fn load_checkpoint(
    dir: &Path,
    device: candle_core::Device,
) -> anyhow::Result<(Classifier, classify::Manifest)> {
    Classifier::load(dir, &device)
        .map_err(|e| anyhow::anyhow!("cannot load the classifier {}: {e}", dir.display()))
}

/// Whether `evaluate --model-path` names a classifier checkpoint.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(classify::MANIFEST).is_file()
}

/// `evaluate --model-path CHECKPOINT --data-path FILE|DIR [--json]`.
pub async fn evaluate(
    config: &Config,
    dir: &Path,
    data_path: &Path,
    json: bool,
    device: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let device = super::resolve_device(device, config)?;
    let (dir, data_path) = (dir.to_path_buf(), data_path.to_path_buf());
    let metrics = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (mut c, manifest) = load_checkpoint(&dir, device)?;
        let (rows, val) = data::read_for(&data_path, manifest.task).map_err(anyhow::Error::msg)?;
        // A folder with train/ and val/: the held-out part is what is evaluated.
        let rows = val.unwrap_or(rows);
        let ex: Examples = rows.index(&c.labels).map_err(anyhow::Error::msg)?;
        loraloop_trainer::classify::evaluate(&mut c, &ex, 32).map_err(anyhow::Error::msg)
    })
    .await??;
    if json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
    } else {
        print!("{}", metrics.report());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A classifier checkpoint folder (checkpoint-EPOCH from fine-tune).
    #[arg(long, alias = "model")]
    pub model_path: PathBuf,
    /// Texts to classify (text models), or image files (image models).
    pub inputs: Vec<String>,
    /// A file with one text per line, or a JSONL file with a "text" field per line.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Every label's probability, as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
}

/// `predict`: the label (and probability) of each text or image.
pub async fn predict(config: &Config, args: &PredictArgs) -> anyhow::Result<ExitCode> {
    let device = super::resolve_device(args.device.as_deref(), config)?;
    let mut inputs = args.inputs.clone();
    if let Some(f) = &args.input_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let from_json = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string));
            inputs.push(from_json.unwrap_or_else(|| line.to_string()));
        }
    }
    if inputs.is_empty() {
        bail!("nothing to classify: give texts or image files as arguments, or --input-file");
    }
    let dir = args.model_path.clone();
    let json = args.json;
    let preds = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (mut c, manifest) = load_checkpoint(&dir, device)?;
        let mut out = Vec::new();
        for chunk in inputs.chunks(32) {
            let input = match manifest.task {
                Task::TextClassification => {
                    let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    c.encode_texts(&texts)?
                }
                Task::ImageClassification => {
                    let images = chunk
                        .iter()
                        .map(|p| classify::image::open(Path::new(p)))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(anyhow::Error::msg)?;
                    c.encode_images(&images)?
                }
            };
            out.extend(chunk.iter().cloned().zip(c.predict(&input)?));
        }
        Ok(out)
    })
    .await??;
    for (input, p) in preds {
        if json {
            let scores: serde_json::Map<String, serde_json::Value> = p
                .scores
                .iter()
                .map(|(l, s)| (l.clone(), serde_json::Value::from(*s)))
                .collect();
            println!(
                "{}",
                serde_json::json!({"input": input, "label": p.label, "score": p.score, "scores": scores})
            );
        } else {
            println!("{}\t{:.4}\t{}", p.label, p.score, input);
        }
    }
    Ok(ExitCode::SUCCESS)
}
