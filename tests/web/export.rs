//! `GET /api/v1/adapters/{id}/export`: a trained adapter as a llama.cpp LoRA GGUF, read
//! back with candle's GGUF reader (the one the project loads models with); a merged
//! export of a base that is not a GGUF is refused with the reason.

use crate::support::{active_adapter, start};
use candle_core::quantized::gguf_file;

#[tokio::test]
async fn an_adapter_exports_as_a_lora_gguf_and_a_merged_export_needs_a_gguf_base() {
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
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GGUF base"),
        "{v}"
    );
    let r = s
        .get(&format!("/api/v1/adapters/{adapter_id}/export?format=onnx"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    s.stop().await;
}
