//! The bf16 inference path (Hugging Face folders load in bf16 on CUDA) on the CPU, where
//! candle computes bf16 matmuls through f32: logits, with and without a LoRA adapter
//! (f32 weights on bf16 activations), prompt and decode steps, against the f32 path
//! (itself checked against a numpy reference in tiny_models.rs).

use candle_core::{DType, Device, Tensor};
use loraloop_model::llama::Llama;
use loraloop_model::llama::load::load_hf_dir;
use loraloop_model::lora::LoraAdapter;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Logits of a prompt pass and then two decode steps, concatenated, as f32.
fn logits(model: &Llama, adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let dev = &Device::Cpu;
    let mut cache = model.new_cache();
    let prompt = Tensor::new(&[1u32, 5, 9, 2, 7, 3], dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut out: Vec<f32> = model
        .forward_all(&prompt, &mut cache, adapter)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for t in [4u32, 6] {
        let x = Tensor::new(&[t], dev).unwrap().unsqueeze(0).unwrap();
        let l = model.forward(&x, &mut cache, adapter).unwrap();
        assert_eq!(l.dtype(), DType::F32, "logits come back in f32");
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// Largest difference relative to the largest logit.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let d = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    d / scale
}

// bf16 keeps 8 significant bits (relative rounding up to 2^-9 per value, weights and
// activations alike); the random fixture's large activations amplify that through the
// layers: observed 1.9% of the largest logit without the adapter and 6.3% with it (the
// fixture's adapter is strong: it moves the logits by 167% of the largest). 10% leaves
// room and still catches a wrong mask, rotary table or a dropped adapter (tested below).
const TOL: f64 = 0.1;

#[test]
fn bf16_logits_match_f32_with_and_without_an_adapter() {
    let f32m = load_hf_dir(&fixture("tiny-llama"), &Device::Cpu, DType::F32).unwrap();
    let bf16m = load_hf_dir(&fixture("tiny-llama"), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(bf16m.embed.dtype(), DType::BF16);
    let a32 = LoraAdapter::load(&fixture("tiny-llama-lora"), &f32m.config, &f32m.device).unwrap();
    let a16 = LoraAdapter::load(&fixture("tiny-llama-lora"), &bf16m.config, &bf16m.device).unwrap();

    let base = rel_diff(&logits(&bf16m, None), &logits(&f32m, None));
    let with = rel_diff(&logits(&bf16m, Some(&a16)), &logits(&f32m, Some(&a32)));
    assert!(base > 0.0, "bf16 rounding shows");
    assert!(base < TOL, "base {base}");
    assert!(with < TOL, "adapter {with}");

    // The comparison sees the adapter: bf16 with it against f32 without it is far off.
    let off = rel_diff(&logits(&bf16m, Some(&a16)), &logits(&f32m, None));
    assert!(
        off > TOL,
        "the adapter effect {off} (base {base}, with {with}) is within the tolerance"
    );
}
