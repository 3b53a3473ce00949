use candle_core::{Device, Tensor};
use std::time::Instant;
fn time(name: &str, flops: f64, f: &dyn Fn() -> Tensor) {
    f();
    let t = Instant::now();
    for _ in 0..3 {
        f();
    }
    let s = t.elapsed().as_secs_f64() / 3.0;
    println!("{name}: {:.1} ms, {:.1} GFLOPS", s * 1e3, flops / s / 1e9);
}
fn main() {
    let d = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &d).unwrap();
    let q = r(&[4, 3, 768, 64]);
    let k = r(&[4, 3, 256, 64]);
    let p = r(&[4, 3, 768, 256]);
    let fl = 2.0 * 12.0 * 768.0 * 256.0 * 64.0;
    time("q @ k.t()", fl, &|| q.matmul(&k.t().unwrap()).unwrap());
    time("p @ v", fl, &|| p.matmul(&k).unwrap());
    time("p.t() @ dy", fl, &|| p.t().unwrap().matmul(&q).unwrap());
    let h = r(&[256, 576]);
    let e = r(&[49152, 576]);
    let dl = r(&[256, 49152]);
    let fl = 2.0 * 256.0 * 576.0 * 49152.0;
    time("h @ E.t()", fl, &|| h.matmul(&e.t().unwrap()).unwrap());
    time("dl @ E", fl, &|| dl.matmul(&e).unwrap());
    let x = r(&[1024, 576]);
    let a = r(&[16, 576]);
    let b = r(&[1536, 16]);
    let u = r(&[1024, 16]);
    time("x @ A.t()", 2.0 * 1024.0 * 576.0 * 16.0, &|| {
        x.matmul(&a.t().unwrap()).unwrap()
    });
    time("u @ B.t()", 2.0 * 1024.0 * 1536.0 * 16.0, &|| {
        u.matmul(&b.t().unwrap()).unwrap()
    });
    let dy = r(&[1024, 1536]);
    time("dy.t() @ u", 2.0 * 1024.0 * 1536.0 * 16.0, &|| {
        dy.t().unwrap().matmul(&u).unwrap()
    });
    time("dy @ B", 2.0 * 1024.0 * 1536.0 * 16.0, &|| {
        dy.matmul(&b).unwrap()
    });
}
