//! LoRA adapters in Hugging Face PEFT's on-disk format, applied unmerged.
//!
//! `adapter_config.json` gives `r`, `lora_alpha`, `target_modules`, `use_rslora`;
//! `adapter_model.safetensors` holds `base_model.model.model.layers.{i}.{self_attn|mlp}.
//! {q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight` with A as `[r, in]` and B as `[out, r]`.
//! The delta on a projection is `scale * B (A x)`, `scale = alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA), as in PEFT's `LoraLayer`.

pub mod host;
mod peft;

pub use peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterError, PeftConfig, TargetModules, peft_name,
    random_peft_tensors, read_peft_dir, write_peft_dir,
};

use crate::llama::config::{LlamaConfig, Projection, RopeLayout};
use candle_core::{DType, Device, Tensor};
use host::{B_TILE as B_TILE_ROWS, HostLora};
use peft::parse_peft_name;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// One projection's LoRA weights, stored ready for the forward pass.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A^T`, `[in, r]`.
    a_t: Tensor,
    /// `scale * B^T`, `[r, out]`.
    b_t_scaled: Tensor,
    /// The same weights as plain row-major vectors (`A` `[r, in]`, `scale * B` `[out, r]`)
    /// for the CPU kernels, when the tensors live on the CPU in f32.
    host: Option<std::sync::Arc<HostLora>>,
}

/// Rows up to which the host path is used on a base weight other than Q4_1: decode
/// steps and short prompts.
const HOST_PATH_MAX_ROWS: usize = 8;

impl LoraPair {
    fn memory_bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        // The host copy: f32 and f16 of both (B padded to whole tiles).
        let host = self.host.as_ref().map_or(0, |h| {
            6 * h.rank() * (h.in_dim() + h.out_dim().next_multiple_of(B_TILE_ROWS))
        });
        tensor(&self.a_t) + tensor(&self.b_t_scaled) + host
    }

    /// `a`: `[r, in]`, `b`: `[out, r]` (PEFT layout).
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Self> {
        let b_scaled = (b * scale)?;
        let (r, in_dim) = a.dims2()?;
        let out_dim = b.dim(0)?;
        let host = if a.device().is_cpu()
            && a.dtype() == candle_core::DType::F32
            && b.dtype() == candle_core::DType::F32
        {
            let a = a.flatten_all()?.to_vec1::<f32>()?;
            let b = b_scaled.flatten_all()?.to_vec1::<f32>()?;
            Some(std::sync::Arc::new(HostLora::new(
                a, &b, r, in_dim, out_dim,
            )))
        } else {
            None
        };
        Ok(Self {
            a_t: a.t()?.contiguous()?,
            b_t_scaled: b_scaled.t()?.contiguous()?,
            host,
        })
    }

    /// The host copy of the weights, where there is one (CPU, f32).
    pub fn host(&self) -> Option<&HostLora> {
        self.host.as_deref()
    }

    /// `scale * B (A x)` for `x` `[.., in]`.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        // In the adapter's dtype (f32), back to the activations' (bf16 on CUDA).
        let y = x
            .reshape((rows, in_dim))?
            .to_dtype(self.a_t.dtype())?
            .matmul(&self.a_t)?
            .matmul(&self.b_t_scaled)?
            .to_dtype(x.dtype())?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("x has a last dimension") = self.b_t_scaled.dim(1)?;
        y.reshape(out)
    }

    /// `y + scale * B (A x)`. For a few rows on the CPU (decode) this is two small loops
    /// over host memory: the two `[1, in] x [in, r]` and `[1, r] x [r, out]` matmuls are
    /// far too small for the general matmul kernel, whose per-call overhead dominated the
    /// adapter's cost (420 such calls per token on the 135M model). (Q4_1 bases skip
    /// this: `crate::q4_1::forward_many` adds the delta inside the base matmul.)
    pub fn add_to(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim;
        match &self.host {
            Some(h)
                if rows <= HOST_PATH_MAX_ROWS
                    && x.dtype() == candle_core::DType::F32
                    && y.dtype() == candle_core::DType::F32 =>
            {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
                h.add_delta(&xs, &mut ys);
                Tensor::from_vec(ys, y.shape(), y.device())
            }
            _ => y + self.delta(x)?,
        }
    }
}

/// The LoRA pairs of one block, by projection.
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    modules: [Option<LoraPair>; 7],
}

impl LayerLora {
    pub fn get(&self, p: Projection) -> Option<&LoraPair> {
        self.modules[p.index()].as_ref()
    }
}

