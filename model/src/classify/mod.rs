//! Classifiers: a BERT-family text encoder and a ResNet image model with a trainable head,
//! trained in full, in part (the head and the last layers) or with LoRA, and saved as
//! self-contained checkpoint folders (`classifier.json` + `model.safetensors` in the
//! Hugging Face / torchvision names + the tokenizer).

pub mod bert;
pub mod image;
pub mod lora;
pub mod ops;
pub mod params;
pub mod recompute;
pub mod resnet;
pub mod text;

use bert::{BertConfig, Pooling};
use candle_core::{Device, Result, Tensor};
use lora::{LoraSpec, Mode};
use params::Params;
use recompute::{Backward, Pass};
use resnet::ResNetConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Name of the manifest file in a classifier checkpoint.
pub const MANIFEST: &str = "classifier.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    TextClassification,
    ImageClassification,
}

impl Task {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "text" | "text-classification" | "text_classification" | "sentiment" => {
                Some(Self::TextClassification)
            }
            "image" | "image-classification" | "image_classification" => {
                Some(Self::ImageClassification)
            }
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::TextClassification => "text-classification",
            Self::ImageClassification => "image-classification",
        }
    }
}

/// The network and its input settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arch {
    Bert {
        config: BertConfig,
        pooling: Pooling,
        max_length: usize,
    },
    #[serde(rename = "resnet")]
    ResNet {
        config: ResNetConfig,
        image_size: u32,
    },
}

impl Arch {
    pub fn task(&self) -> Task {
        match self {
            Self::Bert { .. } => Task::TextClassification,
            Self::ResNet { .. } => Task::ImageClassification,
        }
    }

    /// Number of layers `--freeze-layers` counts in: encoder layers or ResNet stages.
    pub fn layer_count(&self) -> usize {
        match self {
            Self::Bert { config, .. } => config.num_hidden_layers,
            Self::ResNet { config, .. } => config.layers.len(),
        }
    }

    fn layer_of(&self, name: &str) -> Option<usize> {
        match self {
            Self::Bert { .. } => bert::layer_of(name),
            Self::ResNet { .. } => resnet::stage_of(name),
        }
    }

    fn is_head(&self, name: &str) -> bool {
        match self {
            Self::Bert { .. } => name.starts_with("classifier.") || name.starts_with("pooler."),
            Self::ResNet { .. } => name.starts_with("fc."),
        }
    }
}

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// Every weight.
    Full,
    /// The head and the last `layers` layers (encoder layers, or ResNet stages); 0 is
    /// feature extraction: only the head trains.
    Freeze { layers: usize },
    /// LoRA on the attention projections / the block convolutions, and the head.
    Lora(LoraSpec),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Freeze { .. } => "freeze",
            Self::Lora(_) => "lora",
        }
    }
}

/// A base model as read from disk, before a head is put on it.
pub struct Base {
    pub arch: Arch,
    pub params: Params,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Whether the weights are a random initialization (no checkpoint was found).
    pub random: bool,
}

/// Whether a folder or file holds a model this module reads, and which task it is for.
pub fn detect_task(path: &Path) -> Option<Task> {
    if path.join(MANIFEST).is_file() {
        return read_manifest(path).ok().map(|m| m.arch.task());
    }
    if let Some(cfg) = read_config_json(path) {
        if BertConfig::from_json(&cfg).is_some() {
            return Some(Task::TextClassification);
        }
        if cfg.get("model_type").and_then(|m| m.as_str()) == Some("resnet") {
            return Some(Task::ImageClassification);
        }
    }
    let stem = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if ResNetConfig::named(&stem).is_some() {
        return Some(Task::ImageClassification);
    }
    None
}

fn read_config_json(dir: &Path) -> Option<serde_json::Value> {
    let s = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str(&s).ok()
}

