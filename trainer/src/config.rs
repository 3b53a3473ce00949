//! Training settings: a YAML file with Axolotl's key names (LLaMA-Factory's for the
//! fine-tuning method), overridden by command-line flags, validated into [`TrainConfig`].

use crate::optim::Scheduler;
pub use loraloop_core::preference::Objective;
use loraloop_model::llama::Projection;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

loraloop_core::keywords! {
    /// Which weights train.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Method ("method") {
        /// LoRA adapters on the target projections; the base stays frozen.
        Lora = "lora",
        /// Every weight (dense models; a quantized base is dequantized).
        Full = "full",
        /// Only the last `freeze_trainable_layers` layers.
        Freeze = "freeze",
    }
}

/// An Axolotl `datasets:` entry (only `path` is used; `type` is accepted for
/// compatibility, every format `data import` reads is detected from the file).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    pub path: PathBuf,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// Every key a training YAML may set; all optional. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    pub base_model: Option<String>,
    pub datasets: Option<Vec<DatasetEntry>>,
    pub output_dir: Option<PathBuf>,
    /// Axolotl: `adapter: lora` (or absent for full fine-tuning when `finetuning_type` is
    /// not set).
    pub adapter: Option<String>,
    /// Axolotl: a LoRA adapter folder to start from instead of a fresh initialisation.
    pub lora_model_dir: Option<PathBuf>,
    /// LLaMA-Factory: `lora`, `full` or `freeze`.
    pub finetuning_type: Option<String>,
    pub freeze_trainable_layers: Option<usize>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub lora_target_modules: Option<Vec<String>>,
    pub lora_target_linear: Option<bool>,
    pub peft_use_rslora: Option<bool>,
    pub sequence_len: Option<usize>,
    pub micro_batch_size: Option<usize>,
    pub gradient_accumulation_steps: Option<usize>,
    pub num_epochs: Option<f64>,
    pub max_steps: Option<usize>,
    pub learning_rate: Option<f64>,
    pub lr_scheduler: Option<String>,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub adam_epsilon: Option<f64>,
    pub optimizer: Option<String>,
    pub val_set_size: Option<f64>,
    pub eval_steps: Option<usize>,
    pub save_steps: Option<usize>,
    pub logging_steps: Option<usize>,
    pub early_stopping_patience: Option<usize>,
    pub gradient_checkpointing: Option<bool>,
    pub sample_packing: Option<bool>,
    pub train_on_inputs: Option<bool>,
    pub seed: Option<u64>,
    /// loraloop: mix the base model's own answers to general prompts into the data.
    pub replay: Option<bool>,
    pub replay_ratio: Option<f64>,
    pub replay_prompts_file: Option<PathBuf>,
    /// loraloop: replayed answers teach the base model's whole next-token distribution
    /// (KL divergence from its top tokens), not only its greedy tokens.
    pub replay_distill: Option<bool>,
    /// loraloop: the loss weight of replayed answers next to the job's own (1: the same).
    pub replay_weight: Option<f64>,
    /// Axolotl: `dpo` or `kto` trains on preferences instead of chat examples.
    pub rl: Option<String>,
    /// Axolotl: DPO's and KTO's β (TRL's default 0.1).
    pub rl_beta: Option<f64>,
    pub kto_desirable_weight: Option<f64>,
    pub kto_undesirable_weight: Option<f64>,
    /// Classifier fine-tunes: text-classification or image-classification (default: from
    /// the model and the data).
    pub task: Option<String>,
    /// Classifier fine-tunes: the held-out metric that picks the best checkpoint.
    pub metric_for_best_model: Option<String>,
    /// Classifier fine-tunes: the side images are cropped to.
    pub image_size: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl TrainFile {
    /// The data file `datasets:` names. One entry only: a run reads one file, and a
    /// second entry silently left out would train on less than the user listed.
    pub fn dataset_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        match self.datasets.as_deref().unwrap_or_default() {
            [] => Ok(None),
            [one] => Ok(Some(one.path.clone())),
            many => Err(ConfigError::Invalid {
                key: "datasets",
                message: format!(
                    "{} files are listed; a run trains on one file: join them (cat a.jsonl b.jsonl > all.jsonl) and list that",
                    many.len()
                ),
            }),
        }
    }
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: format!("{}: {}", e.path(), e.inner()),
        })
    }

    /// Overlay: every key set in `over` replaces the one here.
    pub fn merge(self, over: TrainFile) -> TrainFile {
        macro_rules! pick {
            ($($f:ident),*) => { TrainFile { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            base_model,
            datasets,
            output_dir,
            adapter,
            lora_model_dir,
            finetuning_type,
            freeze_trainable_layers,
            lora_r,
            lora_alpha,
            lora_dropout,
            lora_target_modules,
            lora_target_linear,
            peft_use_rslora,
            sequence_len,
            micro_batch_size,
            gradient_accumulation_steps,
            num_epochs,
            max_steps,
            learning_rate,
            lr_scheduler,
            warmup_steps,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            adam_beta1,
            adam_beta2,
            adam_epsilon,
            optimizer,
            val_set_size,
            eval_steps,
            save_steps,
            logging_steps,
            early_stopping_patience,
            gradient_checkpointing,
            sample_packing,
            train_on_inputs,
            seed,
            replay,
            replay_ratio,
            replay_prompts_file,
            replay_distill,
            replay_weight,
            rl,
            rl_beta,
            kto_desirable_weight,
            kto_undesirable_weight,
            task,
            metric_for_best_model,
            image_size
        )
    }
}

/// Validated training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub freeze_trainable_layers: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Vec<String>,
    pub use_rslora: bool,
    pub sequence_len: usize,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_epochs: f64,
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    pub lr_scheduler: Scheduler,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub val_set_size: f64,
    pub eval_steps: Option<usize>,
    pub save_steps: Option<usize>,
    pub logging_steps: usize,
    pub early_stopping_patience: Option<usize>,
    pub gradient_checkpointing: bool,
    pub sample_packing: bool,
    pub train_on_inputs: bool,
    pub seed: u64,
    pub replay: bool,
    pub replay_ratio: f64,
    pub replay_prompts_file: Option<PathBuf>,
    pub replay_distill: bool,
    pub replay_weight: f64,
    /// What the examples teach: chat replies (SFT) or preferences (DPO, KTO).
    pub objective: Objective,
    pub rl_beta: f64,
    pub kto_desirable_weight: f64,
    pub kto_undesirable_weight: f64,
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn positive(key: &'static str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(invalid(key, format!("must be a positive number, got {v}")))
    }
}

