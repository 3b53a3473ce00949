//! Llama-family hyperparameters, read from GGUF metadata or a Hugging Face `config.json`.

use super::ModelLoadError;
use candle_core::quantized::gguf_file;
use serde::Deserialize;
use std::fmt;

/// Which rotary layout the q/k weights use.
///
/// Hugging Face checkpoints rotate the two halves of each head (`rotate_half`, "NeoX"
/// style). llama.cpp's converter permutes the rows of `q_proj`/`k_proj` for the llama
/// architecture so that rotation applies to adjacent pairs instead ("normal" rope,
/// `LLAMA_ROPE_TYPE_NORM`); qwen2 GGUF files keep the NeoX layout. The two are the same
/// model up to that row permutation (see `permute_for_interleaved_rope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Rotate adjacent pairs (llama GGUF files).
    Interleaved,
    /// Rotate halves (Hugging Face checkpoints, qwen2 GGUF files).
    Halves,
}

/// Llama 3's long-context frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2).
    pub qkv_bias: bool,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `(in, out)` of each of the seven projections a LoRA adapter may target.
    pub fn projection_dims(&self, module: Projection) -> (usize, usize) {
        use Projection::*;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match module {
            Q => (h, self.q_dim()),
            K | V => (h, self.kv_dim()),
            O => (self.q_dim(), h),
            Gate | Up => (h, i),
            Down => (i, h),
        }
    }

    fn check(self) -> Result<Self, ModelLoadError> {
        let bad = |m: String| Err(ModelLoadError::Config(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("heads and layers must be non-zero".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd", self.head_dim));
        }
        Ok(self)
    }

    /// From a GGUF file's metadata (`{arch}.block_count`, ...).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ModelLoadError> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| ModelLoadError::Config("no general.architecture".into()))?;
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(ModelLoadError::UnsupportedArchitecture(arch));
        }
        let get = |key: &str| -> Result<&gguf_file::Value, ModelLoadError> {
            md.get(&format!("{arch}.{key}"))
                .ok_or_else(|| ModelLoadError::Config(format!("missing {arch}.{key}")))
        };
        let int = |key: &str| -> Result<usize, ModelLoadError> {
            get(key)?
                .to_u64()
                .map(|v| v as usize)
                .map_err(|e| ModelLoadError::Config(format!("{arch}.{key}: {e}")))
        };
        let float = |key: &str| -> Result<f64, ModelLoadError> {
            let v = get(key)?;
            v.to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map_err(|e| ModelLoadError::Config(format!("{arch}.{key}: {e}")))
        };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = int("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| ModelLoadError::Config("no vocabulary size".into()))?,
        };
        Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            rope_layout: if arch == "llama" {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Halves
            },
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            architecture: arch,
        }
        .check()
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ModelLoadError> {
        #[derive(Deserialize)]
        struct Raw {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: f64,
            #[serde(default = "default_theta")]
            rope_theta: f64,
            #[serde(default)]
            rope_scaling: Option<serde_json::Value>,
            #[serde(default = "default_max_pos")]
            max_position_embeddings: usize,
            #[serde(default)]
            tie_word_embeddings: bool,
            #[serde(default)]
            attention_bias: bool,
        }
        fn default_theta() -> f64 {
            10_000.0
        }
        fn default_max_pos() -> usize {
            4096
        }
        // The architecture first: another family's config.json lacks llama's fields, and
        // "unsupported architecture" is the useful error then.
        #[derive(Deserialize)]
        struct Kind {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
        }
        let kind: Kind = serde_json::from_str(text)
            .map_err(|e| ModelLoadError::Config(format!("config.json: {e}")))?;
        let arch = match (
            kind.model_type.as_deref(),
            kind.architectures.first().map(String::as_str),
        ) {
            (Some("llama"), _) | (_, Some("LlamaForCausalLM")) => "llama",
            (Some("mistral"), _) | (_, Some("MistralForCausalLM")) => "mistral",
            (Some("qwen2"), _) | (_, Some("Qwen2ForCausalLM")) => "qwen2",
            (mt, a) => {
                return Err(ModelLoadError::UnsupportedArchitecture(
                    a.or(mt).unwrap_or("unknown").to_string(),
                ));
            }
        };
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| ModelLoadError::Config(format!("config.json: {e}")))?;
        let rope_scaling = match raw.rope_scaling {
            Some(v)
                if v.get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("llama3") =>
            {
                Some(serde_json::from_value(v).map_err(|e| {
                    ModelLoadError::Config(format!("config.json rope_scaling: {e}"))
                })?)
            }
            Some(serde_json::Value::Null) | None => None,
            Some(other) => {
                return Err(ModelLoadError::Config(format!(
                    "unsupported rope_scaling {other} (supported: llama3)"
                )));
            }
        };
        Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            rope_layout: RopeLayout::Halves,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: arch == "qwen2" || raw.attention_bias,
            architecture: arch.to_string(),
        }
        .check()
    }
}

/// The seven projections of a llama block, the modules a LoRA adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The Hugging Face / PEFT module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`: the parent module in Hugging Face names.
    pub fn hf_parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        }
    }

    /// llama.cpp's tensor name in GGUF files (`blk.N.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}
