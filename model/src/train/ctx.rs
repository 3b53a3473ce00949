//! What one forward (and backward) pass works on: the model, its LoRA, the batch, the
//! dropout seed.

use super::batch::TrainBatch;
use super::dense::DenseLlama;
use super::dropout::mix_seed;
use super::lora_params::{LoraAb, LoraParams};
use crate::llama::Projection;

pub(super) struct Ctx<'a> {
    pub(super) model: &'a DenseLlama,
    pub(super) lora: Option<&'a LoraParams>,
    pub(super) batch: &'a TrainBatch,
    /// `None`: evaluation (no dropout).
    pub(super) dropout_seed: Option<u64>,
}

impl Ctx<'_> {
    pub(super) fn lora_of(&self, layer: usize, p: Projection) -> Option<&LoraAb> {
        self.lora
            .and_then(|l| l.layers.get(layer))
            .and_then(|s| s[p.index()].as_ref())
    }

    pub(super) fn scale(&self) -> f64 {
        self.lora.map_or(0.0, |l| l.scale)
    }

    pub(super) fn dropout(&self, layer: usize, p: Projection) -> Option<(f64, u64)> {
        let seed = self.dropout_seed?;
        let pr = self.lora?.config.lora_dropout;
        (pr > 0.0).then(|| (pr, mix_seed(seed, layer, p)))
    }
}
