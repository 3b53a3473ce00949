//! Checkpoints and the final output, written atomically.
//!
//! `checkpoint-STEP/` holds a complete PEFT adapter (`adapter_config.json` +
//! `adapter_model.safetensors`; for `full`/`freeze` runs the trained base weights in
//! `trainable.safetensors`), the AdamW moments (`optimizer.safetensors`), the
//! `trainer_state.json` (step, loss history, evaluations, the data fingerprint) and
//! `loraloop_adapter.json` (hashes of the base model, tokenizer and chat template the
//! weights belong to). It is written under a `.tmp-` name and renamed into place only when
//! every file is on disk, so a crash or a full disk never leaves a half-written folder
//! that looks complete, and the previous checkpoint stays as it was.

use crate::config::{Method, TrainConfig};
use crate::error::TrainError;
use crate::events::{Ending, EvalMetrics};
use crate::optim::AdamW;
use crate::trainable::{LORA_DTYPE, Trainable, base_param_trains};
use candle_core::{DType, Device, Tensor};
use loraloop_model::engine::LoadedModel;
use loraloop_model::export::hf_config;
use loraloop_model::lora::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PeftConfig, read_peft_dir};
use loraloop_model::train::{DenseLlama, LoraParams};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const METADATA_FILE: &str = "loraloop_adapter.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalEntry {
    pub step: usize,
    #[serde(flatten)]
    pub metrics: EvalMetrics,
}

/// `trainer_state.json`: where the run is and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub config: TrainConfig,
    pub data_hash: String,
    pub base_model_hash: String,
    /// AdamW's update count.
    pub optimizer_steps: u64,
    /// Tokens trained on up to `global_step`, across resumes (0 in older checkpoints).
    #[serde(default)]
    pub trained_tokens: usize,
    pub log_history: Vec<LogEntry>,
    pub eval_history: Vec<EvalEntry>,
    pub best_eval_loss: Option<f64>,
    pub evals_without_improvement: usize,
    pub last_checkpoint: Option<String>,
    pub final_loss: Option<f64>,
    pub final_eval: Option<EvalMetrics>,
    pub ending: Option<Ending>,
}

impl TrainerState {
    pub fn new(c: &TrainConfig, total: usize, data_hash: String, base_model_hash: String) -> Self {
        Self {
            global_step: 0,
            total_steps: total,
            epoch: 0.0,
            config: c.clone(),
            data_hash,
            base_model_hash,
            optimizer_steps: 0,
            trained_tokens: 0,
            log_history: Vec::new(),
            eval_history: Vec::new(),
            best_eval_loss: None,
            evals_without_improvement: 0,
            last_checkpoint: None,
            final_loss: None,
            final_eval: None,
            ending: None,
        }
    }
}

/// `loraloop_adapter.json`: what the weights were trained against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMetadata {
    pub method: Method,
    pub base_model: String,
    pub base_model_hash: String,
    pub tokenizer_hash: String,
    pub chat_template_hash: String,
    pub step: usize,
    pub final_loss: Option<f64>,
    pub eval: Option<EvalMetrics>,
}

impl AdapterMetadata {
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.join(METADATA_FILE))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// A run's scratch in its output folder: a folder being written (`.tmp-NAME`) or one being
/// replaced (`.old-NAME`), both of names a run gives. What a killed write leaves.
pub fn is_scratch_name(name: &str) -> bool {
    [".tmp-", ".old-"].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|n| n == FINAL_STAGING || is_checkpoint_name(n))
    })
}

/// The step of a checkpoint folder named `checkpoint-STEP`, or `.old-checkpoint-STEP` (a
/// checkpoint that a kill caught while a copy of it replaced it; see
/// [`write_dir_atomically`]), with whether it is the latter.
pub fn checkpoint_step(name: &str) -> Option<(usize, bool)> {
    let (name, old) = match name.strip_prefix(".old-") {
        Some(n) => (n, true),
        None => (name, false),
    };
    if !is_checkpoint_name(name) {
        return None;
    }
    let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
    Some((step, old))
}

/// The files and folders a run writes into its output folder that exist now.
pub fn run_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = is_checkpoint_name(&name)
            || is_scratch_name(&name)
            || [
                ADAPTER_CONFIG_FILE,
                ADAPTER_WEIGHTS_FILE,
                TRAINER_STATE_FILE,
                METADATA_FILE,
                "model.safetensors",
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ]
            .contains(&name.as_str());
        if ours {
            out.push(path);
        }
    }
    Ok(out)
}

/// `checkpoint-STEP`: a name only a run gives a folder (a user's `checkpoint-old/` is not
/// one, and `--overwrite` leaves it).
fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|step| !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()))
}

/// The final files are written in `.tmp-` + this, then moved into the output folder; a
/// user's own `final/` there is left alone.
const FINAL_STAGING: &str = "final";

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Write `bytes` to `path` and flush them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>, TrainError> {
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::serialize(data.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| TrainError::Invalid(format!("serializing tensors: {e}")))
}

fn json_bytes(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("plain data serializes")
}

