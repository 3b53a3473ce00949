//! Hugging Face PEFT's on-disk adapter format: `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules`, `use_rslora`, ...) and `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.
//! lora_{A,B}.weight`, A as `[r, in]` and B as `[out, r]`.

use crate::llama::config::{LlamaConfig, Projection};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("adapter does not fit the base model: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The subset of PEFT's `LoraConfig` that changes the computation, plus what PEFT needs
/// to load our adapters (`peft_type`, `task_type`, ...). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT accepts a list of module names or one string (a regex, or `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl PeftConfig {
    pub fn new(r: usize, lora_alpha: f64, targets: &[Projection]) -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(
                targets.iter().map(|p| p.hf_name().to_string()).collect(),
            ),
            use_rslora: false,
            fan_in_fan_out: false,
            bias: default_bias(),
            base_model_name_or_path: None,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            inference_mode: true,
        }
    }

    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The projections this config targets.
    pub fn targets(&self) -> Result<BTreeSet<Projection>, AdapterError> {
        match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => Ok(Projection::ALL.into_iter().collect()),
            TargetModules::One(s) => {
                // A regex in PEFT; we accept the common `.*(q_proj|v_proj)` shape by name match.
                let found: BTreeSet<_> = Projection::ALL
                    .into_iter()
                    .filter(|p| s.contains(p.hf_name()))
                    .collect();
                if found.is_empty() {
                    return Err(AdapterError::Config(format!(
                        "target_modules {s:?} names none of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    )));
                }
                Ok(found)
            }
            TargetModules::List(names) => names
                .iter()
                .map(|n| {
                    let short = n.rsplit('.').next().unwrap_or(n);
                    Projection::from_hf_name(short).ok_or_else(|| {
                        AdapterError::Mismatch(format!(
                            "unknown target module {n:?}; a llama model has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                        ))
                    })
                })
                .collect(),
        }
    }

    pub(crate) fn check(&self) -> Result<(), AdapterError> {
        if !self.peft_type.eq_ignore_ascii_case("LORA") {
            return Err(AdapterError::Config(format!(
                "peft_type {:?} is not LORA",
                self.peft_type
            )));
        }
        if self.r == 0 || self.r > MAX_RANK {
            return Err(AdapterError::Config(format!(
                "r must be from 1 to {MAX_RANK}, got {}",
                self.r
            )));
        }
        let scale = self.scale();
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0 && scale <= MAX_SCALE) {
            return Err(AdapterError::Config(format!(
                "lora_alpha {} is out of range: it must be greater than 0 with lora_alpha / r at most {MAX_SCALE} (got {scale})",
                self.lora_alpha
            )));
        }
        if self.fan_in_fan_out {
            return Err(AdapterError::Config(
                "fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to llama models".into(),
            ));
        }
        if self.bias != "none" {
            return Err(AdapterError::Config(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            )));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(AdapterError::Config(
                "rank_pattern / alpha_pattern are not supported yet".into(),
            ));
        }
        Ok(())
    }
}

/// The largest rank an adapter may have (PEFT's own adapters go to a few hundred).
pub const MAX_RANK: usize = 4096;
/// The largest `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) an adapter may scale its
/// update by: trained adapters sit near 1-4; far beyond, a bad file, not a model.
pub const MAX_SCALE: f64 = 256.0;
/// The largest magnitude a LoRA weight may have (trained ones stay far below 1).
pub const MAX_WEIGHT: f32 = 1e4;

/// `(layer, projection, 'A' | 'B')` from a PEFT tensor name.
pub(crate) fn parse_peft_name(key: &str) -> Result<(usize, Projection, char), AdapterError> {
    let unknown = || {
        AdapterError::Mismatch(format!(
            "unexpected tensor {key:?}; expected names like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ))
    };
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = rest.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let parts: Vec<&str> = rest.split('.').collect();
    // [layer, parent, module, lora_X, (adapter name,)? weight]
    let (layer, parent, module, which) = match parts.as_slice() {
        [l, p, m, w, "weight"] | [l, p, m, w, _, "weight"] => (*l, *p, *m, *w),
        _ => return Err(unknown()),
    };
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let proj = Projection::from_hf_name(module).ok_or_else(unknown)?;
    if proj.hf_parent() != parent {
        return Err(unknown());
    }
    let which = match which {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return Err(unknown()),
    };
    Ok((layer, proj, which))
}

/// Read `adapter_config.json` and `adapter_model.safetensors`.
pub fn read_peft_dir(
    dir: &Path,
    device: &Device,
) -> Result<(PeftConfig, HashMap<String, Tensor>), AdapterError> {
    let read_err = |path: &Path, m: String| AdapterError::Read {
        path: path.display().to_string(),
        message: m,
    };
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| read_err(&cfg_path, e.to_string()))?;
    let config: PeftConfig =
        serde_json::from_str(&text).map_err(|e| AdapterError::Config(e.to_string()))?;
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(read_err(
            &weights,
            "only adapter_model.bin (pickle) is present; save the adapter with safe_serialization=True".into(),
        ));
    }
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| read_err(&weights, e.to_string()))?;
    Ok((config, tensors))
}

/// Write an adapter folder in PEFT's format (A `[r, in]`, B `[out, r]`, Hugging Face row order).
pub fn write_peft_dir(
    dir: &Path,
    config: &PeftConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), AdapterError> {
    let write_err = |m: String| AdapterError::Read {
        path: dir.display().to_string(),
        message: m,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(e.to_string()))?;
    let json = serde_json::to_string_pretty(config).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), json).map_err(|e| write_err(e.to_string()))?;
    candle_core::safetensors::save(tensors, dir.join(ADAPTER_WEIGHTS_FILE))?;
    Ok(())
}

/// Random PEFT-named tensors for `config` on every targeted projection of `model`
/// (A and B ~ N(0, std)): benchmarks and tests.
pub fn random_peft_tensors(
    model: &LlamaConfig,
    config: &PeftConfig,
    std: f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>, AdapterError> {
    let mut out = HashMap::new();
    for p in config.targets()? {
        let (inp, outd) = model.projection_dims(p);
        for layer in 0..model.num_layers {
            out.insert(
                peft_name(layer, p, 'A'),
                Tensor::randn(0f32, std as f32, (config.r, inp), device)?,
            );
            out.insert(
                peft_name(layer, p, 'B'),
                Tensor::randn(0f32, std as f32, (outd, config.r), device)?,
            );
        }
    }
    Ok(out)
}

/// The PEFT tensor name of a projection's A or B.
pub fn peft_name(layer: usize, p: Projection, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        p.hf_parent(),
        p.hf_name()
    )
}
