use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &d).unwrap();
    let x = r(&[1024, 576]);
    let g = r(&[576]);
    let ws: Vec<Tensor> = (0..30).map(|_| r(&[1536, 576])).collect();
    for mode in 0..3 {
        let t = Instant::now();
        let mut mmt = 0.0;
        for w in &ws {
            let xx = if mode == 0 {
                x.clone()
            } else {
                candle_nn::ops::rms_norm(&x, &g, 1e-5).unwrap()
            };
            if mode == 2 {
                let _ = (&xx * 2.0).unwrap().exp().unwrap();
            }
            let t2 = Instant::now();
            let y = xx.matmul(&w.t().unwrap()).unwrap();
            mmt += t2.elapsed().as_secs_f64();
            drop(y);
        }
        println!(
            "mode {mode}: total {:.3}s, matmul {:.3}s, {:.1} GFLOPS",
            t.elapsed().as_secs_f64(),
            mmt,
            2.0 * 1024.0 * 1536.0 * 576.0 * 30.0 / mmt / 1e9
        );
    }
}
