//! AdamW (PyTorch's `torch.optim.AdamW` update), gradient clipping by global norm, and
//! the learning-rate schedules of transformers' `get_scheduler` (constant, linear and
//! cosine, each with linear warmup).

use candle_core::{DType, Tensor};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(format!(
                "unknown lr_scheduler {s:?}; expected constant, linear or cosine"
            )),
        }
    }
}

impl Scheduler {
    /// The multiplier of the peak learning rate at optimizer step `step` (0-based), as
    /// transformers computes it: `step / warmup` during warmup, then 1 (constant),
    /// `(total - step) / (total - warmup)` (linear) or
    /// `0.5 (1 + cos(pi (step - warmup) / (total - warmup)))` (cosine).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / span;
        match self {
            Self::Constant => 1.0,
            Self::Linear => (1.0 - progress).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // torch.optim.AdamW's defaults, except weight decay (transformers' default 0.0).
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW moments by parameter name.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (bias correction).
    pub t: u64,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            t: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// One update of `param` with `grad` at learning rate `lr`, for the step counted by
    /// [`begin_step`](Self::begin_step):
    /// `p -= lr wd p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    ///  p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
    pub fn update(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
    ) -> candle_core::Result<Tensor> {
        let c = self.config;
        let grad = grad.to_dtype(DType::F32)?;
        let m = match self.m.get(name) {
            Some(m) => ((m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?,
            None => (&grad * (1.0 - c.beta1))?,
        };
        let v = match self.v.get(name) {
            Some(v) => ((v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?,
            None => (grad.sqr()? * (1.0 - c.beta2))?,
        };
        let t = self.t.max(1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let p = param.to_dtype(DType::F32)?;
        let p = if c.weight_decay > 0.0 {
            (&p * (1.0 - lr * c.weight_decay))?
        } else {
            p
        };
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let p = (p - ((&m / bc1)? / denom)? * lr)?;
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        p.to_dtype(param.dtype())
    }

    /// Count one optimizer step (before its updates).
    pub fn begin_step(&mut self) {
        self.t += 1;
    }
}

/// AdamW moments kept on the host for [`AdamW::step_in_place`].
#[derive(Debug, Default)]
pub struct HostMoments {
    m: HashMap<String, Vec<f32>>,
    v: HashMap<String, Vec<f32>>,
}

/// Elements per write-back of [`AdamW::step_in_place`]: small enough that the staging
/// tensor is an ordinary reused allocation, not fresh pages for the kernel to zero.
const IN_PLACE_CHUNK: usize = 1 << 16;

impl AdamW {
    /// [`update`](Self::update) of an f32 CPU weight (`scale` times `grad`), written into
    /// the weight's own storage chunk by chunk, with the moments on the host: one pass
    /// and no weight-sized allocation, where the tensor version allocates about ten (a
    /// full fine-tune's 47 MB word embeddings made the kernel zero fresh pages for a
    /// sixth of each step). `false` when the weight or gradient is not f32 on the CPU
    /// and contiguous (use `update`).
    pub fn step_in_place(
        &mut self,
        host: &mut HostMoments,
        name: &str,
        param: &Tensor,
        grad: &Tensor,
        scale: f64,
        lr: f64,
    ) -> candle_core::Result<bool> {
        use candle_core::Storage;
        let host_ok = |t: &Tensor| {
            let (s, l) = t.storage_and_layout();
            matches!(&*s, Storage::Cpu(_)) && t.dtype() == DType::F32 && l.is_contiguous()
        };
        if !host_ok(param) || !host_ok(grad) || param.elem_count() != grad.elem_count() {
            return Ok(false);
        }
        let c = self.config;
        let n = param.elem_count();
        let m = host
            .m
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; n]);
        let v = host
            .v
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; n]);
        let t = self.t.max(1) as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (step, bc2_sqrt) = ((lr / bc1) as f32, bc2.sqrt() as f32);
        let flat = param.flatten_all()?;
        let mut buf = vec![0f32; IN_PLACE_CHUNK.min(n)];
        let mut start = 0;
        while start < n {
            let len = IN_PLACE_CHUNK.min(n - start);
            {
                let (ps, pl) = param.storage_and_layout();
                let (gs, gl) = grad.storage_and_layout();
                let (Storage::Cpu(pc), Storage::Cpu(gc)) = (&*ps, &*gs) else {
                    candle_core::bail!("not on the host");
                };
                let p = &pc.as_slice::<f32>()?[pl.start_offset() + start..][..len];
                let g = &gc.as_slice::<f32>()?[gl.start_offset() + start..][..len];
                let (m, v) = (&mut m[start..start + len], &mut v[start..start + len]);
                for i in 0..len {
                    let gi = g[i] * scale as f32;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    // p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps), with
                    // sqrt(v / bc2) = sqrt(v) / sqrt(bc2).
                    buf[i] = p[i] * decay - step * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
                }
            }
            let chunk = Tensor::from_slice(&buf[..len], len, param.device())?;
            flat.slice_set(&chunk, 0, start)?;
            start += len;
        }
        Ok(true)
    }
}

/// The global L2 norm of all gradients.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a Tensor>) -> candle_core::Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_in_place_step_matches_the_tensor_step() {
        // Three steps of each on the same weights and gradients (weight decay on): the
        // same values to f32 rounding, and the in-place one writes the weight's storage.
        let dev = Device::Cpu;
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let w0 = Tensor::randn(0f32, 1.0, (300, 257), &dev).unwrap();
        let var = candle_core::Var::from_tensor(&w0).unwrap();
        let (mut a, mut b) = (AdamW::new(cfg), AdamW::new(cfg));
        let mut host = HostMoments::default();
        let mut reference = w0.clone();
        for k in 0..3 {
            let g = Tensor::randn(0f32, 1.0, (300, 257), &dev).unwrap();
            a.begin_step();
            b.begin_step();
            reference = a
                .update("w", &reference, &(&g * 0.5).unwrap(), 1e-2)
                .unwrap();
            assert!(
                b.step_in_place(&mut host, "w", var.as_tensor(), &g, 0.5, 1e-2)
                    .unwrap(),
                "step {k}"
            );
        }
        let diff = (var.as_tensor() - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let moved = (var.as_tensor() - &w0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn schedules_match_transformers_at_hand_computed_points() {
        // transformers' lambdas with warmup 10, total 110:
        // step 5 -> 5/10; step 10 -> start of decay; step 60 -> half way.
        assert_eq!(Scheduler::Linear.factor(5, 10, 110), 0.5);
        assert_eq!(Scheduler::Linear.factor(10, 10, 110), 1.0);
        assert_eq!(Scheduler::Linear.factor(60, 10, 110), 0.5);
        assert_eq!(Scheduler::Linear.factor(110, 10, 110), 0.0);
        assert!((Scheduler::Cosine.factor(60, 10, 110) - 0.5).abs() < 1e-12);
        // cos(pi / 4) at a quarter: 0.5 (1 + 0.70710678) = 0.85355339
        assert!((Scheduler::Cosine.factor(35, 10, 110) - 0.853_553_39).abs() < 1e-8);
        assert_eq!(Scheduler::Constant.factor(0, 0, 100), 1.0);
        assert_eq!(Scheduler::Constant.factor(2, 4, 100), 0.5);
        assert!("warmup_stable".parse::<Scheduler>().is_err());
    }

    #[test]
    fn adamw_takes_torchs_first_steps() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p = [1.0, -2.0] and
        // grads [0.5, -0.25] then [0.1, 0.3], computed by hand from the update rule:
        // step 1: p *= (1 - 0.1 * 0.01) -> [0.999, -1.998]; m_hat = g, v_hat = g^2, so
        //   p -= 0.1 * sign(g) (eps negligible) -> [0.899, -1.898]
        // step 2: p *= 0.999 -> [0.898101, -1.896102];
        //   m = [0.9*0.05 + 0.1*0.1, 0.9*-0.025 + 0.1*0.3] = [0.055, 0.0075]
        //   v = [0.999*0.00025 + 0.001*0.01, 0.999*0.0000625 + 0.001*0.09]
        //     = [0.00025975, 0.0001524375]
        //   m_hat = m / 0.19, v_hat = v / 0.001999
        //   p -= 0.1 * m_hat / sqrt(v_hat)
        let dev = Device::Cpu;
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        });
        let p = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        opt.begin_step();
        let p = opt
            .update("p", &p, &Tensor::new(&[0.5f32, -0.25], &dev).unwrap(), 0.1)
            .unwrap();
        let got: Vec<f32> = p.to_vec1().unwrap();
        assert!(
            (got[0] - 0.899).abs() < 1e-5 && (got[1] + 1.898).abs() < 1e-5,
            "{got:?}"
        );
        opt.begin_step();
        let p = opt
            .update("p", &p, &Tensor::new(&[0.1f32, 0.3], &dev).unwrap(), 0.1)
            .unwrap();
        let got: Vec<f32> = p.to_vec1().unwrap();
        let want = |p: f64, m: f64, v: f64| p - 0.1 * (m / 0.19) / ((v / 0.001_999).sqrt() + 1e-8);
        let w0 = want(0.898_101, 0.055, 0.000_259_75);
        let w1 = want(-1.896_102, 0.0075, 0.000_152_437_5);
        assert!((got[0] as f64 - w0).abs() < 1e-5, "{} vs {w0}", got[0]);
        assert!((got[1] as f64 - w1).abs() < 1e-5, "{} vs {w1}", got[1]);
    }
}
