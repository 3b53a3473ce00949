//! Tiny random chat models for tests and quick demos: a Hugging Face folder with a
//! byte-level tokenizer (every byte a token, plus the ChatML markers), a ChatML template
//! and random llama weights. Training and generation run on it in milliseconds.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            seed: 0,
        }
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Write `config.json`, `model.safetensors`, `tokenizer.json` and
/// `tokenizer_config.json` of a random tiny llama into `dir`.
pub fn write_tiny_chat_model(dir: &Path, spec: TinySpec) -> Result<(), String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(vec![
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ])
    .map_err(|e| e.to_string())?;
    let vocab_size = tok.get_vocab_size(true);
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| e.to_string())?;
    let tc = serde_json::json!({
        "chat_template": CHATML,
        "bos_token": null,
        "eos_token": "<|im_end|>",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).map_err(|e| e.to_string())?;

    let s = spec;
    let head_dim = s.hidden / s.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(|e| e.to_string())?;

    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut randn = |shape: (usize, usize), std: f32| -> Result<Tensor, String> {
        // Box-Muller from the seeded generator (candle's CPU randn is not seedable).
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u1: f32 = rng.random_range(1e-7..1.0);
                let u2: f32 = rng.random();
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        randn((vocab_size, s.hidden), 0.5)?,
    );
    tensors.insert(
        "model.norm.weight".into(),
        ones(s.hidden).map_err(|e| e.to_string())?,
    );
    let (q, kv) = (s.heads * head_dim, s.kv_heads * head_dim);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        let std_in = 1.0 / (s.hidden as f32).sqrt();
        let std_mid = 1.0 / (s.intermediate as f32).sqrt();
        for (name, shape, std) in [
            ("self_attn.q_proj", (q, s.hidden), std_in),
            ("self_attn.k_proj", (kv, s.hidden), std_in),
            ("self_attn.v_proj", (kv, s.hidden), std_in),
            ("self_attn.o_proj", (s.hidden, q), std_in),
            ("mlp.gate_proj", (s.intermediate, s.hidden), std_in),
            ("mlp.up_proj", (s.intermediate, s.hidden), std_in),
            ("mlp.down_proj", (s.hidden, s.intermediate), std_mid),
        ] {
            tensors.insert(format!("{p}.{name}.weight"), randn(shape, std)?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{p}.{n}.weight"),
                ones(s.hidden).map_err(|e| e.to_string())?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| e.to_string())
}

/// The largest absolute entry of an f32 tensor (the unit tests' error measure).
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|a| a.to_scalar())
        .expect("an f32 tensor")
}

/// A random `[rows, cols]` matrix of N(0, 1) values quantized to `dtype` (the kernels'
/// tests' weights).
#[cfg(test)]
pub(crate) fn random_quantized(
    rows: usize,
    cols: usize,
    dtype: candle_core::quantized::GgmlDType,
) -> candle_core::quantized::QTensor {
    Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)
        .and_then(|w| candle_core::quantized::QTensor::quantize(&w, dtype))
        .expect("a quantizable shape")
}

/// `n` values drawn from N(0, `std`²) (the AVX2 kernels' tests' inputs).
#[cfg(all(test, avx2_kernels))]
pub(crate) fn randn_vec(n: usize, std: f32) -> Vec<f32> {
    Tensor::randn(0f32, std, n, &Device::Cpu)
        .and_then(|t| t.to_vec1())
        .expect("random values")
}

/// Write a tiny random BERT (`config.json`, `vocab.txt` of BERT's special tokens plus
/// `words`, `model.safetensors` with Hugging Face's init) into `dir`.
pub fn write_tiny_bert(
    dir: &Path,
    words: &[&str],
    hidden: usize,
    layers: usize,
    seed: u64,
) -> Result<(), String> {
    use crate::classify::bert::{BertConfig, random_weights};
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut vocab: Vec<&str> = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    vocab.extend(
        words
            .iter()
            .filter(|w| !vocab.contains(w))
            .collect::<Vec<_>>(),
    );
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").map_err(|e| e.to_string())?;
    let cfg = BertConfig {
        vocab_size: vocab.len(),
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 2,
        intermediate_size: hidden * 2,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
    };
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), json).map_err(|e| e.to_string())?;
    let w = random_weights(&cfg, seed, &Device::Cpu).map_err(|e| e.to_string())?;
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).map_err(|e| e.to_string())
}

/// Write a tiny random torchvision-layout ResNet (`model.safetensors`, no head) into `dir`.
pub fn write_tiny_resnet(
    dir: &Path,
    width: usize,
    layers: &[usize],
    bottleneck: bool,
    seed: u64,
) -> Result<(), String> {
    use crate::classify::resnet::{ResNetConfig, random_weights};
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let cfg = ResNetConfig {
        bottleneck,
        layers: layers.to_vec(),
        width,
    };
    let w = random_weights(&cfg, seed, &Device::Cpu).map_err(|e| e.to_string())?;
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).map_err(|e| e.to_string())
}

const POSITIVE: [&str; 6] = [
    "great",
    "wonderful",
    "superb",
    "lovely",
    "brilliant",
    "moving",
];
const NEGATIVE: [&str; 6] = ["awful", "terrible", "boring", "dreadful", "poor", "dull"];
const FILLER: [&str; 10] = [
    "the", "movie", "was", "a", "film", "plot", "and", "acting", "really", "quite",
];

/// Every word [`two_class_reviews`] uses (a tiny BERT's vocabulary).
pub const REVIEW_WORDS: [&str; 22] = concat_words(&[&POSITIVE, &NEGATIVE, &FILLER]);

/// The words of `lists` one after another; a total other than `N` fails the build.
const fn concat_words<const N: usize>(lists: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut i, mut l) = (0, 0);
    while l < lists.len() {
        let mut j = 0;
        while j < lists[l].len() {
            out[i] = lists[l][j];
            (i, j) = (i + 1, j + 1);
        }
        l += 1;
    }
    assert!(i == N, "REVIEW_WORDS' length is not the lists' total");
    out
}

/// `n` JSONL rows `{"text", "label"}` of a generated two-class set: a review is
/// `positive` or `negative` by which kind of adjective it holds, amid filler words in a
/// random order; alternating labels.
pub fn two_class_reviews(n: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = String::new();
    for i in 0..n {
        let pos = i % 2 == 0;
        let mut words: Vec<&str> = (0..rng.random_range(3..8))
            .map(|_| FILLER[rng.random_range(0..FILLER.len())])
            .collect();
        let adjectives = if pos { POSITIVE } else { NEGATIVE };
        for _ in 0..rng.random_range(1..3) {
            let at = rng.random_range(0..=words.len());
            words.insert(at, adjectives[rng.random_range(0..adjectives.len())]);
        }
        let label = if pos { "positive" } else { "negative" };
        out.push_str(&serde_json::json!({"text": words.join(" "), "label": label}).to_string());
        out.push('\n');
    }
    out
}