/// Read a base model: a BERT-family Hugging Face folder, a folder or file of ResNet
/// weights, or a bare `resnet18|34|50` (random weights; `Base::random` says so).
pub fn load_base(
    path: &Path,
    image_size: u32,
    max_length: Option<usize>,
    seed: u64,
    dev: &Device,
) -> std::result::Result<Base, String> {
    let err = |e: candle_core::Error| format!("{}: {e}", path.display());
    if let Some(cfg) = read_config_json(path)
        .as_ref()
        .and_then(BertConfig::from_json)
    {
        let weights = bert::canonical_names(params::read_weights(path, dev).map_err(err)?);
        let params = Params::from_tensors(weights, dev).map_err(err)?;
        let tokenizer = text::load_tokenizer(path)?;
        let st_max = std::fs::read_to_string(path.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map(|m| m as usize);
        // sentence-transformers checkpoints were trained to be read by their mean.
        let pooling = if path.join("modules.json").is_file() {
            Pooling::Mean
        } else {
            Pooling::Cls
        };
        let max_length = max_length
            .or(st_max)
            .unwrap_or(128)
            .min(cfg.max_position_embeddings);
        return Ok(Base {
            arch: Arch::Bert {
                config: cfg,
                pooling,
                max_length,
            },
            params,
            tokenizer: Some(tokenizer),
            random: false,
        });
    }
    if path.exists() {
        let raw = params::read_weights(path, dev).map_err(err)?;
        let weights: HashMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("module.").map(str::to_string).unwrap_or(k);
                (k, v)
            })
            .collect();
        let stem_width = weights
            .get("conv1.weight")
            .and_then(|w| w.dims().first().copied())
            .unwrap_or(64);
        let Some(cfg) = ResNetConfig::from_weights(&weights, stem_width) else {
            return Err(format!(
                "{} is neither a BERT-family encoder (config.json with model_type bert or distilbert) nor ResNet weights (conv1, layer1..4, fc)",
                path.display()
            ));
        };
        let weights = weights
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fc."))
            .collect();
        return Ok(Base {
            arch: Arch::ResNet {
                config: cfg,
                image_size,
            },
            params: Params::from_tensors(weights, dev).map_err(err)?,
            tokenizer: None,
            random: false,
        });
    }
    let name = path.to_string_lossy();
    let Some(cfg) = ResNetConfig::named(&name) else {
        return Err(format!("{} does not exist", path.display()));
    };
    let weights = resnet::random_weights(&cfg, seed, dev).map_err(err)?;
    Ok(Base {
        arch: Arch::ResNet {
            config: cfg,
            image_size,
        },
        params: Params::from_tensors(weights, dev).map_err(err)?,
        tokenizer: None,
        random: true,
    })
}

/// `classifier.json`: what a checkpoint is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub task: Task,
    pub arch: Arch,
    pub labels: Vec<String>,
    /// The base model it was trained from, as given.
    pub base_model: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<usize>,
    /// The held-out metrics at the time of saving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
}

pub fn read_manifest(dir: &Path) -> std::result::Result<Manifest, String> {
    let p = dir.join(MANIFEST);
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
}

/// Input batch of either task.
pub enum Input {
    Text { ids: Tensor, mask: Tensor },
    Images(Tensor),
}

/// A model with its head: what trains, predicts and is saved.
pub struct Classifier {
    pub arch: Arch,
    pub params: Params,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub labels: Vec<String>,
    pub method: Method,
}

/// One prediction: the best label and every label's probability.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
    pub scores: Vec<(String, f32)>,
}