/// The run's scratch folder `.tmp-NAME` beside `dest`, fresh (a crashed run's leftover
/// removed) and filled through `fill`; removed again when `fill` fails.
fn fill_scratch_dir(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Fill a fresh folder through `fill`, then rename it to `dest`. An older `dest` steps
/// aside to `.old-NAME` until the new one is in place and is removed after, so a kill at
/// any moment leaves a complete folder to resume from (a resumed run saves again the
/// checkpoint it started from; removing it first left none between the two steps).
fn write_dir_atomically(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let tmp = fill_scratch_dir(dest, fill)?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let aside = parent.join(format!(".old-{name}"));
    if dest.exists() {
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, e))?;
        }
        std::fs::rename(dest, &aside).map_err(|e| io_err(dest, e))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| io_err(dest, e))?;
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, e))?;
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Where and how a run writes its weights.
pub(crate) struct SaveCtx<'a> {
    pub output_dir: &'a Path,
    pub peft_config: Option<PeftConfig>,
    pub model: &'a LoadedModel,
    pub base_model_hash: &'a str,
}

impl SaveCtx<'_> {
    fn metadata(&self, state: &TrainerState) -> AdapterMetadata {
        let base_model = self
            .peft_config
            .as_ref()
            .and_then(|p| p.base_model_name_or_path.clone())
            .unwrap_or_else(|| self.model.name());
        AdapterMetadata {
            method: state.config.method,
            base_model,
            base_model_hash: self.base_model_hash.to_string(),
            tokenizer_hash: self.model.tokenizer.fingerprint(),
            chat_template_hash: self.model.template.fingerprint(),
            step: state.global_step,
            final_loss: state.final_loss,
            eval: state.final_eval,
        }
    }

    fn write_weights(
        &self,
        dir: &Path,
        tr: &Trainable,
        full_model: bool,
    ) -> Result<(), TrainError> {
        match (&tr.lora, &self.peft_config) {
            (Some(lora), Some(cfg)) => {
                write_synced(&dir.join(ADAPTER_CONFIG_FILE), &json_bytes(cfg))?;
                write_synced(
                    &dir.join(ADAPTER_WEIGHTS_FILE),
                    &safetensors_bytes(&lora.to_tensors()?)?,
                )?;
            }
            _ => {
                let n_layers = tr.model.blocks.len();
                let tensors: HashMap<String, Tensor> = tr
                    .model
                    .named_params()
                    .into_iter()
                    .filter(|(n, _)| full_model || base_param_trains(n, &tr.base, n_layers))
                    .map(|(n, t)| (n, t.clone()))
                    .collect();
                let file = if full_model {
                    "model.safetensors"
                } else {
                    TRAINABLE_FILE
                };
                write_synced(&dir.join(file), &safetensors_bytes(&tensors)?)?;
            }
        }
        Ok(())
    }

    /// Write `checkpoint-STEP/`; returns its path.
    pub fn save_checkpoint(
        &self,
        tr: &Trainable,
        opt: &AdamW,
        state: &TrainerState,
    ) -> Result<PathBuf, TrainError> {
        let dest = self
            .output_dir
            .join(format!("checkpoint-{}", state.global_step));
        let mut state = state.clone();
        state.optimizer_steps = opt.t;
        write_dir_atomically(&dest, |dir| {
            self.write_weights(dir, tr, false)?;
            let mut moments = HashMap::new();
            for (k, v) in &opt.m {
                moments.insert(format!("m::{k}"), v.clone());
            }
            for (k, v) in &opt.v {
                moments.insert(format!("v::{k}"), v.clone());
            }
            write_synced(&dir.join(OPTIMIZER_FILE), &safetensors_bytes(&moments)?)?;
            write_synced(
                &dir.join(METADATA_FILE),
                &json_bytes(&self.metadata(&state)),
            )?;
            // Last: its presence marks the folder as complete.
            write_synced(&dir.join(TRAINER_STATE_FILE), &json_bytes(&state))
        })?;
        Ok(dest)
    }

    /// The final weights in the output folder itself: a PEFT adapter (lora), or a
    /// Hugging Face model folder (full / freeze) that `loraloop chat --model` loads.
    pub fn save_final(&self, tr: &Trainable, state: &TrainerState) -> Result<(), TrainError> {
        let files = |dir: &Path| -> Result<(), TrainError> {
            self.write_weights(dir, tr, true)?;
            if tr.lora.is_none() {
                write_synced(
                    &dir.join("config.json"),
                    &json_bytes(&hf_config(&tr.model.config, DType::F32)),
                )?;
                let tok = dir.join("tokenizer.json");
                self.model
                    .tokenizer
                    .inner()
                    .save(&tok, false)
                    .map_err(|e| io_err(&tok, e))?;
                let tc = serde_json::json!({
                    "chat_template": self.model.template.source(),
                    "bos_token": self.model.tokenizer.bos_str(),
                    "eos_token": self.model.tokenizer.eos_str(),
                });
                write_synced(&dir.join("tokenizer_config.json"), &json_bytes(&tc))?;
            }
            write_synced(&dir.join(METADATA_FILE), &json_bytes(&self.metadata(state)))?;
            write_synced(&dir.join(TRAINER_STATE_FILE), &json_bytes(state))
        };
        let staging = fill_scratch_dir(&self.output_dir.join(FINAL_STAGING), files)?;
        // Move each file into the output folder (renames within one filesystem).
        for entry in std::fs::read_dir(&staging).map_err(|e| io_err(&staging, e))? {
            let from = entry.map_err(|e| io_err(&staging, e))?.path();
            let to = self.output_dir.join(from.file_name().unwrap_or_default());
            std::fs::rename(&from, &to).map_err(|e| io_err(&to, e))?;
        }
        std::fs::remove_dir(&staging).map_err(|e| io_err(&staging, e))
    }
}