/// A loaded adapter, validated against one base model.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// A label for logs and stored replies (the folder name by default).
    pub name: String,
    pub config: PeftConfig,
    pub targets: BTreeSet<Projection>,
    layers: Vec<LayerLora>,
}

impl LoraAdapter {
    pub fn layer(&self, i: usize) -> Option<&LayerLora> {
        self.layers.get(i)
    }

    /// Every pair as `(layer, projection, A [r, in], scale * B [out, r])`, B in the row
    /// order of the base model it was loaded for (llama.cpp's for a llama GGUF base).
    pub fn scaled_pairs(&self) -> candle_core::Result<Vec<(usize, Projection, Tensor, Tensor)>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(pair) = layer.get(p) {
                    out.push((
                        i,
                        p,
                        pair.a_t.t()?.contiguous()?,
                        pair.b_t_scaled.t()?.contiguous()?,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Bytes the adapter holds in memory: its tensors and their host copies.
    pub fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.modules.iter().flatten())
            .map(LoraPair::memory_bytes)
            .sum()
    }

    /// Load a PEFT adapter folder for `model`. Anything that does not fit the model
    /// (unknown names, wrong shapes, layers it does not have) is refused.
    pub fn load(dir: &Path, model: &LlamaConfig, device: &Device) -> Result<Self, AdapterError> {
        let (config, tensors) = read_peft_dir(dir, device)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        Self::from_tensors(name, config, &tensors, model)
    }

    /// Build from PEFT-named tensors (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn from_tensors(
        name: String,
        config: PeftConfig,
        tensors: &HashMap<String, Tensor>,
        model: &LlamaConfig,
    ) -> Result<Self, AdapterError> {
        config.check()?;
        let targets = config.targets()?;
        let scale = config.scale();
        type Sides<'t> = (Option<&'t Tensor>, Option<&'t Tensor>);
        let mut pairs: HashMap<(usize, Projection), Sides<'_>> = HashMap::new();
        for (key, t) in tensors {
            let (layer, proj, which) = parse_peft_name(key)?;
            if layer >= model.num_layers {
                return Err(AdapterError::Mismatch(format!(
                    "{key}: layer {layer} does not exist, the base model has {} layers",
                    model.num_layers
                )));
            }
            if !targets.contains(&proj) {
                return Err(AdapterError::Mismatch(format!(
                    "{key}: {proj} is not in target_modules"
                )));
            }
            let slot = pairs.entry((layer, proj)).or_default();
            if which == 'A' {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        if pairs.is_empty() {
            return Err(AdapterError::Mismatch(
                "the adapter holds no LoRA tensors".into(),
            ));
        }
        let mut layers = vec![LayerLora::default(); model.num_layers];
        for ((layer, proj), (a, b)) in pairs {
            let prefix = format!("layer {layer} {proj}");
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(AdapterError::Mismatch(format!(
                        "{prefix}: lora_A and lora_B must both be present"
                    )));
                }
            };
            let (inp, out) = model.projection_dims(proj);
            if a.dims() != [config.r, inp] {
                return Err(AdapterError::Mismatch(format!(
                    "{prefix}: lora_A has shape {:?}, expected [{}, {inp}] (r, in); hidden size or rank differ",
                    a.dims(),
                    config.r
                )));
            }
            if b.dims() != [out, config.r] {
                return Err(AdapterError::Mismatch(format!(
                    "{prefix}: lora_B has shape {:?}, expected [{out}, {}] (out, r)",
                    b.dims(),
                    config.r
                )));
            }
            let a = a.to_dtype(DType::F32)?;
            let mut b = b.to_dtype(DType::F32)?;
            for (side, t) in [("lora_A", &a), ("lora_B", &b)] {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                if let Some(bad) = values
                    .iter()
                    .find(|v| !v.is_finite() || v.abs() > peft::MAX_WEIGHT)
                {
                    return Err(AdapterError::Config(format!(
                        "{prefix}: {side} holds {bad}: weights must be finite and at most {} in size",
                        peft::MAX_WEIGHT
                    )));
                }
            }
            if model.rope_layout == RopeLayout::Interleaved {
                b = match proj {
                    Projection::Q => permute_for_interleaved_rope(&b, model.num_heads)?,
                    Projection::K => permute_for_interleaved_rope(&b, model.num_kv_heads)?,
                    _ => b,
                };
            }
            layers[layer].modules[proj.index()] = Some(LoraPair::new(&a, &b, scale)?);
        }
        Ok(Self {
            name,
            config,
            targets,
            layers,
        })
    }
}

