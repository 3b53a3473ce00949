//! ResNet-18/34/50 (torchvision's layout, which timm's ResNets share) with a fresh `fc`
//! head. The architecture is read off the weights (bottleneck blocks or not, blocks per
//! stage, stem width), so a folder of torchvision or timm safetensors needs no config.
//! In training mode every batch norm, frozen or not, normalizes with the batch's
//! statistics and updates its running ones, as PyTorch's `model.train()` does; evaluation
//! uses the running statistics.

use super::lora::{self, Mode};
use super::ops::{self, DTYPE};
use super::params::Params;
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Bottleneck blocks (ResNet-50 and up) rather than basic ones.
    pub bottleneck: bool,
    /// Blocks per stage, e.g. [2, 2, 2, 2] for ResNet-18.
    pub layers: Vec<usize>,
    /// Channels of the stem and the first stage (64 in the standard models).
    pub width: usize,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl ResNetConfig {
    /// `resnet18`, `resnet34` or `resnet50`.
    pub fn named(name: &str) -> Option<Self> {
        let (bottleneck, layers) = match name.to_ascii_lowercase().as_str() {
            "resnet18" => (false, vec![2, 2, 2, 2]),
            "resnet34" => (false, vec![3, 4, 6, 3]),
            "resnet50" => (true, vec![3, 4, 6, 3]),
            _ => return None,
        };
        Some(Self {
            bottleneck,
            layers,
            width: 64,
        })
    }

    /// The architecture the weights describe; `None` when they are not a ResNet's.
    pub fn from_weights<T>(weights: &HashMap<String, T>, stem_width: usize) -> Option<Self> {
        if !weights.contains_key("conv1.weight") || !weights.contains_key("layer1.0.conv1.weight") {
            return None;
        }
        let bottleneck = weights.contains_key("layer1.0.conv3.weight");
        let mut layers = Vec::new();
        for stage in 1.. {
            let n = (0..)
                .take_while(|b| weights.contains_key(&format!("layer{stage}.{b}.conv1.weight")))
                .count();
            if n == 0 {
                break;
            }
            layers.push(n);
        }
        Some(Self {
            bottleneck,
            layers,
            width: stem_width,
        })
    }

    fn expansion(&self) -> usize {
        if self.bottleneck { 4 } else { 1 }
    }

    /// Width of the features the head reads.
    pub fn features(&self) -> usize {
        self.width * (1 << (self.layers.len() - 1)) * self.expansion()
    }

    /// The convolutions in a block, by name suffix.
    fn block_convs(&self) -> &'static [&'static str] {
        if self.bottleneck {
            &["conv1", "conv2", "conv3"]
        } else {
            &["conv1", "conv2"]
        }
    }
}

/// The weights LoRA attaches to: every convolution inside the residual blocks (not the
/// stem, not the 1x1 shortcuts).
pub fn lora_targets(cfg: &ResNetConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (s, &n) in cfg.layers.iter().enumerate() {
        for b in 0..n {
            for c in cfg.block_convs() {
                out.push(format!("layer{}.{b}.{c}.weight", s + 1));
            }
        }
    }
    out
}

/// Which stage a weight belongs to: `Some(i)` (0-based) for `layer{i+1}`, `None` for the
/// stem and the head.
pub fn stage_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("layer")?;
    let n: usize = rest.split('.').next()?.parse().ok()?;
    n.checked_sub(1)
}

/// Whether a weight is a batch norm's running statistic (a buffer, never trained).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// New running statistics a training pass computed: (name, tensor).
pub type BnUpdates = Vec<(String, Tensor)>;

/// Logits `[batch, classes]` for normalized images `[batch, 3, h, w]`.
pub fn forward(
    p: &Params,
    cfg: &ResNetConfig,
    x: &Tensor,
    mode: Mode,
    updates: &mut BnUpdates,
) -> Result<Tensor> {
    let mut x = stem(p, x, mode, updates)?;
    for (pre, stride) in blocks(cfg) {
        x = block(p, cfg, &x, &pre, stride, mode, updates)?;
    }
    head(p, &x, mode)
}

/// The head on the last block's output: global average pool and `fc`.
pub fn head(p: &Params, x: &Tensor, mode: Mode) -> Result<Tensor> {
    lora::linear(p, &ops::global_avg_pool(x)?, "fc", mode)
}

/// The stem: the 7x7/2 convolution, its batch norm, ReLU and the 3x3/2 max-pool.
pub fn stem(p: &Params, x: &Tensor, mode: Mode, updates: &mut BnUpdates) -> Result<Tensor> {
    let x = lora::conv2d(p, x, "conv1.weight", 2, 3, mode)?;
    let x = bn(p, &x, "bn1", mode, updates)?.relu()?;
    ops::max_pool_3x3_s2(&x)
}

/// The residual blocks in order: (weight-name prefix, stride).
pub fn blocks(cfg: &ResNetConfig) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (s, &n) in cfg.layers.iter().enumerate() {
        for b in 0..n {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            out.push((format!("layer{}.{b}", s + 1), stride));
        }
    }
    out
}

