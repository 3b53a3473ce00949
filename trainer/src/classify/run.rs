//! The classifier training loop: shuffled mini-batches (images augmented), cross-entropy,
//! gradients through candle's autograd, clipping, AdamW with the learning-rate schedule
//! (no weight decay on biases and norms, as transformers' Trainer), then after each epoch
//! the held-out metrics, a `checkpoint-EPOCH` folder, `trainer_state.json`, and early
//! stopping on the chosen metric.

use super::data::Examples;
use super::metrics::{Metrics, higher_is_better};
use super::settings::ClassifySettings;
use crate::optim::{AdamW, AdamWConfig, HostMoments, global_norm};
use candle_core::Tensor;
use loraloop_model::classify::image::{self as img, Preprocess};
use loraloop_model::classify::{Arch, Base, Classifier, Input, ops};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What a run reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClassifyEvent {
    Started {
        train_examples: usize,
        eval_examples: usize,
        labels: Vec<String>,
        trainable_params: usize,
        total_params: usize,
        total_steps: usize,
    },
    Step {
        epoch: usize,
        step: usize,
        total_steps: usize,
        loss: f64,
        accuracy: f64,
        learning_rate: f64,
    },
    Evaluated {
        epoch: usize,
        step: usize,
        train_loss: f64,
        metrics: Metrics,
        best: bool,
    },
    Saved {
        epoch: usize,
        dir: PathBuf,
    },
    /// The checkpoint just saved is the best so far by the chosen metric.
    Best {
        epoch: usize,
        dir: PathBuf,
        metric: Option<f64>,
    },
    EarlyStopped {
        epoch: usize,
        best_epoch: usize,
    },
    Message {
        text: String,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub best_checkpoint: Option<PathBuf>,
    pub best_metric: Option<f64>,
    pub best_epoch: Option<usize>,
    pub last_checkpoint: Option<PathBuf>,
    pub epochs_run: usize,
    pub steps: usize,
    pub cancelled: bool,
    pub history: Vec<serde_json::Value>,
    /// Seconds spent in training steps (not evaluating or saving).
    pub train_seconds: f64,
}

/// The model's input for the examples `idx` of `ex` (images decoded, and augmented when
/// `augment`) and their label indices.
fn batch_input(
    c: &Classifier,
    ex: &Examples,
    idx: &[usize],
    augment: bool,
    rng: &mut StdRng,
) -> Result<(Input, Tensor), String> {
    let dev = c.params.device().clone();
    let labels: Vec<u32> = idx.iter().map(|&i| ex.label(i) as u32).collect();
    let labels = Tensor::new(labels.as_slice(), &dev).map_err(|e| e.to_string())?;
    let input = match ex {
        Examples::Text(rows) => {
            let texts: Vec<&str> = idx.iter().map(|&i| rows[i].0.as_str()).collect();
            c.encode_texts(&texts).map_err(|e| e.to_string())?
        }
        Examples::Images(rows) => {
            let Arch::ResNet { image_size, .. } = &c.arch else {
                return Err("images given to a text model".into());
            };
            let pre = Preprocess {
                size: *image_size,
                augment,
            };
            let paths: Vec<&Path> = idx.iter().map(|&i| rows[i].0.as_path()).collect();
            let seeds: Vec<u64> = idx.iter().map(|_| rand::Rng::random(rng)).collect();
            let prepared = decode_all(&paths, &seeds, pre)?;
            Input::Images(img::to_tensor(&prepared, &dev).map_err(|e| e.to_string())?)
        }
    };
    Ok((input, labels))
}

/// Decode and prepare images on every core.
fn decode_all(
    paths: &[&Path],
    seeds: &[u64],
    pre: Preprocess,
) -> Result<Vec<image::RgbImage>, String> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(paths.len().max(1));
    let chunk = paths.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .zip(seeds.chunks(chunk))
            .map(|(ps, ss)| {
                s.spawn(move || {
                    ps.iter()
                        .zip(ss)
                        .map(|(p, &seed)| {
                            let mut rng = StdRng::seed_from_u64(seed);
                            Ok(pre.apply(&img::open(p)?, &mut rng))
                        })
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(paths.len());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| "an image decoder thread panicked".to_string())??,
            );
        }
        Ok(out)
    })
}

