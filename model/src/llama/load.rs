//! Loading weights: GGUF files (quantized weights stay quantized) and Hugging Face model
//! folders (`config.json` + one or several memory-mapped `*.safetensors`).

use super::{BaseWeight, Block, Linear, Llama, LlamaConfig, ModelLoadError};
use crate::gguf::GgufSummary;
use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A Hugging Face model folder.
    HfDir(PathBuf),
}

impl ModelSource {
    /// A folder with `config.json` is a Hugging Face model; anything else must be a GGUF file.
    pub fn detect(path: &Path) -> Result<Self, ModelLoadError> {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                Ok(Self::HfDir(path.to_path_buf()))
            } else {
                Err(ModelLoadError::Weights(format!(
                    "{} is a folder without config.json; expected a Hugging Face model folder or a .gguf file",
                    path.display()
                )))
            }
        } else if path.exists() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            Err(crate::gguf::ModelError::NotFound {
                path: path.to_path_buf(),
            }
            .into())
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

fn weights_err(name: &str, e: impl std::fmt::Display) -> ModelLoadError {
    ModelLoadError::Weights(format!("{name}: {e}"))
}

fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<(), ModelLoadError> {
    if actual != expected {
        return Err(ModelLoadError::Weights(format!(
            "tensor {name} has shape {actual:?}, expected {expected:?} from the model config"
        )));
    }
    Ok(())
}

/// Load a GGUF model. The header is checked first (a truncated file fails with the
/// "run `loraloop models fetch --force`" error instead of deep inside a read).
pub fn load_gguf(
    path: &Path,
    device: &Device,
) -> Result<(Llama, gguf_file::Content), ModelLoadError> {
    GgufSummary::read(path)?;
    let file = File::open(path).map_err(|source| crate::gguf::ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let content =
        gguf_file::Content::read(&mut reader).map_err(|e| crate::gguf::ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let cfg = LlamaConfig::from_gguf(&content)?;
    let mut qt =
        |name: &str, shape: &[usize]| -> Result<candle_core::quantized::QTensor, ModelLoadError> {
            let t = content
                .tensor(&mut reader, name, device)
                .map_err(|e| weights_err(name, e))?;
            // GGUF stores dims innermost-first; candle's reader already reverses them.
            check_shape(name, t.shape().dims(), shape)?;
            Ok(t)
        };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed_q = qt("token_embd.weight", &[v, h])?;
    let embed = embed_q.dequantize(device)?;
    let head_q = if cfg.tie_word_embeddings {
        embed_q
    } else {
        qt("output.weight", &[v, h])?
    };
    // The head runs for every row of every decode step: Q8_0 (SmolLM2's) through our
    // batched kernel on the CPU.
    let lm_head = if device.is_cpu() && head_q.dtype() == candle_core::quantized::GgmlDType::Q8_0 {
        BaseWeight::Q80(std::sync::Arc::new(crate::q8_0::Q80Matrix::from_qtensor(
            &head_q,
        )?))
    } else {
        BaseWeight::Quantized(QMatMul::from_qtensor(head_q)?)
    };
    let norm = qt("output_norm.weight", &[h])?.dequantize(device)?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let mut linear = |suffix: &str,
                          (inp, out): (usize, usize),
                          bias: bool|
         -> Result<Linear, ModelLoadError> {
            let w = qt(&format!("blk.{i}.{suffix}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(qt(&format!("blk.{i}.{suffix}.bias"), &[out])?.dequantize(device)?)
            } else {
                None
            };
            let weight = if device.is_cpu() && w.dtype() == candle_core::quantized::GgmlDType::Q4_1
            {
                BaseWeight::Q41(std::sync::Arc::new(crate::q4_1::Q41Matrix::from_qtensor(
                    &w,
                )?))
            } else {
                BaseWeight::Quantized(QMatMul::from_qtensor(w)?)
            };
            Ok(Linear { weight, bias })
        };
        use super::Projection as P;
        let b = cfg.qkv_bias;
        let mut proj = |p: P, bias: bool| linear(p.gguf_name(), cfg.projection_dims(p), bias);
        let q = proj(P::Q, b)?;
        let k = proj(P::K, b)?;
        let vv = proj(P::V, b)?;
        let o = proj(P::O, false)?;
        let gate = proj(P::Gate, false)?;
        let up = proj(P::Up, false)?;
        let down = proj(P::Down, false)?;
        blocks.push(Block {
            attn_norm: qt(&format!("blk.{i}.attn_norm.weight"), &[h])?.dequantize(device)?,
            ffn_norm: qt(&format!("blk.{i}.ffn_norm.weight"), &[h])?.dequantize(device)?,
            q,
            k,
            v: vv,
            o,
            gate,
            up,
            down,
        });
    }
    let model = Llama::new(
        cfg,
        embed,
        blocks,
        norm,
        Linear {
            weight: lm_head,
            bias: None,
        },
        device.clone(),
    )?;
    Ok((model, content))
}

/// Load a Hugging Face model folder with dense weights in `dtype` (f32 on CPU).
pub fn load_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Llama, ModelLoadError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| weights_err(&config_path.display().to_string(), e))?;
    let cfg = LlamaConfig::from_hf_json(&text)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| weights_err(&dir.display().to_string(), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelLoadError::Weights(format!(
            "no *.safetensors files in {}",
            dir.display()
        )));
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader
    // (candle, safetensors, transformers) we rely on nobody truncating or rewriting a model
    // file while it is loaded. Mapping instead of reading keeps multi-GB checkpoints out
    // of the page cache twice.
    #[allow(unsafe_code)]
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| weights_err("safetensors", e))?;
    let get = |name: &str, shape: &[usize]| -> Result<Tensor, ModelLoadError> {
        let t = st.load(name, device).map_err(|e| weights_err(name, e))?;
        check_shape(name, t.dims(), shape)?;
        Ok(t.to_dtype(dtype)?)
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed = get("model.embed_tokens.weight", &[v, h])?;
    let has_head = st.get("lm_head.weight").is_ok();
    let lm_head = if has_head && !cfg.tie_word_embeddings {
        get("lm_head.weight", &[v, h])?
    } else {
        embed.clone()
    };
    let norm = get("model.norm.weight", &[h])?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let linear = |p: super::Projection, bias: bool| -> Result<Linear, ModelLoadError> {
            let (inp, out) = cfg.projection_dims(p);
            let base = format!("model.layers.{i}.{}.{}", p.hf_parent(), p.hf_name());
            Ok(Linear {
                weight: BaseWeight::Dense(get(&format!("{base}.weight"), &[out, inp])?),
                bias: if bias {
                    Some(get(&format!("{base}.bias"), &[out])?)
                } else {
                    None
                },
            })
        };
        use super::Projection as P;
        let b = cfg.qkv_bias;
        blocks.push(Block {
            attn_norm: get(&format!("model.layers.{i}.input_layernorm.weight"), &[h])?,
            ffn_norm: get(
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
                &[h],
            )?,
            q: linear(P::Q, b)?,
            k: linear(P::K, b)?,
            v: linear(P::V, b)?,
            o: linear(P::O, false)?,
            gate: linear(P::Gate, false)?,
            up: linear(P::Up, false)?,
            down: linear(P::Down, false)?,
        });
    }
    Ok(Llama::new(
        cfg,
        embed,
        blocks,
        norm,
        Linear {
            weight: BaseWeight::Dense(lm_head),
            bias: None,
        },
        device.clone(),
    )?)
}
