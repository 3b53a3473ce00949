//! Adapters and fine-tuned models for other runtimes: a LoRA adapter as a GGUF file in
//! llama.cpp's adapter layout (`llama-cli --lora`, Ollama's `ADAPTER`), the model with the
//! adapter merged in as a GGUF (F16, Q8_0 or Q4_1; the base's tokenizer and chat template
//! carried over; a Hugging Face base is written by [`from_folder`]), and an Ollama
//! Modelfile for either.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` for llama-architecture
//! GGUF files (see [`crate::lora::permute_for_interleaved_rope`]); an adapter loaded for a
//! llama GGUF base already has its `B` in that order, one loaded for a Hugging Face folder
//! is permuted here, so the file fits a GGUF of that base either way.

use crate::llama::config::{LlamaConfig, Projection, RopeLayout};
use crate::lora::{LoraAdapter, permute_for_interleaved_rope};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

mod from_folder;
pub use from_folder::write_merged_gguf_from_model;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The caller no longer wants the file (a download whose client left).
    #[error("the export was cancelled")]
    Cancelled,
}

/// The weight type of an exported GGUF model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Q8_0,
    Q4_1,
}

impl GgufType {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_1" => Ok(Self::Q4_1),
            other => Err(format!(
                "unknown GGUF type {other:?}: use f16, q8_0 or q4_1"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_1 => "q4_1",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_1 => GgmlDType::Q4_1,
        }
    }

    /// What a tensor of `dims` is stored as: vectors in f32, a matrix in this type, or in
    /// f16 when its rows do not split into this type's blocks.
    fn for_tensor(self, dims: &[usize]) -> GgmlDType {
        match dims {
            [] | [_] => GgmlDType::F32,
            [.., cols] if cols % self.ggml().block_size() == 0 => self.ggml(),
            _ => GgmlDType::F16,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
        }
    }
}

/// Whether llama.cpp's GGUF files of this architecture hold q/k in the permuted row order.
fn gguf_permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

/// `scale * B` of `adapter` in the row order of a GGUF file of `base`'s architecture.
fn gguf_pairs(
    adapter: &LoraAdapter,
    base: &LlamaConfig,
) -> Result<Vec<(usize, Projection, Tensor, Tensor)>, ExportError> {
    let permuted_already = base.rope_layout == RopeLayout::Interleaved;
    let want_permuted = gguf_permutes_qk(&base.architecture);
    let mut pairs = adapter.scaled_pairs()?;
    if want_permuted && !permuted_already {
        for (_, p, _, b) in pairs.iter_mut() {
            *b = match p {
                Projection::Q => permute_for_interleaved_rope(b, base.num_heads)?,
                Projection::K => permute_for_interleaved_rope(b, base.num_kv_heads)?,
                _ => b.clone(),
            };
        }
    }
    Ok(pairs)
}

/// Write a GGUF file at `path` under a temporary name beside it, then rename it there: an
/// export stopped half-way (killed, out of disk) leaves no truncated file under the final
/// name, and an earlier export at that name stays whole until the new one is complete.
/// A failed write removes its temporary file; a kill leaves `.NAME.partial*` behind.
fn write_gguf_file(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), ExportError> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| write_err(path, e))?;
            dir
        }
        None => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.partial");
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(dir)
        .map_err(|e| write_err(path, e))?;
    // Held until the file is renamed or gone, so that a later export can tell a killed
    // export's leftover from a live one's file.
    tmp.as_file().lock().map_err(|e| write_err(path, e))?;
    remove_abandoned(dir, &prefix, tmp.path());
    let mut w = BufWriter::new(tmp);
    write_gguf(&mut w, metadata, tensors)?;
    let tmp = w.into_inner().map_err(|e| write_err(path, e.error()))?;
    tmp.as_file().sync_all().map_err(|e| write_err(path, e))?;
    crate::fetch::set_readable(tmp.as_file()).map_err(|e| write_err(path, e))?;
    tmp.persist(path).map_err(|e| write_err(path, e.error))?;
    Ok(())
}

