//! A BERT-family encoder with a classification head (`BertForSequenceClassification`;
//! sentence-transformers checkpoints such as MiniLM pool by the mean instead of the
//! pooler). DistilBERT checkpoints load too: their weights are renamed to BERT's on read.
//! Every op has a backward pass (see `ops`), so each weight marked trainable trains.

use super::lora::{self, Mode};
use super::ops::{self, DTYPE};
use super::params::Params;
use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The encoder's shape, from a Hugging Face `config.json` (BERT or DistilBERT keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
}

impl BertConfig {
    /// Parse a `config.json` value; `None` when it is not a BERT-family encoder.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let kind = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        match kind {
            "bert" => Some(Self {
                vocab_size: u("vocab_size")?,
                hidden_size: u("hidden_size")?,
                num_hidden_layers: u("num_hidden_layers")?,
                num_attention_heads: u("num_attention_heads")?,
                intermediate_size: u("intermediate_size")?,
                max_position_embeddings: u("max_position_embeddings").unwrap_or(512),
                type_vocab_size: u("type_vocab_size").unwrap_or(2),
                layer_norm_eps: f("layer_norm_eps").unwrap_or(1e-12),
                hidden_dropout_prob: f("hidden_dropout_prob").unwrap_or(0.1),
                attention_probs_dropout_prob: f("attention_probs_dropout_prob").unwrap_or(0.1),
            }),
            "distilbert" => Some(Self {
                vocab_size: u("vocab_size")?,
                hidden_size: u("dim")?,
                num_hidden_layers: u("n_layers")?,
                num_attention_heads: u("n_heads")?,
                intermediate_size: u("hidden_dim")?,
                max_position_embeddings: u("max_position_embeddings").unwrap_or(512),
                type_vocab_size: 0,
                layer_norm_eps: 1e-12,
                hidden_dropout_prob: f("dropout").unwrap_or(0.1),
                attention_probs_dropout_prob: f("attention_dropout").unwrap_or(0.1),
            }),
            _ => None,
        }
    }

    /// The `config.json` of a BERT with this shape (what checkpoints are written with).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "bert",
            "architectures": ["BertForSequenceClassification"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "hidden_act": "gelu",
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// How the sequence becomes one vector for the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// BERT's pooler: a dense layer and tanh on the first ([CLS]) token.
    Cls,
    /// The mean over the non-padding tokens (sentence-transformers).
    Mean,
}

/// Weight names as stored: `bert.` prefixes dropped, TF-era `gamma`/`beta` renamed,
/// DistilBERT's names mapped to BERT's, masked-LM and NSP heads and buffers dropped.
pub fn canonical_names(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let mut n = name
            .strip_prefix("bert.")
            .or_else(|| name.strip_prefix("distilbert."))
            .or_else(|| name.strip_prefix("model."))
            .unwrap_or(&name)
            .to_string();
        // Pretraining heads, buffers, and a fine-tuned classifier's head (a new one is put
        // on for the new labels).
        if n.starts_with("cls.")
            || n.ends_with("position_ids")
            || n.starts_with("vocab_")
            || n.starts_with("pre_classifier.")
        {
            continue;
        }
        n = n.replace("LayerNorm.gamma", "LayerNorm.weight");
        n = n.replace("LayerNorm.beta", "LayerNorm.bias");
        if let Some(rest) = n.strip_prefix("transformer.layer.") {
            let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let tail = tail
                .replace("attention.q_lin", "attention.self.query")
                .replace("attention.k_lin", "attention.self.key")
                .replace("attention.v_lin", "attention.self.value")
                .replace("attention.out_lin", "attention.output.dense")
                .replace("sa_layer_norm", "attention.output.LayerNorm")
                .replace("ffn.lin1", "intermediate.dense")
                .replace("ffn.lin2", "output.dense")
                .replace("output_layer_norm", "output.LayerNorm");
            n = format!("encoder.layer.{idx}.{tail}");
        }
        out.insert(n, t);
    }
    out
}

/// The names a checkpoint is written with (`BertForSequenceClassification`'s).
pub fn stored_name(name: &str) -> String {
    if name.starts_with("classifier.") {
        name.to_string()
    } else {
        format!("bert.{name}")
    }
}

/// The weight stems LoRA attaches to: the attention's query, key and value projections.
pub fn lora_targets(cfg: &BertConfig) -> Vec<String> {
    (0..cfg.num_hidden_layers)
        .flat_map(|l| {
            ["query", "key", "value"]
                .map(|p| format!("encoder.layer.{l}.attention.self.{p}.weight"))
        })
        .collect()
}