impl Classifier {
    /// Put a fresh head for `labels` on a base model and mark what `method` trains.
    pub fn new(base: Base, labels: Vec<String>, method: Method, seed: u64) -> Result<Self> {
        let Base {
            arch,
            mut params,
            tokenizer,
            ..
        } = base;
        if let Arch::Bert {
            pooling: Pooling::Mean,
            ..
        } = &arch
        {
            // Mean pooling never reads BERT's pooler: it would be a weight that "trains"
            // without a gradient.
            params.remove("pooler.dense.weight");
            params.remove("pooler.dense.bias");
        }
        match &arch {
            Arch::Bert {
                config, pooling, ..
            } => bert::add_head(&mut params, config, *pooling, labels.len(), seed)?,
            Arch::ResNet { config, .. } => {
                resnet::add_head(&mut params, config, labels.len(), seed)?
            }
        }
        let layers = arch.layer_count();
        let trains = |name: &str| -> bool {
            if resnet::is_buffer(name) {
                return false;
            }
            match method {
                Method::Full => true,
                Method::Freeze { layers: n } => {
                    arch.is_head(name) || arch.layer_of(name).is_some_and(|l| l + n >= layers)
                }
                Method::Lora(_) => arch.is_head(name),
            }
        };
        params.set_trainable(trains)?;
        if let Method::Lora(spec) = method {
            let targets = match &arch {
                Arch::Bert { config, .. } => bert::lora_targets(config),
                Arch::ResNet { config, .. } => resnet::lora_targets(config),
            };
            let mut rng =
                <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed.wrapping_add(1));
            for t in targets {
                lora::attach(&mut params, &t, spec, &mut rng)?;
            }
        }
        Ok(Self {
            arch,
            params,
            tokenizer,
            labels,
            method,
        })
    }

    fn mode(&self, train: bool) -> Mode {
        Mode {
            train,
            lora: match self.method {
                Method::Lora(spec) => Some(spec),
                _ => None,
            },
        }
    }

    /// Logits `[n, labels]`. In training mode, batch-norm running statistics are updated;
    /// in evaluation mode no autograd graph is built (the weights are read detached), so
    /// the pass holds one layer's activations at a time, not the whole network's.
    pub fn forward(&mut self, input: &Input, train: bool) -> Result<Tensor> {
        let mode = self.mode(train);
        let detached;
        let p = if train {
            &self.params
        } else {
            detached = self.params.detached();
            &detached
        };
        match (&self.arch, input) {
            (
                Arch::Bert {
                    config, pooling, ..
                },
                Input::Text { ids, mask },
            ) => bert::forward(p, config, *pooling, ids, mask, mode),
            (Arch::ResNet { config, .. }, Input::Images(x)) => {
                let mut updates = Vec::new();
                let logits = resnet::forward(p, config, x, mode, &mut updates)?;
                for (name, t) in updates {
                    self.params.insert(&name, t)?;
                }
                Ok(logits)
            }
            _ => candle_core::bail!("this model does not take this kind of input"),
        }
    }

    /// The loss of a training batch and the trainable weights' gradients (training mode:
    /// dropout on, batch-norm running statistics updated). With `checkpoint`, activations
    /// are recomputed in the backward pass instead of kept (see `recompute`): one encoder
    /// layer or residual block is held at a time.
    pub fn backward(
        &mut self,
        input: &Input,
        labels: &Tensor,
        checkpoint: bool,
    ) -> Result<Backward> {
        let mode = self.mode(true);
        let p = &self.params;
        let weights: Vec<Tensor> = p
            .trainable()
            .values()
            .map(|v| v.as_tensor().clone())
            .collect();
        match (&self.arch, input) {
            (
                Arch::Bert {
                    config, pooling, ..
                },
                Input::Text { ids, mask },
            ) => {
                let mask_add = bert::additive_mask(mask)?;
                let mut run = |i: usize, x: &Tensor, _: Pass| {
                    if i == 0 {
                        bert::embed(p, config, x, mode)
                    } else {
                        bert::layer(p, config, i - 1, x, &mask_add, mode)
                    }
                };
                let mut head = |x: &Tensor| {
                    let pooled = bert::pool(p, *pooling, x, mask, mode)?;
                    let logits = bert::classify(p, config, &pooled, mode)?;
                    Ok((ops::cross_entropy(&logits, labels)?, logits))
                };
                let segments = config.num_hidden_layers + 1;
                recompute::backward(ids, segments, &mut run, &mut head, &weights, checkpoint)
            }
            (Arch::ResNet { config, .. }, Input::Images(x)) => {
                let blocks = resnet::blocks(config);
                let mut updates = Vec::new();
                let out = {
                    let mut run = |i: usize, x: &Tensor, pass: Pass| {
                        let mut replayed = Vec::new();
                        let u = match pass {
                            Pass::Record => &mut updates,
                            Pass::Replay => &mut replayed,
                        };
                        match i.checked_sub(1) {
                            None => resnet::stem(p, x, mode, u),
                            Some(b) => {
                                let (pre, stride) = &blocks[b];
                                resnet::block(p, config, x, pre, *stride, mode, u)
                            }
                        }
                    };
                    let mut head = |x: &Tensor| {
                        let logits = resnet::head(p, x, mode)?;
                        Ok((ops::cross_entropy(&logits, labels)?, logits))
                    };
                    recompute::backward(
                        x,
                        blocks.len() + 1,
                        &mut run,
                        &mut head,
                        &weights,
                        checkpoint,
                    )?
                };
                for (name, t) in updates {
                    self.params.insert(&name, t)?;
                }
                Ok(out)
            }
            _ => candle_core::bail!("this model does not take this kind of input"),
        }
    }

    /// Token ids and mask for texts (text models).
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Input> {
        let (Arch::Bert { max_length, .. }, Some(tok)) = (&self.arch, &self.tokenizer) else {
            candle_core::bail!("this model does not read text");
        };
        let (ids, mask) = text::encode_batch(tok, texts, *max_length, self.params.device())?;
        Ok(Input::Text { ids, mask })
    }

    /// Evaluation-mode image preprocessing (image models).
    pub fn encode_images(&self, images: &[::image::DynamicImage]) -> Result<Input> {
        let Arch::ResNet { image_size, .. } = &self.arch else {
            candle_core::bail!("this model does not read images");
        };
        let pre = image::Preprocess {
            size: *image_size,
            augment: false,
        };
        let mut rng = rand::rng();
        let prepared: Vec<_> = images.iter().map(|i| pre.apply(i, &mut rng)).collect();
        Ok(Input::Images(image::to_tensor(
            &prepared,
            self.params.device(),
        )?))
    }

    /// Probabilities per label for a batch.
    pub fn predict(&mut self, input: &Input) -> Result<Vec<Prediction>> {
        let logits = self.forward(input, false)?;
        let probs: Vec<Vec<f32>> = ops::softmax_last(&logits)?.to_vec2()?;
        Ok(probs
            .into_iter()
            .map(|row| {
                let (best, score) = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &p)| if p > b.1 { (i, p) } else { b });
                Prediction {
                    label: self.labels[best].clone(),
                    score,
                    scores: self.labels.iter().cloned().zip(row).collect(),
                }
            })
            .collect())
    }

    fn lora_scale(&self) -> f64 {
        match self.method {
            Method::Lora(spec) => spec.scale(),
            _ => 1.0,
        }
    }

    /// Write a self-contained checkpoint: merged weights under the Hugging Face /
    /// torchvision names, `config.json`, the tokenizer and `classifier.json`.
    pub fn save(
        &self,
        dir: &Path,
        base_model: &str,
        epoch: Option<usize>,
        metrics: Option<serde_json::Value>,
    ) -> std::result::Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let merged = lora::merge_all(&self.params, self.lora_scale()).map_err(|e| e.to_string())?;
        let named: HashMap<String, Tensor> = merged
            .into_iter()
            .map(|(k, v)| match &self.arch {
                Arch::Bert { .. } => (bert::stored_name(&k), v),
                Arch::ResNet { .. } => (k, v),
            })
            .collect();
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&named, &weights)
            .map_err(|e| format!("{}: {e}", weights.display()))?;
        let id2label: serde_json::Map<String, serde_json::Value> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), serde_json::Value::from(l.clone())))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), serde_json::Value::from(i)))
            .collect();
        let mut config = match &self.arch {
            Arch::Bert { config, .. } => config.to_hf_json(),
            Arch::ResNet { config, .. } => serde_json::json!({
                "model_type": "resnet",
                "architecture": "torchvision",
                "bottleneck": config.bottleneck,
                "layers": config.layers,
                "width": config.width,
            }),
        };
        config["id2label"] = id2label.into();
        config["label2id"] = label2id.into();
        write_json(&dir.join("config.json"), &config)?;
        if let Some(tok) = &self.tokenizer {
            tok.save(dir.join("tokenizer.json"), false)
                .map_err(|e| e.to_string())?;
        }
        let manifest = Manifest {
            task: self.arch.task(),
            arch: self.arch.clone(),
            labels: self.labels.clone(),
            base_model: base_model.to_string(),
            method: self.method.name().to_string(),
            epoch,
            metrics,
        };
        write_json(
            &dir.join(MANIFEST),
            &serde_json::to_value(&manifest).map_err(|e| e.to_string())?,
        )
    }

    /// Load a checkpoint `save` wrote, every weight frozen.
    pub fn load(dir: &Path, dev: &Device) -> std::result::Result<(Self, Manifest), String> {
        let manifest = read_manifest(dir)?;
        let raw = params::read_weights(dir, dev).map_err(|e| format!("{}: {e}", dir.display()))?;
        let weights = match &manifest.arch {
            Arch::Bert { .. } => bert::canonical_names(raw),
            Arch::ResNet { .. } => raw,
        };
        let params = Params::from_tensors(weights, dev).map_err(|e| e.to_string())?;
        let tokenizer = match &manifest.arch {
            Arch::Bert { .. } => Some(text::load_tokenizer(dir)?),
            Arch::ResNet { .. } => None,
        };
        Ok((
            Self {
                arch: manifest.arch.clone(),
                params,
                tokenizer,
                labels: manifest.labels.clone(),
                method: Method::Full,
            },
            manifest,
        ))
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> std::result::Result<(), String> {
    let s = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, s).map_err(|e| format!("{}: {e}", path.display()))
}
