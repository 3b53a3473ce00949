//! A merged GGUF from a base that came as a Hugging Face folder: there is no GGUF file to
//! copy metadata from, so the hyperparameters, the tokenizer (`tokenizer.ggml.*`, in
//! llama.cpp's layout) and the chat template are written from the loaded model, and the
//! tensors get llama.cpp's names (q/k rows permuted for the llama architecture, as
//! llama.cpp's converter does).

use super::{ExportError, GgufType, merged_dense};
use crate::engine::LoadedModel;
use crate::llama::config::{LlamaConfig, Projection};
use crate::lora::{LoraAdapter, permute_for_interleaved_rope};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// llama.cpp's pre-tokenizer names whose splitting the project's GGUF tokenizer knows,
/// tried in this order; the first that tokenizes [`PROBE`] as the model's own tokenizer
/// does is written.
const PRE_CANDIDATES: [&str; 4] = ["smollm", "llama-bpe", "qwen2", "gpt2"];

/// Text that tells the pre-tokenizers apart: digit runs, contractions, case, accents,
/// CJK, runs of spaces, tabs and newlines.
const PROBE: &str = "Hello world! It's 2026-12-03: 12345 apples, I'M sure they'll cost \
    3.50.\n\n   Indented\ttabs   and  ünïcödé — café 你好世界 ½ 🙂\r\n\"quoted\" x=y+1;";

/// Write `model` (loaded from a Hugging Face folder) with `adapter` merged in (None: the
/// model alone) as a GGUF of type `ty` named `name`.
pub fn write_merged_gguf_from_model(
    model: &LoadedModel,
    adapter: Option<&LoraAdapter>,
    ty: GgufType,
    name: &str,
    path: &Path,
) -> Result<(), ExportError> {
    let cfg = &model.llama.config;
    let arch = gguf_architecture(cfg)?;
    let dense = merged_dense(model, adapter)?;
    let permute = arch == "llama";
    let quantize = |w: &Tensor| -> Result<QTensor, ExportError> {
        // A fresh tensor: the dense weights may be views into a fused matrix, and
        // quantizing reads the whole storage.
        let w = Tensor::from_vec(
            w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            w.shape(),
            w.device(),
        )?;
        Ok(QTensor::quantize(&w, ty.for_tensor(w.dims()))?)
    };
    let mut tensors: Vec<(String, QTensor)> =
        vec![("token_embd.weight".into(), quantize(&dense.embed)?)];
    for (i, b) in dense.blocks.iter().enumerate() {
        tensors.push((format!("blk.{i}.attn_norm.weight"), quantize(&b.attn_norm)?));
        for p in Projection::ALL {
            let l = &b.proj[p.index()];
            let heads = match p {
                Projection::Q => Some(cfg.num_heads),
                Projection::K => Some(cfg.num_kv_heads),
                _ => None,
            };
            let rows = |t: &Tensor| -> Result<Tensor, ExportError> {
                Ok(match heads {
                    Some(h) if permute => {
                        let two_d = t.reshape((t.dims()[0], t.elem_count() / t.dims()[0]))?;
                        permute_for_interleaved_rope(&two_d, h)?.reshape(t.dims())?
                    }
                    _ => t.clone(),
                })
            };
            let stem = format!("blk.{i}.{}", p.gguf_name());
            tensors.push((format!("{stem}.weight"), quantize(&rows(&l.w)?)?));
            if let Some(bias) = &l.b {
                tensors.push((format!("{stem}.bias"), quantize(&rows(bias)?)?));
            }
        }
        tensors.push((format!("blk.{i}.ffn_norm.weight"), quantize(&b.ffn_norm)?));
    }
    tensors.push(("output_norm.weight".into(), quantize(&dense.norm)?));
    if let Some(h) = &dense.lm_head {
        tensors.push(("output.weight".into(), quantize(h)?));
    }

    let mut metadata = model_metadata(cfg, arch, ty, name);
    metadata.extend(tokenizer_metadata(&model.tokenizer, cfg.vocab_size)?);
    metadata.push((
        "tokenizer.chat_template".into(),
        Value::String(model.template.source().to_string()),
    ));
    let md: Vec<(&str, Value)> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    super::write_gguf_file(path, &md, &tensors)
}

