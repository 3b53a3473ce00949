//! LoRA for the classifiers (PEFT's `LoraConfig` on `nn.Linear` and `nn.Conv2d`):
//! `W x + (alpha / r) * B(A(x))`, A random (Kaiming-uniform as PEFT), B zero, so training
//! starts from the base model's outputs. On a convolution A is a convolution with the
//! base's kernel, stride and padding into `r` channels and B a 1x1 convolution, as PEFT's
//! `Conv2d` LoRA layer. A checkpoint stores the merged weight `W + (alpha / r) * B A`.

use super::params::Params;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
        }
    }
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The factor names of the LoRA on weight `base` (`x.weight` -> `x.lora_A.weight`).
pub fn factor_names(base: &str) -> (String, String) {
    let stem = base.strip_suffix(".weight").unwrap_or(base);
    (
        format!("{stem}.lora_A.weight"),
        format!("{stem}.lora_B.weight"),
    )
}

/// Add trainable LoRA factors for the weight `base` (`[out, in]` or `[out, in, kh, kw]`).
pub fn attach(
    params: &mut Params,
    base: &str,
    spec: LoraSpec,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    let w = params.get(base)?;
    let dims = w.dims().to_vec();
    let (out, fan_in) = (dims[0], dims[1..].iter().product::<usize>());
    // PEFT: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    let bound = 1.0 / (fan_in as f64).sqrt();
    let (a_name, b_name) = factor_names(base);
    let mut a_shape = dims.clone();
    a_shape[0] = spec.r;
    let n: usize = a_shape.iter().product();
    let bound = bound as f32;
    let values: Vec<f32> = (0..n)
        .map(|_| rand::Rng::random_range(rng, -bound..bound))
        .collect();
    let a = Tensor::from_vec(values, a_shape, params.device())?;
    let b_shape: Vec<usize> = if dims.len() == 4 {
        vec![out, spec.r, 1, 1]
    } else {
        vec![out, spec.r]
    };
    let b = Tensor::zeros(b_shape, w.dtype(), params.device())?;
    params.insert_trainable(&a_name, a)?;
    params.insert_trainable(&b_name, b)
}

/// The merged weight of `base`: `W + scale * B A`, or `W` without LoRA.
pub fn merged(params: &Params, base: &str, scale: f64) -> Result<Tensor> {
    let w = params.get(base)?;
    let (a_name, b_name) = factor_names(base);
    let (Some(a), Some(b)) = (params.get_opt(&a_name)?, params.get_opt(&b_name)?) else {
        return Ok(w);
    };
    let r = a.dim(0)?;
    let out = b.dim(0)?;
    let delta = b
        .reshape((out, r))?
        .matmul(&a.reshape((r, a.elem_count() / r))?)?
        .reshape(w.shape())?;
    w + (delta * scale)?
}

/// Fold every LoRA into its base weight and drop the factors.
pub fn merge_all(
    params: &Params,
    scale: f64,
) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let mut out = std::collections::BTreeMap::new();
    for name in params.names() {
        if name.contains(".lora_A.") || name.contains(".lora_B.") {
            continue;
        }
        out.insert(name.clone(), merged(params, &name, scale)?.detach());
    }
    Ok(out)
}

/// How a forward pass runs: training (dropout on) or not, and the LoRA scale.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub train: bool,
    pub lora: Option<LoraSpec>,
}

impl Mode {
    pub fn eval() -> Self {
        Self {
            train: false,
            lora: None,
        }
    }
}

/// `x W^T + b` plus the LoRA branch where `W` has one.
pub fn linear(params: &Params, x: &Tensor, stem: &str, mode: Mode) -> Result<Tensor> {
    let base = format!("{stem}.weight");
    let w = params.get(&base)?;
    let b = params.get_opt(&format!("{stem}.bias"))?;
    let y = super::ops::linear(x, &w, b.as_ref())?;
    with_lora(params, &base, x, y, mode, |xin, a, lb| {
        super::ops::linear(&super::ops::linear(xin, a, None)?, lb, None)
    })
}

/// A bias-free 2-D convolution plus the LoRA branch where the kernel has one.
pub fn conv2d(
    params: &Params,
    x: &Tensor,
    base: &str,
    stride: usize,
    padding: usize,
    mode: Mode,
) -> Result<Tensor> {
    let w = params.get(base)?;
    let y = x.conv2d(&w, padding, stride, 1, 1)?;
    with_lora(params, base, x, y, mode, |xin, a, lb| {
        xin.conv2d(a, padding, stride, 1, 1)?.conv2d(lb, 0, 1, 1, 1)
    })
}

/// `y`, the base layer's output on `x`, plus `scale * delta(x', A, B)` where `base` has
/// LoRA factors and `mode` applies them; `x'` is `x` through dropout in training.
fn with_lora(
    params: &Params,
    base: &str,
    x: &Tensor,
    y: Tensor,
    mode: Mode,
    delta: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (a_name, b_name) = factor_names(base);
    match (
        mode.lora,
        params.get_opt(&a_name)?,
        params.get_opt(&b_name)?,
    ) {
        (Some(spec), Some(a), Some(lb)) => {
            let xin = if mode.train {
                super::ops::dropout(x, spec.dropout)?
            } else {
                x.clone()
            };
            y + (delta(&xin, &a, &lb)? * spec.scale())?
        }
        _ => Ok(y),
    }
}