/// Metrics of `c` on `ex` (evaluation mode, batches of `batch`).
pub fn evaluate(c: &mut Classifier, ex: &Examples, batch: usize) -> Result<Metrics, String> {
    let mut rng = StdRng::seed_from_u64(0);
    let (mut truth, mut predicted) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    let all: Vec<usize> = (0..ex.len()).collect();
    for idx in all.chunks(batch.max(1)) {
        let (input, labels) = batch_input(c, ex, idx, false, &mut rng)?;
        let logits = c
            .forward(&input, false)
            .map_err(|e| e.to_string())?
            .detach();
        let loss: f32 = ops::cross_entropy(&logits, &labels)
            .and_then(|l| l.to_scalar())
            .map_err(|e| e.to_string())?;
        loss_sum += loss as f64 * idx.len() as f64;
        let preds: Vec<u32> = logits
            .argmax(1)
            .and_then(|p| p.to_vec1())
            .map_err(|e| e.to_string())?;
        predicted.extend(preds.into_iter().map(|p| p as usize));
        truth.extend(idx.iter().map(|&i| ex.label(i)));
    }
    Ok(Metrics::compute(
        &truth,
        &predicted,
        &c.labels,
        loss_sum / ex.len().max(1) as f64,
    ))
}

/// Everything `train` needs.
pub struct Run<'a> {
    pub base: Base,
    pub base_name: String,
    pub labels: Vec<String>,
    pub train: Examples,
    pub eval: Examples,
    pub settings: &'a ClassifySettings,
    pub output_dir: PathBuf,
}