/// llama.cpp's architecture name for the model, or why it has none the project reads.
fn gguf_architecture(cfg: &LlamaConfig) -> Result<&'static str, ExportError> {
    if cfg.rope_scaling.is_some() {
        // The project's GGUF loader does not read llama.cpp's rope-scaling keys.
        return Err(ExportError::Unsupported(
            "this base scales its rope (llama 3.1 style), which a merged GGUF from loraloop does not carry; export it as a merged safetensors folder and convert that with llama.cpp".into(),
        ));
    }
    match cfg.architecture.as_str() {
        "llama" | "mistral" => Ok("llama"),
        "qwen2" => Ok("qwen2"),
        other => Err(ExportError::Unsupported(format!(
            "no GGUF writer for the {other} architecture"
        ))),
    }
}

fn model_metadata(cfg: &LlamaConfig, arch: &str, ty: GgufType, name: &str) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        (key("context_length"), u(cfg.max_position_embeddings)),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("block_count"), u(cfg.num_layers)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("attention.head_count"), u(cfg.num_heads)),
        (key("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (key("attention.key_length"), u(cfg.head_dim)),
        (key("attention.value_length"), u(cfg.head_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (key("rope.dimension_count"), u(cfg.head_dim)),
        (key("vocab_size"), u(cfg.vocab_size)),
    ]
}

/// The tokenizer as llama.cpp's `tokenizer.ggml.*` keys (a byte-level BPE, `gpt2` in
/// llama.cpp's words), padded to the model's `vocab_size` with unused tokens. The
/// pre-tokenizer name is the one under which the project's GGUF tokenizer splits a probe
/// text as this tokenizer does; a tokenizer none of them matches is refused rather than
/// written to tokenize differently.
fn tokenizer_metadata(
    tok: &Tokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, ExportError> {
    let inner = tok.inner();
    let unsupported = |why: String| ExportError::Unsupported(format!("the tokenizer {why}"));
    let merges = crate::tokenizer::model_merges(inner.get_model())
        .map_err(|e| unsupported(format!("has unreadable merges: {e}")))?;
    if !matches!(inner.get_model(), tokenizers::models::ModelWrapper::BPE(_)) {
        return Err(unsupported(
            "is not a byte-level BPE, the one kind a GGUF from loraloop carries".into(),
        ));
    }
    let vocab = inner.get_vocab(true);
    let n = vocab.len().max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, id) in &vocab {
        let slot = tokens
            .get_mut(*id as usize)
            .ok_or_else(|| unsupported(format!("has token id {id} past {n} tokens")))?;
        *slot = Some(t.clone());
    }
    let added: HashMap<u32, bool> = inner
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, t)| (id, t.special))
        .collect();
    let mut types = Vec::with_capacity(n);
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            let (text, ty) = match t {
                None => (format!("[PAD{id}]"), UNUSED),
                Some(t) => {
                    let ty = match added.get(&(id as u32)) {
                        Some(true) => CONTROL,
                        Some(false) => USER_DEFINED,
                        None => NORMAL,
                    };
                    (t, ty)
                }
            };
            types.push(Value::I32(ty));
            Value::String(text)
        })
        .collect();
    let mut md: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .into_iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(tok.add_bos_token()),
        ),
    ];
    if let Some((id, _)) = tok.bos_token() {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }
    if let Some((id, _)) = tok.eos_token() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    let want = tok
        .encode(PROBE, false)
        .map_err(|e| unsupported(format!("cannot encode: {e}")))?;
    for pre in PRE_CANDIDATES {
        let mut candidate = md.clone();
        candidate.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        let content = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: candidate.iter().cloned().collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let Ok(rebuilt) = Tokenizer::from_gguf(&content) else {
            continue;
        };
        if rebuilt.encode(PROBE, false).ok().as_ref() == Some(&want) {
            return Ok(candidate);
        }
    }
    Err(unsupported(format!(
        "splits text in a way none of llama.cpp's pre-tokenizers loraloop knows ({}) does; export a merged safetensors folder instead (--format hf)",
        PRE_CANDIDATES.join(", ")
    )))
}
