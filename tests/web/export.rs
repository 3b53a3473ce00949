//! `GET /api/v1/adapters/{id}/export`: a trained adapter as a llama.cpp LoRA GGUF, read
//! back with candle's GGUF reader (the one the project loads models with), and the served
//! model (a Hugging Face folder here) with it merged in, as a GGUF that carries the
//! model's settings, tokenizer and chat template.

use crate::support::{active_adapter, start};
use candle_core::quantized::gguf_file;

#[tokio::test]
async fn an_adapter_exports_as_a_lora_gguf_and_merged_into_a_folder_base_as_a_gguf() {
    let s = start(true, &[]).await;
    let (_, adapter_id, name) = active_adapter(&s).await;
    let r = s
        .get(&format!("/api/v1/adapters/{adapter_id}/export?format=lora"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{name}.gguf\"").as_str()
    );
    let bytes = r.bytes().await.unwrap().to_vec();
    let mut cursor = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cursor).unwrap();
    let md = |k: &str| content.metadata[k].clone();
    assert_eq!(md("general.type").to_string().unwrap(), "adapter");
    assert_eq!(md("adapter.type").to_string().unwrap(), "lora");
    assert_eq!(md("general.name").to_string().unwrap(), &name);
    // The support adapter: rank 4 on every projection of the tiny model's 2 layers.
    assert_eq!(md("adapter.lora.alpha").to_f32().unwrap(), 4.0);
    assert_eq!(content.tensor_infos.len(), 2 * 7 * 2);
    let a = content
        .tensor(
            &mut cursor,
            "blk.1.attn_q.weight.lora_a",
            &candle_core::Device::Cpu,
        )
        .unwrap();
    assert_eq!(a.shape().dims()[0], 4, "lora_a is [r, in]");

    let r = s
        .get(&format!(
            "/api/v1/adapters/{adapter_id}/export?format=merged&type=f16"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{name}-merged-f16.gguf\"").as_str()
    );
    let bytes = r.bytes().await.unwrap().to_vec();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).unwrap();
    let md = |k: &str| content.metadata[k].clone();
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(md("llama.block_count").to_u32().unwrap(), 2);
    assert_eq!(md("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
    // The tiny model's byte-level vocabulary: 256 bytes and the two ChatML markers.
    assert_eq!(md("tokenizer.ggml.tokens").to_vec().unwrap().len(), 258);
    assert!(
        md("tokenizer.chat_template")
            .to_string()
            .unwrap()
            .contains("<|im_start|>")
    );
    // Every projection of both layers, the norms, the embedding (tied: no output.weight).
    assert_eq!(content.tensor_infos.len(), 1 + 2 * (7 + 2) + 1);
    let r = s
        .get(&format!("/api/v1/adapters/{adapter_id}/export?format=onnx"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    s.stop().await;
}
