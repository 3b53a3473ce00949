//! The real all-MiniLM-L6-v2 (`loraloop models fetch minilm`; the test command fetches it)
//! read by loraloop's encoder: its tokenizer gives transformers' ids and its mean-pooled
//! output matches transformers' BertModel on the same folder, as computed once by
//! `tests/fixtures/classify/minilm_reference.py` (PyTorch 2.15, transformers 5.23).

use candle_core::Device;
use loraloop_model::classify::bert::{self, Pooling};
use loraloop_model::classify::lora::Mode;
use loraloop_model::classify::{Arch, load_base, text};
use std::path::Path;

#[test]
fn minilm_tokens_and_pooled_output_match_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("data/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "run `loraloop models fetch minilm` first (scripts/test.sh does)"
    );
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("model/tests/fixtures/classify/minilm_expected.json"))
            .unwrap(),
    )
    .unwrap();
    let base = load_base(&dir, 224, None, 0, &Device::Cpu).unwrap();
    let Arch::Bert {
        config,
        pooling,
        max_length,
    } = &base.arch
    else {
        panic!("not an encoder")
    };
    assert_eq!(
        *pooling,
        Pooling::Mean,
        "a sentence-transformers folder pools by the mean"
    );
    assert_eq!(
        *max_length, 256,
        "sentence_bert_config.json's max_seq_length"
    );
    assert_eq!((config.hidden_size, config.num_hidden_layers), (384, 6));
    let texts: Vec<&str> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let tok = base.tokenizer.as_ref().unwrap();
    let (ids, mask) = text::encode_batch(tok, &texts, 256, &Device::Cpu).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), want);
    let pooled = bert::encode(&base.params, config, *pooling, &ids, &mask, Mode::eval()).unwrap();
    let ours: Vec<Vec<f32>> = pooled.to_vec2().unwrap();
    let theirs: Vec<Vec<f32>> = serde_json::from_value(exp["pooled"].clone()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        let max = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            max < 1e-4,
            "pooled output differs from transformers by {max}"
        );
    }
}
