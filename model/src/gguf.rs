//! What a GGUF file's header says about the model inside, read with candle's
//! `gguf_file` reader, plus an integrity check that every tensor's data lies inside
//! the file (a truncated download fails here instead of deep inside a forward pass).

use candle_core::quantized::gguf_file;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {} not found; {}", path.display(), remedy(path, false))]
    NotFound { path: PathBuf },
    #[error("model file {} is corrupt or truncated ({reason}); {}", path.display(), remedy(path, true))]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to do about a missing (`force` false) or broken model file: `models fetch`
/// brings back only the default model; any other file is the user's to get again.
fn remedy(path: &Path, force: bool) -> &'static str {
    match (
        path.file_name()
            .is_some_and(|n| n == crate::fetch::DEFAULT_MODEL_FILE),
        force,
    ) {
        (true, false) => "run `loraloop models fetch` to get the default model",
        (true, true) => "run `loraloop models fetch --force` to fetch it again",
        (false, _) => "check the path, or download or convert the model again",
    }
}

/// The header facts `loraloop models list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub file_size: u64,
    pub name: Option<String>,
    pub architecture: String,
    pub parameters: u64,
    pub tensor_count: usize,
    /// The file type llama.cpp wrote (`general.file_type`), e.g. `Q4_1`; falls back to the
    /// dtype holding most parameters when the key is absent or unknown.
    pub quantization: String,
    /// Parameters per tensor dtype, e.g. `{"Q4_1": 106168320, "F32": ...}`.
    pub dtypes: BTreeMap<String, u64>,
    pub context_length: Option<u64>,
    pub embedding_length: Option<u64>,
    pub block_count: Option<u64>,
    pub vocab_size: Option<u64>,
    pub has_chat_template: bool,
}

impl GgufSummary {
    /// Read and check a GGUF file's header.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let file_size = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let corrupt = |reason: String| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let content = gguf_file::Content::read(&mut BufReader::new(file))
            .map_err(|e| corrupt(format!("bad GGUF header: {e}")))?;

        let mut data_end = content.tensor_data_offset;
        let mut parameters = 0u64;
        let mut dtypes = BTreeMap::<String, u64>::new();
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count() as u64;
            let block = info.ggml_dtype.block_size() as u64;
            if !elems.is_multiple_of(block) {
                return Err(corrupt(format!(
                    "tensor {name} has {elems} elements, not a multiple of its {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = elems / block * info.ggml_dtype.type_size() as u64;
            data_end = data_end.max(content.tensor_data_offset + info.offset + bytes);
            parameters += elems;
            *dtypes.entry(format!("{:?}", info.ggml_dtype)).or_default() += elems;
        }
        if data_end > file_size {
            return Err(corrupt(format!(
                "tensor data ends at byte {data_end} but the file has {file_size} bytes"
            )));
        }

        let md = &content.metadata;
        let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
        let number = |key: &str| md.get(key).and_then(|v| v.to_u64().ok());
        let architecture = string("general.architecture")
            .ok_or_else(|| corrupt("no general.architecture key".to_string()))?;
        let arch_key = |suffix: &str| number(&format!("{architecture}.{suffix}"));
        let vocab_size = arch_key("vocab_size").or_else(|| {
            md.get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len() as u64)
        });
        let quantization = md
            .get("general.file_type")
            .and_then(|v| v.to_u32().ok())
            .and_then(file_type_name)
            .map(str::to_string)
            .or_else(|| {
                dtypes
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(d, _)| d.clone())
            })
            .unwrap_or_else(|| "unknown".to_string());
        Ok(Self {
            path: path.to_path_buf(),
            file_size,
            name: string("general.name"),
            context_length: arch_key("context_length"),
            embedding_length: arch_key("embedding_length"),
            block_count: arch_key("block_count"),
            vocab_size,
            has_chat_template: md.contains_key("tokenizer.chat_template"),
            architecture,
            parameters,
            tensor_count: content.tensor_infos.len(),
            quantization,
            dtypes,
        })
    }
}

/// llama.cpp's `llama_ftype` numbering (`include/llama.h`), the value of `general.file_type`.
fn file_type_name(ft: u32) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// Human-readable parameter count: `134.5M`, `1.71B`.
pub fn format_params(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_read_like_model_cards() {
        assert_eq!(format_params(134_515_008), "134.5M");
        assert_eq!(format_params(1_711_376_384), "1.71B");
        assert_eq!(format_params(4_096), "4.1K");
        assert_eq!(format_params(12), "12");
    }

    #[test]
    fn a_missing_file_says_what_to_run() {
        // The default model's file comes back with `models fetch`; another is the user's.
        let default = Path::new("/nonexistent").join(crate::fetch::DEFAULT_MODEL_FILE);
        let err = GgufSummary::read(&default).unwrap_err();
        assert!(matches!(err, ModelError::NotFound { .. }));
        assert!(
            err.to_string()
                .contains("run `loraloop models fetch` to get the default model"),
            "{err}"
        );
        let err = GgufSummary::read(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("not found; check the path, or download or convert the model again"),
            "{err}"
        );
    }
}
