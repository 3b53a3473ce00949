//! A classifier fine-tune's settings, validated from the same training YAML keys and
//! command-line flags as an LLM fine-tune (`num_epochs`, `micro_batch_size`,
//! `learning_rate`, `finetuning_type`, `lora_r`, ...) plus `task`,
//! `metric_for_best_model` and `image_size`.

use crate::config::{ConfigError, TrainFile};
use crate::optim::Scheduler;
use loraloop_model::classify::lora::LoraSpec;
use loraloop_model::classify::{Method, Task};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ClassifySettings {
    pub method: Method,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// A fraction (below 1) or a count of examples held out when no separate evaluation
    /// data is given.
    pub val_set_size: f64,
    pub early_stopping_patience: Option<usize>,
    /// The metric that picks the best checkpoint and drives early stopping.
    pub metric: String,
    pub seed: u64,
    /// Tokens per text (default: the checkpoint's, else 128).
    pub max_length: Option<usize>,
    /// Side of the square images are cropped to.
    pub image_size: u32,
    /// Recompute each encoder layer's or residual block's activations in the backward
    /// pass instead of keeping them: less memory, about a third more compute.
    pub gradient_checkpointing: bool,
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

const METRICS: [&str; 5] = [
    "accuracy",
    "macro_f1",
    "loss",
    "macro_precision",
    "macro_recall",
];

impl ClassifySettings {
    pub fn from_file(f: &TrainFile, task: Task) -> Result<Self, ConfigError> {
        let method = match f.finetuning_type.as_deref().unwrap_or("full") {
            "full" => Method::Full,
            "freeze" => Method::Freeze {
                layers: f.freeze_trainable_layers.unwrap_or(0),
            },
            "lora" => {
                let r = f.lora_r.unwrap_or(8);
                if r == 0 {
                    return Err(invalid("lora_r", "must be at least 1"));
                }
                let dropout = f.lora_dropout.unwrap_or(0.1);
                if !(0.0..1.0).contains(&dropout) {
                    return Err(invalid("lora_dropout", "must be in [0, 1)"));
                }
                Method::Lora(LoraSpec {
                    r,
                    alpha: f.lora_alpha.unwrap_or(2.0 * r as f64),
                    dropout,
                })
            }
            other => {
                return Err(invalid(
                    "finetuning_type",
                    format!("unknown method {other:?}; expected full, freeze or lora"),
                ));
            }
        };
        let epochs = f.num_epochs.unwrap_or(3.0);
        if !(epochs.is_finite() && epochs > 0.0 && epochs <= 10_000.0) {
            return Err(invalid("num_epochs", "must be above 0"));
        }
        let batch_size =
            f.micro_batch_size.unwrap_or(16) * f.gradient_accumulation_steps.unwrap_or(1);
        if batch_size == 0 {
            return Err(invalid("micro_batch_size", "must be at least 1"));
        }
        // Defaults that fine-tune well: small steps when every weight moves, larger ones
        // for a fresh head alone or LoRA factors.
        let default_lr = match (method, task) {
            (Method::Full, Task::TextClassification) => 5e-5,
            (Method::Full, Task::ImageClassification) => 1e-4,
            (Method::Freeze { .. }, _) => 1e-3,
            (Method::Lora(_), _) => 5e-4,
        };
        let learning_rate = f.learning_rate.unwrap_or(default_lr);
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(invalid("learning_rate", "must be above 0"));
        }
        let scheduler = f
            .lr_scheduler
            .as_deref()
            .unwrap_or("linear")
            .parse()
            .map_err(|e: String| invalid("lr_scheduler", e))?;
        let warmup_ratio = f.warmup_ratio.unwrap_or(0.0);
        if !(0.0..1.0).contains(&warmup_ratio) {
            return Err(invalid("warmup_ratio", "must be in [0, 1)"));
        }
        let val_set_size = f.val_set_size.unwrap_or(0.1);
        if !(val_set_size >= 0.0 && val_set_size.is_finite()) {
            return Err(invalid("val_set_size", "must be 0 or more"));
        }
        let metric = f
            .metric_for_best_model
            .clone()
            .unwrap_or_else(|| "accuracy".into());
        let known = METRICS.contains(&metric.as_str())
            || ["f1:", "precision:", "recall:"]
                .iter()
                .any(|p| metric.starts_with(p));
        if !known {
            return Err(invalid(
                "metric_for_best_model",
                format!(
                    "unknown metric {metric:?}; expected one of {METRICS:?} or f1:LABEL, precision:LABEL, recall:LABEL"
                ),
            ));
        }
        let image_size = f.image_size.unwrap_or(224);
        if !(8..=1024).contains(&image_size) {
            return Err(invalid("image_size", "must be between 8 and 1024"));
        }
        Ok(Self {
            method,
            epochs: epochs.ceil() as usize,
            max_steps: f.max_steps,
            batch_size,
            learning_rate,
            scheduler,
            warmup_steps: f.warmup_steps,
            warmup_ratio,
            weight_decay: f.weight_decay.unwrap_or(0.01),
            max_grad_norm: f.max_grad_norm.unwrap_or(1.0),
            val_set_size,
            early_stopping_patience: f.early_stopping_patience,
            metric,
            seed: f.seed.unwrap_or(42),
            max_length: f.sequence_len,
            image_size: image_size as u32,
            gradient_checkpointing: f.gradient_checkpointing.unwrap_or(false),
        })
    }
}
