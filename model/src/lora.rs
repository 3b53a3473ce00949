//! LoRA adapters in Hugging Face PEFT's on-disk format, applied unmerged.
//!
//! `adapter_config.json` gives `r`, `lora_alpha`, `target_modules`, `use_rslora`;
//! `adapter_model.safetensors` holds `base_model.model.model.layers.{i}.{self_attn|mlp}.
//! {q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight` with A as `[r, in]` and B as `[out, r]`.
//! The delta on a projection is `scale * B (A x)`, `scale = alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA), as in PEFT's `LoraLayer`.

use crate::llama::{Llama, LlamaConfig, Projection, RopeLayout};
use crate::q4_1::dot_f32;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("adapter does not fit the base model: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The subset of PEFT's `LoraConfig` that changes the computation, plus what PEFT needs
/// to load our adapters (`peft_type`, `task_type`, ...). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT accepts a list of module names or one string (a regex, or `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl PeftConfig {
    pub fn new(r: usize, lora_alpha: f64, targets: &[Projection]) -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(
                targets.iter().map(|p| p.hf_name().to_string()).collect(),
            ),
            use_rslora: false,
            fan_in_fan_out: false,
            bias: default_bias(),
            base_model_name_or_path: None,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            inference_mode: true,
        }
    }

    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The projections this config targets.
    pub fn targets(&self) -> Result<BTreeSet<Projection>, AdapterError> {
        match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => Ok(Projection::ALL.into_iter().collect()),
            TargetModules::One(s) => {
                // A regex in PEFT; we accept the common `.*(q_proj|v_proj)` shape by name match.
                let found: BTreeSet<_> = Projection::ALL
                    .into_iter()
                    .filter(|p| s.contains(p.hf_name()))
                    .collect();
                if found.is_empty() {
                    return Err(AdapterError::Config(format!(
                        "target_modules {s:?} names none of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    )));
                }
                Ok(found)
            }
            TargetModules::List(names) => names
                .iter()
                .map(|n| {
                    let short = n.rsplit('.').next().unwrap_or(n);
                    Projection::from_hf_name(short).ok_or_else(|| {
                        AdapterError::Mismatch(format!(
                            "unknown target module {n:?}; a llama model has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                        ))
                    })
                })
                .collect(),
        }
    }

    fn check(&self) -> Result<(), AdapterError> {
        if !self.peft_type.eq_ignore_ascii_case("LORA") {
            return Err(AdapterError::Config(format!(
                "peft_type {:?} is not LORA",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(AdapterError::Config("r must be at least 1".into()));
        }
        if self.fan_in_fan_out {
            return Err(AdapterError::Config(
                "fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to llama models".into(),
            ));
        }
        if self.bias != "none" {
            return Err(AdapterError::Config(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            )));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(AdapterError::Config(
                "rank_pattern / alpha_pattern are not supported yet".into(),
            ));
        }
        Ok(())
    }
}

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

/// A LoRA pair in host memory, for the CPU paths (`crate::q4_1::forward_many` fuses it
/// into the base matmul).
#[derive(Debug)]
pub struct HostLora {
    r: usize,
    in_dim: usize,
    out_dim: usize,
    /// `A`, `[r, in]`: row `j` is what `x` is dotted with for `u[j]`.
    a: Vec<f32>,
    /// `scale * B` in tiles of `B_TILE` outputs: tile `k` holds, for each `j < r`, the
    /// `B_TILE` values `(sB)[k * B_TILE + i, j]` (zero past the last output). A worker
    /// that owns a tile of output rows adds `u[j]` times each of its `r` runs: contiguous
    /// multiply-adds with no horizontal sums, over memory read front to back (per-output
    /// dot products with horizontal sums, or a `[r, out]` layout read in scattered
    /// 64-byte pieces, each cost more than the arithmetic).
    b_tiles: Vec<f32>,
    /// `a` and `b_tiles` rounded to f16 (bit patterns), for the Q4_1 kernel: decode reads
    /// the whole adapter every token, so half the bytes is most of its cost, and f16's
    /// 11-bit mantissa is far finer than the 4-bit base weights it is added to (llama.cpp
    /// applies its LoRA adapters in f16 the same way).
    a16: Vec<u16>,
    b_tiles16: Vec<u16>,
}

impl HostLora {
    pub fn rank(&self) -> usize {
        self.r
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    /// Row `j` of `A`.
    pub fn a_row(&self, j: usize) -> &[f32] {
        &self.a[j * self.in_dim..(j + 1) * self.in_dim]
    }
    /// Tile `k` of `scale * B`: `r` runs of `B_TILE` outputs.
    pub fn b_tile(&self, k: usize) -> &[f32] {
        let len = self.r * B_TILE;
        &self.b_tiles[k * len..(k + 1) * len]
    }
    /// [`HostLora::a_row`] in f16.
    pub fn a_row16(&self, j: usize) -> &[u16] {
        &self.a16[j * self.in_dim..(j + 1) * self.in_dim]
    }
    /// [`HostLora::b_tile`] in f16.
    pub fn b_tile16(&self, k: usize) -> &[u16] {
        let len = self.r * B_TILE;
        &self.b_tiles16[k * len..(k + 1) * len]
    }
}

/// Output rows per tile of a host LoRA `B` (and per work item of the Q4_1 kernel).
pub(crate) const B_TILE: usize = 16;

/// Rows up to which the host path is used on a base weight other than Q4_1: decode
/// steps and short prompts.
const HOST_PATH_MAX_ROWS: usize = 8;

impl LoraPair {
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
            let b_tiles = tile_b(&b_scaled.flatten_all()?.to_vec1::<f32>()?, out_dim, r);
            let to16 = |v: &[f32]| -> Vec<u16> {
                v.iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect()
            };
            Some(std::sync::Arc::new(HostLora {
                r,
                in_dim,
                out_dim,
                a16: to16(&a),
                b_tiles16: to16(&b_tiles),
                a,
                b_tiles,
            }))
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
                let out_dim = y.dim(candle_core::D::Minus1)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
                let mut u = vec![0f32; h.r];
                for row in 0..rows {
                    let xr = &xs[row * in_dim..(row + 1) * in_dim];
                    for (j, uj) in u.iter_mut().enumerate() {
                        *uj = dot_f32(h.a_row(j), xr);
                    }
                    let yr = &mut ys[row * out_dim..(row + 1) * out_dim];
                    for (k, yt) in yr.chunks_mut(B_TILE).enumerate() {
                        for (&uj, bj) in u.iter().zip(h.b_tile(k).chunks_exact(B_TILE)) {
                            for (yo, b) in yt.iter_mut().zip(bj) {
                                *yo += uj * b;
                            }
                        }
                    }
                }
                Tensor::from_vec(ys, y.shape(), y.device())
            }
            _ => y + self.delta(x)?,
        }
    }
}

/// `b` (`[out, r]`, row-major) in the tiled layout of `HostLora::b_tiles`.
fn tile_b(b: &[f32], out: usize, r: usize) -> Vec<f32> {
    let tiles = out.div_ceil(B_TILE);
    let mut t = vec![0f32; tiles * r * B_TILE];
    for o in 0..out {
        let (k, i) = (o / B_TILE, o % B_TILE);
        for j in 0..r {
            t[(k * r + j) * B_TILE + i] = b[o * r + j];
        }
    }
    t
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

    /// Load a PEFT adapter folder for `model`. Anything that does not fit the model
    /// (unknown names, wrong shapes, layers it does not have) is refused.
    pub fn load(dir: &Path, model: &Llama) -> Result<Self, AdapterError> {
        let (config, tensors) = read_peft_dir(dir, &model.device)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        Self::from_tensors(name, config, &tensors, &model.config)
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

/// `(layer, projection, 'A' | 'B')` from a PEFT tensor name.
fn parse_peft_name(key: &str) -> Result<(usize, Projection, char), AdapterError> {
    let unknown = || {
        AdapterError::Mismatch(format!(
            "unexpected tensor {key:?}; expected names like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ))
    };
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = rest.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let parts: Vec<&str> = rest.split('.').collect();
    // [layer, parent, module, lora_X, (adapter name,)? weight]
    let (layer, parent, module, which) = match parts.as_slice() {
        [l, p, m, w, "weight"] | [l, p, m, w, _, "weight"] => (*l, *p, *m, *w),
        _ => return Err(unknown()),
    };
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let proj = Projection::from_hf_name(module).ok_or_else(unknown)?;
    if proj.hf_parent() != parent {
        return Err(unknown());
    }
    let which = match which {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return Err(unknown()),
    };
    Ok((layer, proj, which))
}

/// Read `adapter_config.json` and `adapter_model.safetensors`.
pub fn read_peft_dir(
    dir: &Path,
    device: &Device,
) -> Result<(PeftConfig, HashMap<String, Tensor>), AdapterError> {
    let read_err = |path: &Path, m: String| AdapterError::Read {
        path: path.display().to_string(),
        message: m,
    };
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| read_err(&cfg_path, e.to_string()))?;
    let config: PeftConfig =
        serde_json::from_str(&text).map_err(|e| AdapterError::Config(e.to_string()))?;
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(read_err(
            &weights,
            "only adapter_model.bin (pickle) is present; save the adapter with safe_serialization=True".into(),
        ));
    }
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| read_err(&weights, e.to_string()))?;
    Ok((config, tensors))
}

/// Write an adapter folder in PEFT's format (A `[r, in]`, B `[out, r]`, Hugging Face row order).
pub fn write_peft_dir(
    dir: &Path,
    config: &PeftConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), AdapterError> {
    let write_err = |m: String| AdapterError::Read {
        path: dir.display().to_string(),
        message: m,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(e.to_string()))?;
    let json = serde_json::to_string_pretty(config).map_err(|e| write_err(e.to_string()))?;
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), json).map_err(|e| write_err(e.to_string()))?;
    candle_core::safetensors::save(tensors, dir.join(ADAPTER_WEIGHTS_FILE))?;
    Ok(())
}

/// Random PEFT-named tensors for `config` on every targeted projection of `model`
/// (A and B ~ N(0, std)): benchmarks and tests.
pub fn random_peft_tensors(
    model: &LlamaConfig,
    config: &PeftConfig,
    std: f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>, AdapterError> {
    let mut out = HashMap::new();
    for p in config.targets()? {
        let (inp, outd) = model.projection_dims(p);
        for layer in 0..model.num_layers {
            out.insert(
                peft_name(layer, p, 'A'),
                Tensor::randn(0f32, std as f32, (config.r, inp), device)?,
            );
            out.insert(
                peft_name(layer, p, 'B'),
                Tensor::randn(0f32, std as f32, (outd, config.r), device)?,
            );
        }
    }
    Ok(out)
}

/// The PEFT tensor name of a projection's A or B.
pub fn peft_name(layer: usize, p: Projection, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        p.hf_parent(),
        p.hf_name()
    )
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
