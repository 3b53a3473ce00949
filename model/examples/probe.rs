use candle_core::{Device, Tensor};
use loraloop_model::engine::LoadedModel;
use std::time::Instant;
fn main() {
    let t0 = Instant::now();
    let m = LoadedModel::load(
        std::path::Path::new("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &Device::Cpu,
    )
    .unwrap();
    eprintln!("load {:?}", t0.elapsed());
    let mut cache = m.llama.new_cache();
    let t = Instant::now();
    let x = Tensor::new(
        &[[1u32, 9690, 198, 2683, 359, 253, 5356, 11173]],
        &Device::Cpu,
    )
    .unwrap();
    m.llama.forward(&x, &mut cache, None).unwrap();
    eprintln!("prefill 8 {:?}", t.elapsed());
    for _ in 0..10 {
        let t = Instant::now();
        let x = Tensor::new(&[[198u32]], &Device::Cpu).unwrap();
        m.llama.forward(&x, &mut cache, None).unwrap();
        eprintln!("step {:?}", t.elapsed());
    }
}
