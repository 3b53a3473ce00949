//! The weights of a classifier by name: frozen ones as plain tensors, trainable ones as
//! candle `Var`s (only those collect gradients), LoRA factors among them.

use super::ops::DTYPE;
use candle_core::{Device, Result, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Params {
    device: Device,
    frozen: HashMap<String, Tensor>,
    trainable: BTreeMap<String, Var>,
}

impl Params {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            frozen: HashMap::new(),
            trainable: BTreeMap::new(),
        }
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let mut p = Self::new(device);
        for (name, t) in tensors {
            p.insert(&name, t)?;
        }
        Ok(p)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Add (or replace) a frozen weight, converted to f32 on this device.
    pub fn insert(&mut self, name: &str, t: Tensor) -> Result<()> {
        let t = t.to_device(&self.device)?.to_dtype(DTYPE)?;
        self.trainable.remove(name);
        self.frozen.insert(name.to_string(), t);
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.frozen.contains_key(name) || self.trainable.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(v) = self.trainable.get(name) {
            return Ok(v.as_tensor().clone());
        }
        self.frozen
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))
    }

    pub fn get_opt(&self, name: &str) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The same weights, every one frozen (sharing storage): a forward pass over them
    /// builds no autograd graph, so each activation is freed as soon as the next op has
    /// read it. What evaluation and prediction run on.
    pub fn detached(&self) -> Self {
        let mut frozen = self.frozen.clone();
        for (name, v) in &self.trainable {
            frozen.insert(name.clone(), v.as_tensor().detach());
        }
        Self {
            device: self.device.clone(),
            frozen,
            trainable: BTreeMap::new(),
        }
    }

    /// Make every weight whose name `train` accepts trainable and every other one frozen.
    pub fn set_trainable(&mut self, train: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.names();
        for name in names {
            let t = self.get(&name)?;
            if train(&name) {
                if !self.trainable.contains_key(&name) {
                    self.frozen.remove(&name);
                    self.trainable.insert(name, Var::from_tensor(&t)?);
                }
            } else if let Some(v) = self.trainable.remove(&name) {
                self.frozen.insert(name, v.as_tensor().detach());
            }
        }
        Ok(())
    }

    /// Add a new trainable weight (a LoRA factor, a fresh head).
    pub fn insert_trainable(&mut self, name: &str, t: Tensor) -> Result<()> {
        let t = t.to_device(&self.device)?.to_dtype(DTYPE)?;
        self.frozen.remove(name);
        self.trainable
            .insert(name.to_string(), Var::from_tensor(&t)?);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.frozen
            .remove(name)
            .or_else(|| self.trainable.remove(name).map(|v| v.as_tensor().detach()))
    }

    /// Every name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .frozen
            .keys()
            .chain(self.trainable.keys())
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The trainable weights, by name.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    pub fn trainable_count(&self) -> usize {
        self.trainable.values().map(|v| v.elem_count()).sum()
    }

    pub fn total_count(&self) -> usize {
        self.frozen.values().map(|t| t.elem_count()).sum::<usize>() + self.trainable_count()
    }

    /// Every weight, detached, by name.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.get(&n)?.detach())))
            .collect()
    }
}

/// Read the weights of a Hugging Face / torchvision / timm folder or file: the folder's
/// `model.safetensors`, else every `*.safetensors` in it (shards, or a torchvision / timm
/// file), else `pytorch_model.bin` (a PyTorch pickle).
pub fn read_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let files: Vec<std::path::PathBuf> = if path.join("model.safetensors").is_file() {
        vec![path.join("model.safetensors")]
    } else if path.is_dir() {
        let mut st: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        st.sort();
        if st.is_empty() {
            for name in ["pytorch_model.bin", "model.pth", "model.pt"] {
                if path.join(name).is_file() {
                    st.push(path.join(name));
                    break;
                }
            }
        }
        st
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        candle_core::bail!(
            "{} holds no weights (model.safetensors or pytorch_model.bin)",
            path.display()
        );
    }
    let mut out = HashMap::new();
    for f in files {
        if f.extension().is_some_and(|e| e == "safetensors") {
            out.extend(candle_core::safetensors::load(&f, device)?);
        } else {
            for (name, t) in candle_core::pickle::read_all(&f)? {
                out.insert(name, t.to_device(device)?);
            }
        }
    }
    Ok(out)
}