/// A checkpoint folder read back.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
}

impl Checkpoint {
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{} is not a complete checkpoint ({}: {e})",
                dir.display(),
                TRAINER_STATE_FILE
            )
        })?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
        })
    }

    pub fn lora_params(&self, model: &DenseLlama) -> Result<LoraParams, TrainError> {
        let (cfg, tensors): (PeftConfig, _) = read_peft_dir(&self.dir, &model.device)?;
        Ok(LoraParams::from_tensors(
            cfg,
            &tensors,
            &model.config,
            LORA_DTYPE,
        )?)
    }

    pub fn restore_base(&self, model: &mut DenseLlama) -> Result<(), TrainError> {
        let path = self.dir.join(TRAINABLE_FILE);
        let tensors =
            candle_core::safetensors::load(&path, &model.device).map_err(|e| io_err(&path, e))?;
        let dtype = model.dtype;
        for (name, t) in tensors {
            let p = model.param_mut(&name).ok_or_else(|| {
                TrainError::Invalid(format!("checkpoint has unknown tensor {name}"))
            })?;
            *p = t.to_dtype(dtype)?;
        }
        Ok(())
    }

    pub fn restore_optimizer(&self, opt: &mut AdamW, device: &Device) -> Result<(), TrainError> {
        let path = self.dir.join(OPTIMIZER_FILE);
        let tensors =
            candle_core::safetensors::load(&path, device).map_err(|e| io_err(&path, e))?;
        for (k, v) in tensors {
            if let Some(name) = k.strip_prefix("m::") {
                opt.m.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix("v::") {
                opt.v.insert(name.to_string(), v);
            }
        }
        opt.t = self.state.optimizer_steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_run_writes_are_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in [
            "checkpoint-12",
            "checkpoint-old",
            "final",
            ".tmp-final",
            ".tmp-mine",
        ] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        for file in [ADAPTER_CONFIG_FILE, "notes.txt"] {
            std::fs::write(tmp.path().join(file), "x").unwrap();
        }
        let mut ours: Vec<String> = run_files(tmp.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        ours.sort();
        assert_eq!(ours, [".tmp-final", ADAPTER_CONFIG_FILE, "checkpoint-12"]);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_folder_intact_and_no_partial_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("checkpoint-4");
        write_dir_atomically(&dest, |d| write_synced(&d.join("a"), b"old")).unwrap();
        // A write that fails half way (as on a full disk): one file written, then an error.
        let err = write_dir_atomically(&dest, |d| {
            write_synced(&d.join("a"), b"new")?;
            Err(io_err(
                &d.join("b"),
                "No space left on device (os error 28)",
            ))
        })
        .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            ["checkpoint-4"],
            "no half-written folder left behind"
        );
    }

    #[test]
    fn a_folder_without_trainer_state_is_not_a_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("adapter_config.json"), "{}").unwrap();
        let err = Checkpoint::load(tmp.path()).unwrap_err();
        assert!(err.contains("is not a complete checkpoint"), "{err}");
    }

    #[test]
    fn checkpoint_names_and_scratch_are_told_apart() {
        assert_eq!(checkpoint_step("checkpoint-12"), Some((12, false)));
        assert_eq!(checkpoint_step(".old-checkpoint-12"), Some((12, true)));
        for other in [
            "checkpoint-old",
            ".tmp-checkpoint-12",
            "checkpoint-",
            "final",
        ] {
            assert_eq!(checkpoint_step(other), None, "{other}");
        }
        for scratch in [
            ".tmp-checkpoint-3",
            ".old-checkpoint-3",
            ".tmp-final",
            ".old-final",
        ] {
            assert!(is_scratch_name(scratch), "{scratch}");
        }
        for kept in ["checkpoint-3", ".tmp-notes", ".old-checkpoint-old", "final"] {
            assert!(!is_scratch_name(kept), "{kept}");
        }
    }

    #[test]
    fn a_replaced_folder_leaves_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("checkpoint-4");
        write_dir_atomically(&dest, |d| write_synced(&d.join("a"), b"old")).unwrap();
        write_dir_atomically(&dest, |d| write_synced(&d.join("a"), b"new")).unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["checkpoint-4"]);
    }
}