/// Which layer a weight belongs to: `Some(i)` for encoder layer `i`, `None` otherwise.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layer.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Logits `[batch, labels]` for token ids `[batch, seq]` (u32) and a 0/1 attention mask
/// `[batch, seq]` (f32).
pub fn forward(
    p: &Params,
    cfg: &BertConfig,
    pooling: Pooling,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    let pooled = encode(p, cfg, pooling, input_ids, attention_mask, mode)?;
    classify(p, cfg, &pooled, mode)
}

/// The pooled vector `[batch, hidden]` the head reads.
pub fn encode(
    p: &Params,
    cfg: &BertConfig,
    pooling: Pooling,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    let mut x = embed(p, cfg, input_ids, mode)?;
    let mask_add = additive_mask(attention_mask)?;
    for l in 0..cfg.num_hidden_layers {
        x = layer(p, cfg, l, &x, &mask_add, mode)?;
    }
    pool(p, pooling, &x, attention_mask, mode)
}

fn drop(x: Tensor, rate: f64, mode: Mode) -> Result<Tensor> {
    if mode.train {
        ops::dropout(&x, rate)
    } else {
        Ok(x)
    }
}

/// The embeddings `[batch, seq, hidden]` of token ids `[batch, seq]`.
pub fn embed(p: &Params, cfg: &BertConfig, input_ids: &Tensor, mode: Mode) -> Result<Tensor> {
    let (b, t) = input_ids.dims2()?;
    let words = p
        .get("embeddings.word_embeddings.weight")?
        .index_select(&input_ids.flatten_all()?, 0)?
        .reshape((b, t, cfg.hidden_size))?;
    let positions = p
        .get("embeddings.position_embeddings.weight")?
        .narrow(0, 0, t)?
        .unsqueeze(0)?;
    let mut x = words.broadcast_add(&positions)?;
    if let Some(types) = p.get_opt("embeddings.token_type_embeddings.weight")? {
        x = x.broadcast_add(&types.narrow(0, 0, 1)?.unsqueeze(0)?)?;
    }
    drop(
        norm(p, &x, "embeddings.LayerNorm", cfg)?,
        cfg.hidden_dropout_prob,
        mode,
    )
}

/// The attention's additive mask `[batch, 1, 1, seq]` for a 0/1 mask `[batch, seq]`: 0
/// where attended, a large negative where padded.
pub fn additive_mask(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    ((attention_mask.to_dtype(DTYPE)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))
}

/// Encoder layer `l` on hidden states `x` `[batch, seq, hidden]`.
pub fn layer(
    p: &Params,
    cfg: &BertConfig,
    l: usize,
    x: &Tensor,
    mask_add: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (h, d) = (cfg.num_attention_heads, cfg.head_dim());
    let pre = format!("encoder.layer.{l}");
    let heads = |name: &str| -> Result<Tensor> {
        lora::linear(p, x, &format!("{pre}.attention.self.{name}"), mode)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (heads("query")?, heads("key")?, heads("value")?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask_add)?;
    let probs = drop(
        ops::softmax_last(&scores)?,
        cfg.attention_probs_dropout_prob,
        mode,
    )?;
    let ctx = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, cfg.hidden_size))?;
    let attn = lora::linear(p, &ctx, &format!("{pre}.attention.output.dense"), mode)?;
    let attn = drop(attn, cfg.hidden_dropout_prob, mode)?;
    let x1 = norm(
        p,
        &(attn + x)?,
        &format!("{pre}.attention.output.LayerNorm"),
        cfg,
    )?;
    let inner = lora::linear(p, &x1, &format!("{pre}.intermediate.dense"), mode)?.gelu_erf()?;
    let out = lora::linear(p, &inner, &format!("{pre}.output.dense"), mode)?;
    let out = drop(out, cfg.hidden_dropout_prob, mode)?;
    norm(p, &(out + x1)?, &format!("{pre}.output.LayerNorm"), cfg)
}

/// The last hidden states `[batch, seq, hidden]` pooled to `[batch, hidden]`.
pub fn pool(
    p: &Params,
    pooling: Pooling,
    x: &Tensor,
    attention_mask: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    match pooling {
        Pooling::Cls => {
            let first = x.narrow(1, 0, 1)?.squeeze(1)?;
            lora::linear(p, &first, "pooler.dense", mode)?.tanh()
        }
        Pooling::Mean => {
            let m = attention_mask.to_dtype(DTYPE)?.unsqueeze(2)?;
            let summed = x.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            summed.broadcast_div(&count)
        }
    }
}

