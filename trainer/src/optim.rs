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