/// Train, evaluate and save each epoch. `stop` is polled between steps.
pub fn train(
    run: Run<'_>,
    on_event: &mut dyn FnMut(ClassifyEvent),
    stop: &dyn Fn() -> bool,
) -> Result<Outcome, String> {
    let s = run.settings;
    let err = |e: candle_core::Error| e.to_string();
    let mut c = Classifier::new(run.base, run.labels.clone(), s.method, s.seed).map_err(err)?;
    ops::seed_dropout(s.seed);
    let n = run.train.len();
    if n == 0 {
        return Err("no training examples".into());
    }
    let per_epoch = n.div_ceil(s.batch_size);
    let total = (per_epoch * s.epochs)
        .min(s.max_steps.unwrap_or(usize::MAX))
        .max(1);
    let warmup = s
        .warmup_steps
        .unwrap_or((s.warmup_ratio * total as f64).ceil() as usize);
    on_event(ClassifyEvent::Started {
        train_examples: n,
        eval_examples: run.eval.len(),
        labels: run.labels.clone(),
        trainable_params: c.params.trainable_count(),
        total_params: c.params.total_count(),
        total_steps: total,
    });
    std::fs::create_dir_all(&run.output_dir)
        .map_err(|e| format!("{}: {e}", run.output_dir.display()))?;
    let adam = |wd| AdamWConfig {
        weight_decay: wd,
        ..Default::default()
    };
    let (mut decay, mut no_decay) = (AdamW::new(adam(s.weight_decay)), AdamW::new(adam(0.0)));
    let mut host = HostMoments::default();
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let higher = higher_is_better(&s.metric);
    let mut out = Outcome {
        best_checkpoint: None,
        best_metric: None,
        best_epoch: None,
        last_checkpoint: None,
        epochs_run: 0,
        steps: 0,
        cancelled: false,
        history: Vec::new(),
        train_seconds: 0.0,
    };
    let mut since_best = 0usize;
    'epochs: for epoch in 1..=s.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for idx in order.chunks(s.batch_size) {
            if out.steps >= total {
                break;
            }
            if stop() {
                out.cancelled = true;
                break 'epochs;
            }
            let step_start = std::time::Instant::now();
            let (input, labels) = batch_input(&c, &run.train, idx, true, &mut rng)?;
            let pass = c
                .backward(&input, &labels, s.gradient_checkpointing)
                .map_err(err)?;
            let vars: Vec<(String, candle_core::Var)> = c
                .params
                .trainable()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|(k, v)| {
                    pass.grads
                        .get(v)
                        .cloned()
                        .ok_or_else(|| format!("no gradient reached {k}"))
                })
                .collect::<Result<_, _>>()?;
            let norm = global_norm(gs.iter()).map_err(err)?;
            let clip = if s.max_grad_norm > 0.0 && norm > s.max_grad_norm {
                s.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let lr = s.learning_rate * s.scheduler.factor(out.steps, warmup, total);
            decay.begin_step();
            no_decay.begin_step();
            for ((name, var), g) in vars.iter().zip(&gs) {
                let opt = if var.rank() >= 2 {
                    &mut decay
                } else {
                    &mut no_decay
                };
                if !opt
                    .step_in_place(&mut host, name, var.as_tensor(), g, clip, lr)
                    .map_err(err)?
                {
                    let g = if clip < 1.0 {
                        (g * clip).map_err(err)?
                    } else {
                        g.clone()
                    };
                    let new = opt.update(name, var.as_tensor(), &g, lr).map_err(err)?;
                    var.set(&new).map_err(err)?;
                }
            }
            let l: f32 = pass.loss.to_scalar().map_err(err)?;
            let hits: f32 = pass
                .logits
                .argmax(1)
                .and_then(|p| p.eq(&labels))
                .and_then(|m| m.to_dtype(candle_core::DType::F32))
                .and_then(|m| m.mean_all())
                .and_then(|m| m.to_scalar())
                .map_err(err)?;
            out.steps += 1;
            out.train_seconds += step_start.elapsed().as_secs_f64();
            loss_sum += l as f64 * idx.len() as f64;
            seen += idx.len();
            on_event(ClassifyEvent::Step {
                epoch,
                step: out.steps,
                total_steps: total,
                loss: l as f64,
                accuracy: hits as f64,
                learning_rate: lr,
            });
        }
        out.epochs_run = epoch;
        let train_loss = loss_sum / seen.max(1) as f64;
        let metrics = if run.eval.is_empty() {
            None
        } else {
            Some(evaluate(&mut c, &run.eval, s.batch_size)?)
        };
        let score = metrics.as_ref().and_then(|m| m.get(&s.metric));
        let best = match (score, out.best_metric) {
            (Some(v), Some(b)) => {
                if higher {
                    v > b
                } else {
                    v < b
                }
            }
            (Some(_), None) => true,
            (None, _) => true,
        };
        let dir = run.output_dir.join(format!("checkpoint-{epoch}"));
        let metrics_json = metrics
            .as_ref()
            .map(|m| serde_json::to_value(m).unwrap_or_default());
        c.save(&dir, &run.base_name, Some(epoch), metrics_json.clone())?;
        on_event(ClassifyEvent::Saved {
            epoch,
            dir: dir.clone(),
        });
        out.last_checkpoint = Some(dir.clone());
        if best {
            on_event(ClassifyEvent::Best {
                epoch,
                dir: dir.clone(),
                metric: score,
            });
            out.best_checkpoint = Some(dir);
            out.best_metric = score;
            out.best_epoch = Some(epoch);
            since_best = 0;
        } else {
            since_best += 1;
        }
        if let Some(m) = metrics {
            on_event(ClassifyEvent::Evaluated {
                epoch,
                step: out.steps,
                train_loss,
                metrics: m,
                best,
            });
        }
        out.history.push(serde_json::json!({
            "epoch": epoch, "step": out.steps, "train_loss": train_loss, "eval": metrics_json,
        }));
        write_state(&run.output_dir, s, &out)?;
        if out.steps >= total {
            break;
        }
        let patience = s.early_stopping_patience.filter(|&p| p > 0);
        if patience.is_some_and(|p| since_best >= p) {
            on_event(ClassifyEvent::EarlyStopped {
                epoch,
                best_epoch: out.best_epoch.unwrap_or(epoch),
            });
            break;
        }
    }
    write_state(&run.output_dir, s, &out)?;
    Ok(out)
}

fn write_state(dir: &Path, s: &ClassifySettings, out: &Outcome) -> Result<(), String> {
    let state = serde_json::json!({
        "best_model_checkpoint": out.best_checkpoint,
        "best_metric": out.best_metric,
        "metric_for_best_model": s.metric,
        "epochs_run": out.epochs_run,
        "global_step": out.steps,
        "train_seconds": out.train_seconds,
        "log_history": out.history,
        "settings": s,
    });
    let p = dir.join("trainer_state.json");
    std::fs::write(&p, serde_json::to_string_pretty(&state).unwrap_or_default())
        .map_err(|e| format!("{}: {e}", p.display()))
}
