//! How long a run will roughly take and how much memory it needs, scaled from one
//! reference measurement.

use crate::state::AppState;

/// SmolLM2-135M's parameter count: the reference measurement's model.
pub(super) const REFERENCE_PARAMS: f64 = 134_515_008.0;
/// Training tokens per second measured on this project's 2-core CPU for SmolLM2-135M,
/// LoRA rank 16, sequence length 256, micro batch 4.
pub(super) const REFERENCE_TOKENS_PER_SEC: f64 = 130.0;

/// What a run will roughly take.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub examples: i64,
    pub train_tokens: f64,
    pub steps: u64,
    pub tokens_per_sec: f64,
    pub seconds: f64,
    pub memory_bytes: f64,
}

/// The model's shape, for the estimate.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub params: f64,
    pub layers: f64,
    pub hidden: f64,
    pub vocab: f64,
    /// Sum over the seven projections of (in + out): LoRA parameters per rank and layer.
    pub lora_dims: f64,
}

impl Shape {
    pub(super) fn of(state: &AppState) -> Self {
        let c = &state.core.engine.model().llama.config;
        let (h, i, v, l) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.vocab_size as f64,
            c.num_layers as f64,
        );
        let (q, kv) = (c.q_dim() as f64, c.kv_dim() as f64);
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h;
        let embeddings = v * h * if c.tie_word_embeddings { 1.0 } else { 2.0 };
        let lora_dims = (h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + i);
        Self {
            params: embeddings + l * per_layer + h,
            layers: l,
            hidden: h,
            vocab: v,
            lora_dims,
        }
    }
}

/// The settings the estimate needs, with the trainer's defaults for what is unset.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings {
    pub method: &'static str,
    pub epochs: f64,
    pub batch_size: u64,
    pub micro_batch: u64,
    pub lora_r: u64,
    pub sequence_len: u64,
    pub val_set_size: f64,
    pub max_steps: Option<u64>,
}

/// Time and peak memory of a run, scaled from the one reference measurement: throughput
/// inversely with the parameter count; memory as f32 weights, optimizer state for what
/// trains, and activations per token in flight calibrated so the reference run comes to
/// its measured ~2.5 GB.
pub fn estimate(shape: Shape, s: RunSettings, examples: i64, tokens: f64) -> Estimate {
    let held_out = if s.val_set_size >= 1.0 {
        (s.val_set_size.floor() / examples.max(1) as f64).min(1.0)
    } else {
        s.val_set_size
    };
    let train_share = (1.0 - held_out).clamp(0.0, 1.0);
    let train_examples = (examples as f64 * train_share).round().max(0.0);
    let steps_per_epoch = (train_examples / s.batch_size as f64).ceil();
    let mut steps = (steps_per_epoch * s.epochs).ceil();
    let mut train_tokens = tokens * train_share * s.epochs;
    if let Some(m) = s.max_steps
        && (m as f64) < steps
        && steps > 0.0
    {
        train_tokens *= m as f64 / steps;
        steps = m as f64;
    }
    let speed_factor = match s.method {
        "lora" => 1.0,
        // Every weight gets a gradient and an AdamW update: assume half the speed.
        _ => 0.5,
    };
    let tokens_per_sec =
        REFERENCE_TOKENS_PER_SEC * (REFERENCE_PARAMS / shape.params.max(1.0)) * speed_factor;
    let weights = shape.params * 4.0;
    let trained = match s.method {
        "full" => shape.params,
        "freeze" => shape.params * (2.0 / shape.layers.max(2.0)),
        _ => shape.lora_dims * s.lora_r as f64 * shape.layers,
    };
    // Gradient and two AdamW moments (f32) for every trained parameter, plus the copy.
    let optimizer = trained * 4.0 * if s.method == "lora" { 4.0 } else { 3.0 };
    let per_token = shape.layers * shape.hidden * 60.0 + shape.vocab * 12.0;
    let in_flight = (s.micro_batch * s.sequence_len) as f64;
    let overhead = 0.3e9;
    Estimate {
        examples,
        train_tokens,
        steps: steps as u64,
        tokens_per_sec,
        seconds: train_tokens / tokens_per_sec.max(1e-9),
        memory_bytes: weights + optimizer + per_token * in_flight + overhead,
    }
}

/// A parameter count as `135M` or `42K`.
pub(super) fn params_label(p: f64) -> String {
    if p >= 1e9 {
        format!("{:.1}B", p / 1e9)
    } else if p >= 1e6 {
        format!("{:.0}M", p / 1e6)
    } else {
        format!("{:.0}K", p / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> Shape {
        // SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads of 64, 3 KV heads.
        let (h, i, q, kv, l, v) = (576.0, 1536.0, 576.0, 192.0, 30.0, 49152.0);
        Shape {
            params: v * h + l * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h) + h,
            layers: l,
            hidden: h,
            vocab: v,
            lora_dims: (h + q) + 2.0 * (h + kv) + (q + h) + 3.0 * (h + i),
        }
    }

    fn settings() -> RunSettings {
        RunSettings {
            method: "lora",
            epochs: 1.0,
            batch_size: 4,
            micro_batch: 4,
            lora_r: 16,
            sequence_len: 256,
            val_set_size: 0.0,
            max_steps: None,
        }
    }

    #[test]
    fn the_reference_run_estimates_its_measurement() {
        let shape = smollm();
        assert!((shape.params - REFERENCE_PARAMS).abs() / REFERENCE_PARAMS < 0.01);
        let e = estimate(shape, settings(), 100, 13_000.0);
        assert!((e.tokens_per_sec - 130.0).abs() < 2.0, "{e:?}");
        assert!((e.seconds - 100.0).abs() < 2.0, "{e:?}");
        assert!((2.3e9..2.7e9).contains(&e.memory_bytes), "{e:?}");
        assert_eq!(e.steps, 25);
    }

    #[test]
    fn epochs_held_out_examples_and_max_steps_change_the_estimate() {
        let one = estimate(smollm(), settings(), 100, 10_000.0);
        let three = estimate(
            smollm(),
            RunSettings {
                epochs: 3.0,
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!((three.seconds / one.seconds - 3.0).abs() < 1e-9);
        let held = estimate(
            smollm(),
            RunSettings {
                val_set_size: 0.2,
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!((held.train_tokens - 8_000.0).abs() < 1e-6);
        let capped = estimate(
            smollm(),
            RunSettings {
                max_steps: Some(5),
                ..settings()
            },
            100,
            10_000.0,
        );
        assert_eq!(capped.steps, 5);
        assert!((capped.train_tokens - 2_000.0).abs() < 1e-6);
        let full = estimate(
            smollm(),
            RunSettings {
                method: "full",
                ..settings()
            },
            100,
            10_000.0,
        );
        assert!(full.memory_bytes > one.memory_bytes + 1e9 && full.seconds > one.seconds);
    }
}