/// Removes the files named `prefix*` in `dir` that no process holds a lock on: what killed
/// exports left (each a partial model, hundreds of MB). Best effort.
fn remove_abandoned(dir: &Path, prefix: &str, own: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let p = entry.path();
        if p == own || !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let unlocked = std::fs::File::open(&p).is_ok_and(|f| f.try_lock().is_ok());
        if unlocked {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Write `adapter` (loaded for `base`) as a llama.cpp LoRA GGUF: `general.type = adapter`,
/// `adapter.type = lora`, tensors `blk.N.<proj>.weight.lora_a` (`[r, in]`) and `.lora_b`
/// (`[out, r]`), f32. `B` is stored already scaled, with `adapter.lora.alpha = r`, so
/// llama.cpp's `alpha / r` is 1 and the delta is exactly PEFT's (`--lora-scaled S` still
/// scales it by S).
pub fn write_gguf_lora(
    adapter: &LoraAdapter,
    base: &LlamaConfig,
    path: &Path,
) -> Result<(), ExportError> {
    let pairs = gguf_pairs(adapter, base)?;
    let mut tensors = Vec::with_capacity(pairs.len() * 2);
    for (layer, p, a, b) in &pairs {
        let stem = format!("blk.{layer}.{}.weight", p.gguf_name());
        tensors.push((
            format!("{stem}.lora_a"),
            QTensor::quantize(&a.to_dtype(DType::F32)?, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{stem}.lora_b"),
            QTensor::quantize(&b.to_dtype(DType::F32)?, GgmlDType::F32)?,
        ));
    }
    let r = adapter.config.r as f32;
    let metadata = [
        (
            "general.architecture",
            Value::String(base.architecture.clone()),
        ),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String(adapter.name.clone())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(r)),
    ];
    write_gguf_file(path, &metadata, &tensors)
}

fn write_gguf<W: Write + Seek>(
    w: &mut W,
    metadata: &[(&str, Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), ExportError> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(w, &md, &ts)?;
    Ok(())
}

/// Write the GGUF model at `base_path` with `adapter` merged into its weights
/// (`W + scale * B A`; None: the base alone, in another type), every matrix in `ty` (a matrix whose rows do not split into the
/// type's blocks stays f16), vectors in f32. Metadata (tokenizer, chat template,
/// hyperparameters) is copied; `general.file_type` and `general.name` are set. A base that
/// is a Hugging Face folder gets its metadata written ([`write_merged_gguf_from_model`]).
pub fn write_merged_gguf(
    base_path: &Path,
    adapter: Option<&LoraAdapter>,
    base: &LlamaConfig,
    ty: GgufType,
    name: &str,
    path: &Path,
) -> Result<(), ExportError> {
    write_merged_gguf_until(
        base_path,
        adapter,
        base,
        ty,
        name,
        path,
        &AtomicBool::new(false),
    )
}

/// [`write_merged_gguf`] that gives up between tensors once `cancel` is set.
fn write_merged_gguf_until(
    base_path: &Path,
    adapter: Option<&LoraAdapter>,
    base: &LlamaConfig,
    ty: GgufType,
    name: &str,
    path: &Path,
    cancel: &AtomicBool,
) -> Result<(), ExportError> {
    let read_err = |e: &dyn std::fmt::Display| ExportError::Read {
        path: base_path.display().to_string(),
        message: e.to_string(),
    };
    if base_path.is_dir() {
        let model =
            crate::engine::LoadedModel::load(base_path, &Device::Cpu).map_err(|e| read_err(&e))?;
        return write_merged_gguf_from_model(&model, adapter, ty, name, path);
    }
    let file = std::fs::File::open(base_path).map_err(|e| read_err(&e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| read_err(&e))?;
    let pairs = match adapter {
        Some(a) => gguf_pairs(a, base)?,
        None => Vec::new(),
    };
    let deltas: HashMap<String, (Tensor, Tensor)> = pairs
        .into_iter()
        .map(|(layer, p, a, b)| (format!("blk.{layer}.{}.weight", p.gguf_name()), (a, b)))
        .collect();
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        if cancel.load(Ordering::Relaxed) {
            return Err(ExportError::Cancelled);
        }
        let q = content.tensor(&mut reader, name, &cpu)?;
        let dims = q.shape().dims().to_vec();
        let mut w = q.dequantize(&cpu)?;
        if let Some((a, b)) = deltas.get(name.as_str()) {
            let delta = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
            w = (w + delta)?;
        }
        tensors.push((name.clone(), QTensor::quantize(&w, ty.for_tensor(&dims))?));
    }
    let mut metadata: Vec<(&str, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.file_type" | "general.alignment" | "general.name"
            )
        })
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    metadata.push(("general.file_type", Value::U32(ty.file_type())));
    metadata.push(("general.name", Value::String(name.to_string())));
    write_gguf_file(path, &metadata, &tensors)
}

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// The adapter as a llama.cpp LoRA GGUF.
    Lora,
    /// The base with the adapter merged in, as a GGUF of this type.
    Merged(GgufType),
}

/// Load the PEFT adapter in `adapter_dir` for the base described by `cfg` (on the CPU)
/// and write `what` to `out`, naming the adapter or merged model `name`. A merge gives up
/// with [`ExportError::Cancelled`] between tensors once `cancel` is set.
pub fn export_adapter(
    adapter_dir: &Path,
    base_path: &Path,
    cfg: &LlamaConfig,
    what: Export,
    name: &str,
    out: &Path,
    cancel: &AtomicBool,
) -> Result<(), ExportError> {
    let mut adapter =
        LoraAdapter::load(adapter_dir, cfg, &Device::Cpu).map_err(|e| ExportError::Read {
            path: adapter_dir.display().to_string(),
            message: e.to_string(),
        })?;
    adapter.name = name.to_string();
    match what {
        Export::Lora => write_gguf_lora(&adapter, cfg, out),
        Export::Merged(ty) => {
            write_merged_gguf_until(base_path, Some(&adapter), cfg, ty, name, out, cancel)
        }
    }
}