fn non_negative(key: &'static str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(invalid(key, format!("must be zero or more, got {v}")))
    }
}

fn at_least_one(key: &'static str, v: usize) -> Result<usize, ConfigError> {
    if v >= 1 {
        Ok(v)
    } else {
        Err(invalid(key, "must be at least 1"))
    }
}

impl TrainFile {
    /// Apply defaults and check every value.
    pub fn validate(&self) -> Result<TrainConfig, ConfigError> {
        let method = match (&self.finetuning_type, &self.adapter) {
            (Some(t), Some(a)) if t != a => {
                return Err(invalid(
                    "finetuning_type",
                    format!(
                        "{t:?} and adapter {a:?} say different things about what trains; keep one"
                    ),
                ));
            }
            (Some(t), _) => t.parse().map_err(|m| invalid("finetuning_type", m))?,
            (None, Some(a)) if a == "lora" => Method::Lora,
            (None, Some(a)) => {
                return Err(invalid(
                    "adapter",
                    format!(
                        "{a:?} is not supported; use lora (qlora trains a dequantized base here: use lora)"
                    ),
                ));
            }
            (None, None) => Method::Lora,
        };
        let lora_target_modules = match (&self.lora_target_modules, self.lora_target_linear) {
            (_, Some(true)) | (None, _) => Projection::ALL
                .iter()
                .map(|p| p.hf_name().to_string())
                .collect(),
            (Some(list), _) => {
                if list.is_empty() {
                    return Err(invalid(
                        "lora_target_modules",
                        "must name at least one module",
                    ));
                }
                for m in list {
                    if Projection::from_hf_name(m.rsplit('.').next().unwrap_or(m)).is_none() {
                        return Err(invalid(
                            "lora_target_modules",
                            format!(
                                "unknown module {m:?}; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"
                            ),
                        ));
                    }
                }
                list.clone()
            }
        };
        let lora_dropout = self.lora_dropout.unwrap_or(0.05);
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("must be in [0, 1), got {lora_dropout}"),
            ));
        }
        let val_set_size = non_negative("val_set_size", self.val_set_size.unwrap_or(0.1))?;
        if let Some(o) = &self.optimizer
            && !matches!(
                o.as_str(),
                "adamw" | "adamw_torch" | "adamw_torch_fused" | "adamw_hf"
            )
        {
            return Err(invalid(
                "optimizer",
                format!("{o:?} is not supported; loraloop trains with AdamW (adamw_torch)"),
            ));
        }
        let warmup_ratio = non_negative("warmup_ratio", self.warmup_ratio.unwrap_or(0.03))?;
        if warmup_ratio >= 1.0 {
            return Err(invalid("warmup_ratio", "must be below 1"));
        }
        let replay_ratio = non_negative("replay_ratio", self.replay_ratio.unwrap_or(0.3))?;
        if replay_ratio >= 1.0 {
            return Err(invalid(
                "replay_ratio",
                "must be below 1 (the share of replayed examples in the training data)",
            ));
        }
        let beta = |key: &'static str, v: f64| -> Result<f64, ConfigError> {
            if (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(key, format!("must be in [0, 1), got {v}")))
            }
        };
        let objective: Objective = match &self.rl {
            None => Objective::Sft,
            Some(r) => r.parse().map_err(|m| invalid("rl", m))?,
        };
        if objective != Objective::Sft {
            if method != Method::Lora {
                return Err(invalid(
                    "rl",
                    "dpo and kto train LoRA adapters (the base model is their reference, kept once in memory)",
                ));
            }
            if self.sample_packing == Some(true) {
                return Err(invalid(
                    "sample_packing",
                    "dpo and kto do not pack examples",
                ));
            }
        }
        Ok(TrainConfig {
            objective,
            rl_beta: positive("rl_beta", self.rl_beta.unwrap_or(0.1))?,
            kto_desirable_weight: positive(
                "kto_desirable_weight",
                self.kto_desirable_weight.unwrap_or(1.0),
            )?,
            kto_undesirable_weight: positive(
                "kto_undesirable_weight",
                self.kto_undesirable_weight.unwrap_or(1.0),
            )?,
            method,
            freeze_trainable_layers: match (self.freeze_trainable_layers, method) {
                (Some(_), m) if m != Method::Freeze => {
                    return Err(invalid(
                        "freeze_trainable_layers",
                        format!(
                            "trains only the last layers of finetuning_type freeze; this run is {m}"
                        ),
                    ));
                }
                (n, _) => at_least_one("freeze_trainable_layers", n.unwrap_or(2))?,
            },
            lora_r: at_least_one("lora_r", self.lora_r.unwrap_or(16))?,
            lora_alpha: positive("lora_alpha", self.lora_alpha.unwrap_or(32.0))?,
            lora_dropout,
            lora_target_modules,
            use_rslora: self.peft_use_rslora.unwrap_or(false),
            sequence_len: at_least_one("sequence_len", self.sequence_len.unwrap_or(512))?,
            micro_batch_size: at_least_one("micro_batch_size", self.micro_batch_size.unwrap_or(4))?,
            gradient_accumulation_steps: at_least_one(
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps.unwrap_or(1),
            )?,
            num_epochs: positive("num_epochs", self.num_epochs.unwrap_or(3.0))?,
            max_steps: self
                .max_steps
                .map(|s| at_least_one("max_steps", s))
                .transpose()?,
            learning_rate: positive("learning_rate", self.learning_rate.unwrap_or(2e-4))?,
            lr_scheduler: self
                .lr_scheduler
                .as_deref()
                .unwrap_or("cosine")
                .parse()
                .map_err(|m| invalid("lr_scheduler", m))?,
            warmup_steps: self.warmup_steps,
            warmup_ratio,
            weight_decay: non_negative("weight_decay", self.weight_decay.unwrap_or(0.0))?,
            max_grad_norm: non_negative("max_grad_norm", self.max_grad_norm.unwrap_or(1.0))?,
            adam_beta1: beta("adam_beta1", self.adam_beta1.unwrap_or(0.9))?,
            adam_beta2: beta("adam_beta2", self.adam_beta2.unwrap_or(0.999))?,
            adam_epsilon: positive("adam_epsilon", self.adam_epsilon.unwrap_or(1e-8))?,
            val_set_size,
            eval_steps: self
                .eval_steps
                .map(|s| at_least_one("eval_steps", s))
                .transpose()?,
            save_steps: self
                .save_steps
                .map(|s| at_least_one("save_steps", s))
                .transpose()?,
            logging_steps: at_least_one("logging_steps", self.logging_steps.unwrap_or(1))?,
            early_stopping_patience: self
                .early_stopping_patience
                .map(|s| at_least_one("early_stopping_patience", s))
                .transpose()?,
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(false),
            sample_packing: self.sample_packing.unwrap_or(false),
            train_on_inputs: self.train_on_inputs.unwrap_or(false),
            seed: self.seed.unwrap_or(42),
            replay: self.replay.unwrap_or(true),
            replay_ratio,
            replay_prompts_file: self.replay_prompts_file.clone(),
            replay_distill: self.replay_distill.unwrap_or(true),
            replay_weight: positive("replay_weight", self.replay_weight.unwrap_or(1.0))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_names_one_file_and_a_second_is_refused_not_left_out() {
        let one = TrainFile::parse("datasets:\n  - path: a.jsonl\n", "t.yaml").unwrap();
        assert_eq!(one.dataset_path().unwrap(), Some(PathBuf::from("a.jsonl")));
        let none = TrainFile::parse("datasets: []\n", "t.yaml").unwrap();
        assert_eq!(none.dataset_path().unwrap(), None);
        let two = TrainFile::parse(
            "datasets:\n  - path: a.jsonl\n  - path: b.jsonl\n",
            "t.yaml",
        )
        .unwrap();
        let e = two.dataset_path().unwrap_err().to_string();
        assert!(e.starts_with("datasets: 2 files are listed"), "{e}");
    }

    #[test]
    fn axolotl_keys_parse_and_flags_override_the_file() {
        let file = TrainFile::parse(
            "base_model: m.gguf\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj]\nsequence_len: 256\nmicro_batch_size: 2\ngradient_accumulation_steps: 4\nnum_epochs: 2\nlearning_rate: 0.0001\nlr_scheduler: linear\nwarmup_steps: 5\nval_set_size: 0.2\neval_steps: 10\nsave_steps: 20\nearly_stopping_patience: 3\ngradient_checkpointing: true\nsample_packing: true\ntrain_on_inputs: false\nseed: 7\ndatasets:\n  - path: data.jsonl\n    type: chat_template\n",
            "t.yaml",
        )
        .unwrap();
        let cli = TrainFile {
            learning_rate: Some(5e-5),
            ..Default::default()
        };
        let c = file.merge(cli).validate().unwrap();
        assert_eq!(c.learning_rate, 5e-5);
        assert_eq!(c.lora_r, 8);
        assert_eq!(c.lora_target_modules, ["q_proj", "v_proj"]);
        assert_eq!(c.lr_scheduler, Scheduler::Linear);
        assert_eq!((c.micro_batch_size, c.gradient_accumulation_steps), (2, 4));
        assert!(c.gradient_checkpointing && c.sample_packing && !c.train_on_inputs);
        assert_eq!(c.early_stopping_patience, Some(3));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = TrainFile::parse("learning_rate: -1\n", "x")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "learning_rate: must be a positive number, got -1"
        );
        let e = TrainFile::parse("lora_rank: 8\n", "x.yaml").unwrap_err();
        assert!(e.to_string().contains("unknown field `lora_rank`"), "{e}");
        let e = TrainFile::parse("lr_scheduler: onecycle\n", "x")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("lr_scheduler: unknown lr_scheduler"),
            "{e}"
        );
        let e = TrainFile::parse("lora_target_modules: [c_attn]\n", "x")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("c_attn"), "{e}");
        let e = TrainFile::parse("finetuning_type: prefix\n", "x")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("finetuning_type:"), "{e}");
        // Settings that contradict what trains are refused, not dropped.
        for (yaml, key) in [
            ("finetuning_type: full\nadapter: lora\n", "finetuning_type:"),
            (
                "finetuning_type: full\nfreeze_trainable_layers: 3\n",
                "freeze_trainable_layers:",
            ),
            ("freeze_trainable_layers: 3\n", "freeze_trainable_layers:"),
        ] {
            let e = TrainFile::parse(yaml, "x").unwrap().validate().unwrap_err();
            assert!(e.to_string().starts_with(key), "{yaml}: {e}");
        }
        for yaml in [
            "finetuning_type: freeze\nfreeze_trainable_layers: 3\n",
            "finetuning_type: lora\nadapter: lora\n",
        ] {
            assert!(
                TrainFile::parse(yaml, "x").unwrap().validate().is_ok(),
                "{yaml}"
            );
        }
    }
}
