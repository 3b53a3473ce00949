//! Export on the real default model (SmolLM2-135M-Instruct Q4_1, fetched by the README's
//! test command): a random LoRA adapter written as a llama.cpp LoRA GGUF reads back
//! tensor for tensor, and the model with it merged, written as a GGUF and loaded again by
//! the project's own GGUF loader, gives the logits the unmerged model gives.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use loraloop_model::engine::LoadedModel;
use loraloop_model::export::{GgufType, write_gguf_lora, write_merged_gguf, write_merged_hf};
use loraloop_model::llama::config::Projection;
use loraloop_model::lora::{LoraAdapter, PeftConfig, random_peft_tensors};
use std::collections::HashMap;
use std::path::PathBuf;

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo run -- models fetch` first",
        p.display()
    );
    p
}

/// llama.cpp's ids for a ChatML prompt (see real_model.rs).
const PROMPT_IDS: [u32; 27] = [
    1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
    4649, 47, 2, 198, 1, 520, 9531, 198,
];

fn last_logits(m: &LoadedModel, adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let input = Tensor::new(&PROMPT_IDS[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = m.llama.new_cache();
    m.llama
        .forward(&input, &mut cache, adapter)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn exported_lora_and_merged_ggufs_read_back_and_match_the_unmerged_model() {
    let dev = Device::Cpu;
    let base = LoadedModel::load(&model_path(), &dev).unwrap();
    let cfg = base.llama.config.clone();
    let peft = PeftConfig::new(8, 16.0, &Projection::ALL);
    // Deterministic pseudo-random weights (uniform, std 0.05): large enough to move the
    // logits far more than the tolerances below, and the same on every run.
    let tensors: HashMap<String, Tensor> = random_peft_tensors(&cfg, &peft, 0.05, &dev)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let k = name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
                % 1000;
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    let x = ((i as f64 * 12.9898 + k as f64 * 78.233).sin() * 43758.5453).fract();
                    (x * 0.0866) as f32 // uniform on (-0.0866, 0.0866): std 0.05
                })
                .collect();
            (name, Tensor::from_vec(v, t.shape(), &dev).unwrap())
        })
        .collect();
    let adapter = LoraAdapter::from_tensors("random".into(), peft, &tensors, &cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The LoRA GGUF: llama.cpp's keys, and every pair as the adapter applies it.
    let lora_path = dir.path().join("adapter.gguf");
    write_gguf_lora(&adapter, &cfg, &lora_path).unwrap();
    let mut f = std::io::BufReader::new(std::fs::File::open(&lora_path).unwrap());
    let content = gguf_file::Content::read(&mut f).unwrap();
    let md = |k: &str| content.metadata.get(k).unwrap().clone();
    assert_eq!(md("general.type").to_string().unwrap(), "adapter");
    assert_eq!(md("adapter.type").to_string().unwrap(), "lora");
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(md("adapter.lora.alpha").to_f32().unwrap(), 8.0);
    let pairs = adapter.scaled_pairs().unwrap();
    assert_eq!(content.tensor_infos.len(), 2 * pairs.len());
    for (layer, p, a, b) in &pairs {
        let stem = format!("blk.{layer}.{}.weight", p.gguf_name());
        for (side, want) in [("lora_a", a), ("lora_b", b)] {
            let got = content
                .tensor(&mut f, &format!("{stem}.{side}"), &dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            assert_eq!(got.dims(), want.dims(), "{stem}.{side}");
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{stem}.{side}");
        }
    }

    let with_adapter = last_logits(&base, Some(&adapter));
    let without = last_logits(&base, None);
    let moved = with_adapter
        .iter()
        .zip(&without)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1.0, "the adapter moves the logits: {moved}");
    // F16: the reference is the base re-typed to F16 (nothing merged) running the
    // adapter unmerged. Both see the same rounding of the base weights, so what is left
    // is f16's relative 2^-11 on each merged weight, through 30 layers to logits of size
    // ~20 (measured: 0.022). The largest logit difference over the 49152-token
    // vocabulary (the adapter itself moves them by more than 1), and the same top token.
    let load = |ty: GgufType, adapter: Option<&LoraAdapter>| {
        let name = format!(
            "{}-{}.gguf",
            if adapter.is_some() { "merged" } else { "base" },
            ty.as_str()
        );
        let path = dir.path().join(name);
        write_merged_gguf(&model_path(), adapter, &cfg, ty, "exported", &path).unwrap();
        LoadedModel::load(&path, &dev).unwrap()
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let base_f16 = load(GgufType::F16, None);
    let merged_f16 = load(GgufType::F16, Some(&adapter));
    assert_eq!(merged_f16.llama.config, cfg);
    assert_eq!(
        merged_f16.template.source(),
        base.template.source(),
        "the chat template travels"
    );
    assert_eq!(
        merged_f16
            .tokenizer
            .encode("What is the capital of France?", false)
            .unwrap(),
        base.tokenizer
            .encode("What is the capital of France?", false)
            .unwrap()
    );
    let unmerged_f16 = last_logits(&base_f16, Some(&adapter));
    let merged_f16 = last_logits(&merged_f16, None);
    let f16_diff = max_diff(&merged_f16, &unmerged_f16);
    eprintln!("f16: max logit difference, merged vs unmerged: {f16_diff}");
    assert!(f16_diff < 0.05, "f16: {f16_diff}");
    assert_eq!(argmax(&merged_f16), argmax(&unmerged_f16));
    assert_eq!(
        argmax(&merged_f16),
        argmax(&with_adapter),
        "the Q4_1 base's top token"
    );
    // Q8_0 rounds every 32-weight block to 8 bits: the merged Q8_0 file may be about as
    // far from the merged F16 one as the base's Q8_0 re-typing is from its F16 one (the
    // rounding of one Q8_0 model; root mean square over the vocabulary), not much further
    // (measured: 0.33 for the base, 0.55 for the merged model, whose blocks span the
    // delta too).
    let rms = |a: &[f32], b: &[f32]| {
        (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
    };
    let base_q8 = last_logits(&load(GgufType::Q8_0, None), None);
    let base_rounding = rms(&base_q8, &last_logits(&base_f16, None));
    let merged_q8 = last_logits(&load(GgufType::Q8_0, Some(&adapter)), None);
    let merged_rounding = rms(&merged_q8, &merged_f16);
    eprintln!(
        "q8_0: rms rounding of the base {base_rounding}, of the merged model {merged_rounding}"
    );
    assert!(
        merged_rounding < 2.0 * base_rounding,
        "q8_0: merged {merged_rounding} vs base {base_rounding}"
    );
    assert_eq!(
        argmax(&merged_q8),
        argmax(&merged_f16),
        "q8_0: the same top token"
    );

    // A Hugging Face folder (f32): the base's weights as the loader dequantizes them,
    // q/k back in Hugging Face row order, plus the delta; loaded by the folder loader.
    // Its reference is the F16 re-typing running the adapter (both compute in f32 on
    // dequantized weights; what is left is f16's rounding of the base, measured 0.031).
    // The Q4_1 file itself runs its matmuls on 8-bit-quantized activations, as llama.cpp
    // does, which moves its logits by about 1.1 from either: compared by top token only.
    let hf = dir.path().join("hf");
    write_merged_hf(&base, Some(&adapter), candle_core::DType::F32, &hf).unwrap();
    let folder = LoadedModel::load(&hf, &dev).unwrap();
    assert_eq!(folder.template.source(), base.template.source());
    assert_eq!(
        folder
            .tokenizer
            .encode("What is the capital of France?", false)
            .unwrap(),
        base.tokenizer
            .encode("What is the capital of France?", false)
            .unwrap()
    );
    let got = last_logits(&folder, None);
    let hf_diff = max_diff(&got, &unmerged_f16);
    eprintln!(
        "hf f32: max logit difference from the F16 base running the adapter: {hf_diff}; from the Q4_1 base: {}",
        max_diff(&got, &with_adapter)
    );
    assert!(hf_diff < 0.05, "hf: {hf_diff}");
    assert_eq!(argmax(&got), argmax(&with_adapter));
}

/// A base that came as a Hugging Face folder has no GGUF to copy metadata from: the
/// hyperparameters, tokenizer and chat template are written from the loaded model. The
/// folder here is the default model written out by `write_merged_hf` (f32, Hugging Face
/// row order, its tokenizer.json), so the round trip also crosses the q/k permutation.
#[test]
fn a_hugging_face_base_exports_a_merged_gguf_with_its_tokenizer_and_template() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    {
        let base = LoadedModel::load(&model_path(), &dev).unwrap();
        write_merged_hf(&base, None, candle_core::DType::F32, &hf).unwrap();
    }
    let folder = LoadedModel::load(&hf, &dev).unwrap();
    let cfg = folder.llama.config.clone();
    let peft = PeftConfig::new(8, 16.0, &Projection::ALL);
    let tensors: HashMap<String, Tensor> = random_peft_tensors(&cfg, &peft, 0.05, &dev)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i as f64 * 12.9898).sin() * 43758.5453).fract() * 0.0866) as f32)
                .collect();
            (name, Tensor::from_vec(v, t.shape(), &dev).unwrap())
        })
        .collect();
    let adapter = LoraAdapter::from_tensors("random".into(), peft, &tensors, &cfg).unwrap();
    let unmerged = last_logits(&folder, Some(&adapter));
    let moved = max_abs_diff(&unmerged, &last_logits(&folder, None));
    assert!(moved > 1.0, "the adapter moves the logits: {moved}");

    let path = dir.path().join("merged-f16.gguf");
    write_merged_gguf(
        &hf,
        Some(&adapter),
        &cfg,
        GgufType::F16,
        "from-folder",
        &path,
    )
    .unwrap();
    let gguf = LoadedModel::load(&path, &dev).unwrap();
    // The GGUF is llama.cpp's layout: q/k interleaved, which the loader reads as such.
    assert_eq!(gguf.llama.config.architecture, "llama");
    assert_eq!(gguf.llama.config.num_layers, cfg.num_layers);
    assert_eq!(gguf.llama.config.vocab_size, cfg.vocab_size);
    assert_eq!(gguf.template.source(), folder.template.source());
    assert_eq!(gguf.tokenizer.bos_token(), folder.tokenizer.bos_token());
    assert_eq!(gguf.tokenizer.eos_token(), folder.tokenizer.eos_token());
    for text in [
        "What is the capital of France?",
        "Order #4521 ships on 2026-12-03 — £12.50, naïve café, 東京 😀\n\n  indented\tline",
        "<|im_start|>user\nHi there<|im_end|>\n",
    ] {
        assert_eq!(
            gguf.tokenizer.encode(text, false).unwrap(),
            folder.tokenizer.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    let mut f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.metadata["tokenizer.ggml.pre"].to_string().unwrap(),
        "smollm",
        "SmolLM2 splits digits one by one, as llama.cpp's smollm pre-tokenizer does"
    );
    // Reference: the folder's f32 weights running the adapter unmerged. What is left is
    // f16's rounding of the merged weights (the same tolerance as the GGUF-base export
    // above, measured there 0.022).
    let merged = last_logits(&gguf, None);
    let diff = max_abs_diff(&merged, &unmerged);
    eprintln!(
        "f16 GGUF from a folder: max logit difference from the unmerged folder model: {diff}"
    );
    assert!(diff < 0.05, "{diff}");
    assert_eq!(argmax(&merged), argmax(&unmerged));
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The qwen2 architecture (biases on q/k/v, q/k rows not permuted in GGUF files): a tiny
/// random qwen2 folder exports as a GGUF with the folder's logits; that GGUF, as a base,
/// exports a LoRA GGUF holding the adapter's pairs as they are and a merged GGUF with the
/// logits of the base running the adapter unmerged.
#[test]
fn a_qwen2_base_exports_lora_and_merged_ggufs() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let folder_dir = dir.path().join("qwen2");
    loraloop_model::testing::write_tiny_chat_model(&folder_dir, Default::default()).unwrap();
    let config_path = folder_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["model_type"] = "qwen2".into();
    config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let weights = folder_dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &dev).unwrap();
    for layer in 0..2 {
        for (p, rows) in [("q", 64), ("k", 32), ("v", 32)] {
            let v: Vec<f32> = (0..rows)
                .map(|i| ((i * 7 + layer * 3 + p.len()) as f32 * 0.37).sin() * 0.5)
                .collect();
            tensors.insert(
                format!("model.layers.{layer}.self_attn.{p}_proj.bias"),
                Tensor::from_vec(v, rows, &dev).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let folder = LoadedModel::load(&folder_dir, &dev).unwrap();
    assert_eq!(folder.llama.config.architecture, "qwen2");
    assert!(folder.llama.config.qkv_bias);
    let ids = folder
        .tokenizer
        .encode("Hello there, qwen!", false)
        .unwrap();
    let logits = |m: &LoadedModel, adapter: Option<&LoraAdapter>| -> Vec<f32> {
        let input = Tensor::new(&ids[..], &dev).unwrap().unsqueeze(0).unwrap();
        let mut cache = m.llama.new_cache();
        let out = m.llama.forward(&input, &mut cache, adapter).unwrap();
        out.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    };

    // Folder -> GGUF (f16). Reference: the folder in f32; what is left is f16's rounding.
    let base_path = dir.path().join("qwen2-f16.gguf");
    let cfg = folder.llama.config.clone();
    write_merged_gguf(&folder_dir, None, &cfg, GgufType::F16, "qwen2", &base_path).unwrap();
    let base = LoadedModel::load(&base_path, &dev).unwrap();
    assert_eq!(base.llama.config.architecture, "qwen2");
    assert!(base.llama.config.qkv_bias, "the biases travel");
    let d = max_abs_diff(&logits(&base, None), &logits(&folder, None));
    assert!(d < 0.01, "qwen2 GGUF from the folder: {d}");

    // An adapter for the GGUF base (its q/k rows in the file's order, which for qwen2 is
    // Hugging Face's).
    let gcfg = base.llama.config.clone();
    let peft = PeftConfig::new(4, 8.0, &Projection::ALL);
    let adapter_tensors: HashMap<String, Tensor> = random_peft_tensors(&gcfg, &peft, 0.2, &dev)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i as f64 * 4.1414).sin() * 9871.25).fract() * 0.35) as f32)
                .collect();
            (name, Tensor::from_vec(v, t.shape(), &dev).unwrap())
        })
        .collect();
    let adapter =
        LoraAdapter::from_tensors("random".into(), peft, &adapter_tensors, &gcfg).unwrap();
    let unmerged = logits(&base, Some(&adapter));
    let moved = max_abs_diff(&unmerged, &logits(&base, None));
    assert!(moved > 0.5, "the adapter moves the logits: {moved}");

    let lora_path = dir.path().join("adapter.gguf");
    write_gguf_lora(&adapter, &gcfg, &lora_path).unwrap();
    let mut f = std::io::BufReader::new(std::fs::File::open(&lora_path).unwrap());
    let content = gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "qwen2"
    );
    for (layer, p, a, b) in adapter.scaled_pairs().unwrap() {
        let stem = format!("blk.{layer}.{}.weight", p.gguf_name());
        for (side, want) in [("lora_a", &a), ("lora_b", &b)] {
            let got = content
                .tensor(&mut f, &format!("{stem}.{side}"), &dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{stem}.{side}");
        }
    }

    let merged_path = dir.path().join("merged.gguf");
    write_merged_gguf(
        &base_path,
        Some(&adapter),
        &gcfg,
        GgufType::F16,
        "m",
        &merged_path,
    )
    .unwrap();
    let merged = LoadedModel::load(&merged_path, &dev).unwrap();
    let d = max_abs_diff(&logits(&merged, None), &unmerged);
    eprintln!("qwen2 merged f16 vs unmerged: {d} (the adapter moved the logits {moved})");
    assert!(d < 0.02, "qwen2 merged: {d}");
}

#[test]
fn a_merge_stops_when_it_is_cancelled_and_writes_nothing() {
    use loraloop_model::export::{Export, ExportError, export_adapter};
    use std::sync::atomic::AtomicBool;
    let dev = Device::Cpu;
    let base = LoadedModel::load(&model_path(), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let peft = PeftConfig::new(4, 8.0, &[Projection::Q, Projection::V]);
    let tensors = random_peft_tensors(&base.llama.config, &peft, 0.01, &dev).unwrap();
    loraloop_model::lora::write_peft_dir(&dir.path().join("adapter"), &peft, &tensors).unwrap();
    // A download whose client left before the merge began: its first tensor is not read.
    let out = dir.path().join("merged.gguf");
    let e = export_adapter(
        &dir.path().join("adapter"),
        &model_path(),
        &base.llama.config,
        Export::Merged(GgufType::F16),
        "merged",
        &out,
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::Cancelled), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("adapter")]);
}