/// The head on a pooled vector: dropout (training) and the classifier, `[batch, labels]`.
pub fn classify(p: &Params, cfg: &BertConfig, pooled: &Tensor, mode: Mode) -> Result<Tensor> {
    let pooled = drop(pooled.clone(), cfg.hidden_dropout_prob, mode)?;
    lora::linear(p, &pooled, "classifier", mode)
}

fn norm(p: &Params, x: &Tensor, stem: &str, cfg: &BertConfig) -> Result<Tensor> {
    ops::layer_norm(
        x,
        &p.get(&format!("{stem}.weight"))?,
        &p.get(&format!("{stem}.bias"))?,
        cfg.layer_norm_eps,
    )
}

/// A fresh classification head (`classifier.*`, Hugging Face's init: normal(0, 0.02),
/// zero bias), and a pooler when the checkpoint has none and the pooling needs one.
pub fn add_head(
    p: &mut Params,
    cfg: &BertConfig,
    pooling: Pooling,
    labels: usize,
    seed: u64,
) -> Result<()> {
    let dev = p.device().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let hd = cfg.hidden_size;
    p.insert(
        "classifier.weight",
        normal(&mut rng, &[labels, hd], 0.02, &dev)?,
    )?;
    p.insert("classifier.bias", Tensor::zeros(labels, DTYPE, &dev)?)?;
    if pooling == Pooling::Cls && !p.contains("pooler.dense.weight") {
        p.insert(
            "pooler.dense.weight",
            normal(&mut rng, &[hd, hd], 0.02, &dev)?,
        )?;
        p.insert("pooler.dense.bias", Tensor::zeros(hd, DTYPE, &dev)?)?;
    }
    Ok(())
}

/// Random encoder weights with Hugging Face's init (normal(0, 0.02), layer norms 1 and 0).
pub fn random_weights(
    cfg: &BertConfig,
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let hd = cfg.hidden_size;
    let put_linear = |w: &mut HashMap<String, Tensor>,
                      rng: &mut StdRng,
                      stem: &str,
                      out: usize,
                      inp: usize|
     -> Result<()> {
        w.insert(
            format!("{stem}.weight"),
            normal(rng, &[out, inp], 0.02, dev)?,
        );
        w.insert(format!("{stem}.bias"), Tensor::zeros(out, DTYPE, dev)?);
        Ok(())
    };
    let put_norm = |w: &mut HashMap<String, Tensor>, stem: &str| -> Result<()> {
        w.insert(format!("{stem}.weight"), Tensor::ones(hd, DTYPE, dev)?);
        w.insert(format!("{stem}.bias"), Tensor::zeros(hd, DTYPE, dev)?);
        Ok(())
    };
    w.insert(
        "embeddings.word_embeddings.weight".into(),
        normal(&mut rng, &[cfg.vocab_size, hd], 0.02, dev)?,
    );
    w.insert(
        "embeddings.position_embeddings.weight".into(),
        normal(&mut rng, &[cfg.max_position_embeddings, hd], 0.02, dev)?,
    );
    if cfg.type_vocab_size > 0 {
        w.insert(
            "embeddings.token_type_embeddings.weight".into(),
            normal(&mut rng, &[cfg.type_vocab_size, hd], 0.02, dev)?,
        );
    }
    put_norm(&mut w, "embeddings.LayerNorm")?;
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("encoder.layer.{l}");
        for proj in ["query", "key", "value"] {
            put_linear(
                &mut w,
                &mut rng,
                &format!("{pre}.attention.self.{proj}"),
                hd,
                hd,
            )?;
        }
        put_linear(
            &mut w,
            &mut rng,
            &format!("{pre}.attention.output.dense"),
            hd,
            hd,
        )?;
        put_norm(&mut w, &format!("{pre}.attention.output.LayerNorm"))?;
        put_linear(
            &mut w,
            &mut rng,
            &format!("{pre}.intermediate.dense"),
            cfg.intermediate_size,
            hd,
        )?;
        put_linear(
            &mut w,
            &mut rng,
            &format!("{pre}.output.dense"),
            hd,
            cfg.intermediate_size,
        )?;
        put_norm(&mut w, &format!("{pre}.output.LayerNorm"))?;
    }
    put_linear(&mut w, &mut rng, "pooler.dense", hd, hd)?;
    Ok(w)
}

pub(super) fn normal(rng: &mut StdRng, shape: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
    let dist = rand_distr::Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng)).collect();
    Tensor::from_vec(v, shape, dev)
}