/// One residual block (basic or bottleneck) with its shortcut.
pub fn block(
    p: &Params,
    cfg: &ResNetConfig,
    x: &Tensor,
    pre: &str,
    stride: usize,
    mode: Mode,
    updates: &mut BnUpdates,
) -> Result<Tensor> {
    let mut h = x.clone();
    let convs = cfg.block_convs();
    for (i, c) in convs.iter().enumerate() {
        let w = p.get(&format!("{pre}.{c}.weight"))?;
        let k = w.dim(2)?;
        // torchvision's v1.5 bottleneck strides in its 3x3; a basic block in its first conv.
        let s = if (cfg.bottleneck && i == 1) || (!cfg.bottleneck && i == 0) {
            stride
        } else {
            1
        };
        h = lora::conv2d(p, &h, &format!("{pre}.{c}.weight"), s, k / 2, mode)?;
        h = bn(p, &h, &format!("{pre}.bn{}", i + 1), mode, updates)?;
        if i + 1 < convs.len() {
            h = h.relu()?;
        }
    }
    let shortcut = if p.contains(&format!("{pre}.downsample.0.weight")) {
        let d = lora::conv2d(p, x, &format!("{pre}.downsample.0.weight"), stride, 0, mode)?;
        bn(p, &d, &format!("{pre}.downsample.1"), mode, updates)?
    } else {
        x.clone()
    };
    (h + shortcut)?.relu()
}

fn bn(p: &Params, x: &Tensor, stem: &str, mode: Mode, updates: &mut BnUpdates) -> Result<Tensor> {
    let weight_name = format!("{stem}.weight");
    let (w, b) = (p.get(&weight_name)?, p.get(&format!("{stem}.bias"))?);
    let (rm_name, rv_name) = (
        format!("{stem}.running_mean"),
        format!("{stem}.running_var"),
    );
    if !mode.train {
        return ops::batch_norm(x, &p.get(&rm_name)?, &p.get(&rv_name)?, &w, &b, BN_EPS);
    }
    let (mean, var) = ops::channel_stats(x)?;
    let (n, _, h, wd) = x.dims4()?;
    let count = (n * h * wd) as f64;
    let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?.flatten_all()?;
    let rm = ((p.get(&rm_name)? * (1.0 - BN_MOMENTUM))?
        + (mean.detach().flatten_all()? * BN_MOMENTUM)?)?;
    let rv = ((p.get(&rv_name)? * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
    updates.push((rm_name, rm));
    updates.push((rv_name, rv));
    ops::batch_norm(x, &mean, &var, &w, &b, BN_EPS)
}

/// A fresh `fc` head for `classes` classes (PyTorch's `nn.Linear` init).
pub fn add_head(p: &mut Params, cfg: &ResNetConfig, classes: usize, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = p.device().clone();
    let f = cfg.features();
    let bound = 1.0 / (f as f32).sqrt();
    p.insert("fc.weight", uniform(&mut rng, &[classes, f], bound, &dev)?)?;
    p.insert("fc.bias", uniform(&mut rng, &[classes], bound, &dev)?)
}

/// Random weights with torchvision's init (Kaiming-normal fan-out convolutions, batch
/// norms 1 and 0, running statistics 0 and 1); no head.
pub fn random_weights(
    cfg: &ResNetConfig,
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let mut conv = |w: &mut HashMap<String, Tensor>,
                    name: String,
                    out: usize,
                    inp: usize,
                    k: usize|
     -> Result<()> {
        let std = (2.0 / (out * k * k) as f64).sqrt();
        w.insert(
            name,
            super::bert::normal(&mut rng, &[out, inp, k, k], std, dev)?,
        );
        Ok(())
    };
    let bn = |w: &mut HashMap<String, Tensor>, stem: String, c: usize| -> Result<()> {
        w.insert(format!("{stem}.weight"), Tensor::ones(c, DTYPE, dev)?);
        w.insert(format!("{stem}.bias"), Tensor::zeros(c, DTYPE, dev)?);
        w.insert(
            format!("{stem}.running_mean"),
            Tensor::zeros(c, DTYPE, dev)?,
        );
        w.insert(format!("{stem}.running_var"), Tensor::ones(c, DTYPE, dev)?);
        Ok(())
    };
    conv(&mut w, "conv1.weight".into(), cfg.width, 3, 7)?;
    bn(&mut w, "bn1".into(), cfg.width)?;
    let exp = cfg.expansion();
    let mut inp = cfg.width;
    for (s, &n) in cfg.layers.iter().enumerate() {
        let planes = cfg.width << s;
        for b in 0..n {
            let pre = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            if cfg.bottleneck {
                conv(&mut w, format!("{pre}.conv1.weight"), planes, inp, 1)?;
                bn(&mut w, format!("{pre}.bn1"), planes)?;
                conv(&mut w, format!("{pre}.conv2.weight"), planes, planes, 3)?;
                bn(&mut w, format!("{pre}.bn2"), planes)?;
                conv(
                    &mut w,
                    format!("{pre}.conv3.weight"),
                    planes * exp,
                    planes,
                    1,
                )?;
                bn(&mut w, format!("{pre}.bn3"), planes * exp)?;
            } else {
                conv(&mut w, format!("{pre}.conv1.weight"), planes, inp, 3)?;
                bn(&mut w, format!("{pre}.bn1"), planes)?;
                conv(&mut w, format!("{pre}.conv2.weight"), planes, planes, 3)?;
                bn(&mut w, format!("{pre}.bn2"), planes)?;
            }
            if stride != 1 || inp != planes * exp {
                conv(
                    &mut w,
                    format!("{pre}.downsample.0.weight"),
                    planes * exp,
                    inp,
                    1,
                )?;
                bn(&mut w, format!("{pre}.downsample.1"), planes * exp)?;
            }
            inp = planes * exp;
        }
    }
    Ok(w)
}

fn uniform(rng: &mut StdRng, shape: &[usize], bound: f32, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(v, shape, dev)
}
