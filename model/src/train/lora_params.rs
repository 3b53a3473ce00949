//! The trainable LoRA weights of a run, by layer and projection, in PEFT's names.

use crate::llama::{Llama, LlamaConfig, Projection, RopeLayout};
use crate::lora::{LoraAdapter, PeftConfig, peft_name};
use candle_core::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// A trainable LoRA pair: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAb {
    pub a: Tensor,
    pub b: Tensor,
}

/// The trainable LoRA parameters of a whole model (Hugging Face row order).
#[derive(Debug, Clone)]
pub struct LoraParams {
    pub config: PeftConfig,
    pub scale: f64,
    pub layers: Vec<[Option<LoraAb>; 7]>,
}

impl LoraParams {
    /// PEFT's initialisation: `A ~ kaiming_uniform(a = sqrt(5))`, i.e. uniform in
    /// `±1/sqrt(in)`, and `B = 0`, so training starts from the base model exactly.
    pub fn init(
        config: PeftConfig,
        model: &LlamaConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let targets = config
            .targets()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let r = config.r;
        let mut layers = Vec::with_capacity(model.num_layers);
        for _ in 0..model.num_layers {
            let mut slots: [Option<LoraAb>; 7] = Default::default();
            for p in Projection::ALL {
                if !targets.contains(&p) {
                    continue;
                }
                let (inp, out) = model.projection_dims(p);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                slots[p.index()] = Some(LoraAb {
                    a: Tensor::from_vec(a, (r, inp), device)?.to_dtype(dtype)?,
                    b: Tensor::zeros((out, r), dtype, device)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self {
            scale: config.scale(),
            config,
            layers,
        })
    }

    /// From PEFT-named tensors (an adapter folder), checked against the model.
    pub fn from_tensors(
        config: PeftConfig,
        tensors: &HashMap<String, Tensor>,
        model: &LlamaConfig,
        dtype: DType,
    ) -> std::result::Result<Self, crate::lora::AdapterError> {
        // Validate names and shapes with the inference loader's checks.
        let mut hf = model.clone();
        hf.rope_layout = RopeLayout::Halves;
        LoraAdapter::from_tensors("check".into(), config.clone(), tensors, &hf)?;
        let targets = config.targets()?;
        let mut layers = Vec::with_capacity(model.num_layers);
        for layer in 0..model.num_layers {
            let mut slots: [Option<LoraAb>; 7] = Default::default();
            for p in &targets {
                if let (Some(a), Some(b)) = (
                    tensors.get(&peft_name(layer, *p, 'A')),
                    tensors.get(&peft_name(layer, *p, 'B')),
                ) {
                    slots[p.index()] = Some(LoraAb {
                        a: a.to_dtype(dtype)?,
                        b: b.to_dtype(dtype)?,
                    });
                }
            }
            layers.push(slots);
        }
        Ok(Self {
            scale: config.scale(),
            config,
            layers,
        })
    }

    /// PEFT-named tensors (f32), ready for `write_peft_dir`.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, t) in self.named_params() {
            out.insert(name, t.to_dtype(DType::F32)?);
        }
        Ok(out)
    }

    pub fn named_params(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(ab) = &slots[p.index()] {
                    out.push((peft_name(i, p, 'A'), &ab.a));
                    out.push((peft_name(i, p, 'B'), &ab.b));
                }
            }
        }
        out
    }

    pub fn param_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        let rest = name.strip_prefix("base_model.model.model.layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let slots = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        let parts: Vec<&str> = rest.split('.').collect();
        let [_, module, which, "weight"] = parts.as_slice() else {
            return None;
        };
        let ab = slots[Projection::from_hf_name(module)?.index()].as_mut()?;
        match *which {
            "lora_A" => Some(&mut ab.a),
            "lora_B" => Some(&mut ab.b),
            _ => None,
        }
    }

    /// An inference adapter with these weights, for `model` (which may be a GGUF model in
    /// interleaved rope layout: the inference loader permutes `B` as for any PEFT adapter).
    pub fn to_adapter(
        &self,
        name: &str,
        model: &Llama,
    ) -> std::result::Result<LoraAdapter, crate::lora::AdapterError> {
        let tensors = self.to_tensors()?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&model.device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        LoraAdapter::from_tensors(name.into(), self.config.clone(), &tensors, &model.config)
    }
}