/// llama.cpp's converter reorders the rows of q_proj/k_proj for llama GGUF files
/// (`LlamaModel.permute` in `convert_hf_to_gguf.py`:
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)`).
/// A PEFT adapter is trained against the Hugging Face row order, so its `B` (the output
/// side) gets the same reordering to apply to GGUF weights.
pub fn permute_for_interleaved_rope(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_path_adds_what_the_matmul_path_adds() {
        // Reference: `y + x A^T (scale B)^T` through candle's general matmul (`delta`).
        let dev = candle_core::Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (16, 96), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (40, 16), &dev).unwrap();
        let pair = LoraPair::new(&a, &b, 0.5).unwrap();
        assert!(pair.host.is_some());
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 96), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (1, rows, 40), &dev).unwrap();
            let fast = pair.add_to(&x, &y).unwrap();
            let reference = (&y + pair.delta(&x).unwrap()).unwrap();
            let diff = crate::testing::max_abs(&(fast - reference).unwrap());
            assert!(diff < 1e-3, "rows {rows}: max difference {diff}");
        }
    }

    #[test]
    fn peft_names_parse_into_layer_projection_and_side() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight")
                .unwrap(),
            (12, Projection::Down, 'B')
        );
        assert_eq!(
            parse_peft_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            )
            .unwrap(),
            (0, Projection::Q, 'A')
        );
        assert!(
            parse_peft_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight").is_err()
        );
        assert!(parse_peft_name("base_model.model.lm_head.lora_A.weight").is_err());
        assert_eq!(
            peft_name(3, Projection::V, 'A'),
            "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"
        );
    }

    #[test]
    fn adapters_with_non_finite_or_absurd_values_are_refused() {
        let cfg = LlamaConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap();
        let dev = candle_core::Device::Cpu;
        let build = |alpha: f64, poison: Option<f32>| {
            let peft = PeftConfig::new(4, alpha, &[Projection::Q]);
            let mut tensors = random_peft_tensors(&cfg, &peft, 0.02, &dev).unwrap();
            if let Some(v) = poison {
                let key = peft_name(1, Projection::Q, 'B');
                let t = &tensors[&key];
                let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                values[5] = v;
                tensors.insert(key, Tensor::from_vec(values, t.dims(), &dev).unwrap());
            }
            LoraAdapter::from_tensors("a".into(), peft, &tensors, &cfg)
        };
        assert!(build(8.0, None).is_ok());
        for (alpha, poison) in [
            (8.0, Some(f32::NAN)),
            (8.0, Some(f32::INFINITY)),
            (8.0, Some(-3e5)),
            (f64::NAN, None),
            (f64::INFINITY, None),
            (0.0, None),
            (-8.0, None),
            (1e9, None),
        ] {
            let e = build(alpha, poison).expect_err("refused");
            assert!(
                matches!(e, AdapterError::Config(_)),
                "alpha {alpha} poison {poison:?}: {e}"
            );
        }
    }

    #[test]
    fn scale_follows_peft_with_and_without_rslora() {
        let mut c = PeftConfig::new(16, 32.0, &[Projection::Q]);
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0); // 32 / sqrt(16)
    }

    #[test]
    fn target_modules_accept_lists_all_linear_and_regexes() {
        let mut c = PeftConfig::new(8, 16.0, &[Projection::Q, Projection::V]);
        assert_eq!(
            c.targets().unwrap(),
            [Projection::Q, Projection::V].into_iter().collect()
        );
        c.target_modules = TargetModules::One("all-linear".into());
        assert_eq!(c.targets().unwrap().len(), 7);
        c.target_modules = TargetModules::One(r".*\.(q_proj|k_proj)".into());
        assert_eq!(
            c.targets().unwrap(),
            [Projection::Q, Projection::K].into_iter().collect()
        );
        c.target_modules = TargetModules::List(vec!["c_attn".into()]);
        assert!(c.targets().is_err());
    }

    #[test]
    fn the_gguf_row_permutation_matches_llama_cpp_on_a_small_example() {
        // numpy, as in convert_hf_to_gguf.py's permute with n_head = 2, rows = 8, cols = 1:
        //   np.arange(8).reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8, 1).ravel()
        //   -> [0, 2, 1, 3, 4, 6, 5, 7]
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_for_interleaved_rope(&w, 2).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }
}
