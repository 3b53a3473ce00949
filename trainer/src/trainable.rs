//! What a run trains: the dense model, its LoRA (if any) and which base weights train.

use crate::config::TrainConfig;
use candle_core::DType;
use loraloop_model::lora::{PeftConfig, TargetModules, read_peft_dir};
use loraloop_model::train::{BaseTrain, DenseLlama, LoraParams};
use std::path::Path;

/// The LoRA weights' dtype, on every device: they and AdamW's state stay f32 whatever
/// the base model's dtype (mixed precision, as PEFT keeps adapter weights in f32).
pub const LORA_DTYPE: DType = DType::F32;

/// The LoRA of the PEFT adapter folder `dir`, to train further on `dense`: the adapter's
/// shape (rank, alpha, targets) and weights, with `lora_dropout` (this run's) instead of
/// the dropout it was trained with.
pub fn read_adapter(
    dir: &Path,
    dense: &DenseLlama,
    lora_dropout: f64,
) -> Result<LoraParams, loraloop_model::lora::AdapterError> {
    let (cfg, tensors) = read_peft_dir(dir, &dense.device)?;
    let mut p = LoraParams::from_tensors(cfg, &tensors, &dense.config, LORA_DTYPE)?;
    p.config.lora_dropout = lora_dropout;
    Ok(p)
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