/// An Ollama Modelfile: `FROM` the model file, `ADAPTER` the LoRA GGUF when there is one,
/// the system prompt. (The chat template travels in the GGUF's metadata.)
pub fn modelfile(from: &str, adapter: Option<&str>, system_prompt: &str) -> String {
    let mut m = format!("FROM {from}\n");
    if let Some(a) = adapter {
        m.push_str(&format!("ADAPTER {a}\n"));
    }
    if !system_prompt.trim().is_empty() {
        m.push_str(&format!(
            "SYSTEM \"\"\"{}\"\"\"\n",
            system_prompt.replace("\"\"\"", "\" \" \"")
        ));
    }
    m
}

/// The Hugging Face `config.json` of a model with `cfg`'s hyperparameters and its
/// tokenizer's BOS and EOS ids.
pub fn hf_config_json(
    cfg: &LlamaConfig,
    tokenizer: &crate::tokenizer::Tokenizer,
    dtype: DType,
) -> serde_json::Value {
    let mut c = hf_config(cfg, dtype);
    c["bos_token_id"] = serde_json::json!(tokenizer.bos_token().map(|t| t.0));
    c["eos_token_id"] = serde_json::json!(tokenizer.eos_token().map(|t| t.0));
    c
}

/// The Hugging Face `config.json` of a model with `cfg`'s hyperparameters, its weights
/// stored as `dtype` (f16, else f32).
pub fn hf_config(cfg: &LlamaConfig, dtype: DType) -> serde_json::Value {
    let (architecture, model_type) = match cfg.architecture.as_str() {
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "mistral" => ("MistralForCausalLM", "mistral"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let mut c = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu",
        "torch_dtype": if dtype == DType::F16 { "float16" } else { "float32" },
    });
    if let Some(s) = &cfg.rope_scaling {
        c["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    c
}

/// Write `model` with `adapter` merged in (None: the model alone) as a Hugging Face
/// folder: `config.json`, `model.safetensors` (f16 or f32, Hugging Face row order),
/// `tokenizer.json` and `tokenizer_config.json` with the chat template.
pub fn write_merged_hf(
    model: &crate::engine::LoadedModel,
    adapter: Option<&LoraAdapter>,
    dtype: DType,
    dir: &Path,
) -> Result<(), ExportError> {
    if !matches!(dtype, DType::F16 | DType::F32) {
        return Err(ExportError::Unsupported(format!(
            "a Hugging Face folder is written in f16 or f32, not {dtype:?}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let cfg = &model.llama.config;
    let dense = merged_dense(model, adapter)?;
    let tensors: HashMap<String, Tensor> = dense
        .named_params()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    let json = |name: &str, v: &serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(v).expect("JSON values serialize"),
        )
        .map_err(|e| write_err(&path, e))
    };
    json("config.json", &hf_config_json(cfg, &model.tokenizer, dtype))?;
    let tok = &model.tokenizer;
    json(
        "tokenizer_config.json",
        &serde_json::json!({
            "chat_template": model.template.source(),
            "bos_token": tok.bos_token().map(|t| t.1),
            "eos_token": tok.eos_token().map(|t| t.1),
            "add_bos_token": tok.add_bos_token(),
        }),
    )?;
    let tok_path = dir.join("tokenizer.json");
    tok.inner()
        .save(&tok_path, false)
        .map_err(|e| write_err(&tok_path, e))?;
    Ok(())
}

/// The model's weights in f32, Hugging Face row order, with `adapter` merged in.
fn merged_dense(
    model: &crate::engine::LoadedModel,
    adapter: Option<&LoraAdapter>,
) -> Result<crate::train::DenseLlama, ExportError> {
    let cfg = &model.llama.config;
    let mut dense = crate::train::DenseLlama::from_llama(&model.llama, DType::F32)?;
    if let Some(a) = adapter {
        let interleaved = cfg.rope_layout == RopeLayout::Interleaved;
        for (layer, p, a, mut b) in a.scaled_pairs()? {
            if interleaved && matches!(p, Projection::Q | Projection::K) {
                let heads = if p == Projection::Q {
                    cfg.num_heads
                } else {
                    cfg.num_kv_heads
                };
                b = crate::train::unpermute_interleaved_rope(&b, heads)?;
            }
            let name = crate::train::base_name(layer, p, "weight");
            let w = dense
                .param_mut(&name)
                .ok_or_else(|| ExportError::Unsupported(format!("the model has no {name}")))?;
            *w = (&*w + b.matmul(&a)?)?;
        }
    }
    Ok(dense)
}
