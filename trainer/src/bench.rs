//! The training benchmark: LoRA steps on synthetic token rows, the same rows
//! `benches/peft_train.py` feeds PyTorch + PEFT, so the two are comparable in one run.

use crate::optim::{AdamW, AdamWConfig};
use candle_core::DType;
use loraloop_model::llama::{Llama, Projection};
use loraloop_model::lora::PeftConfig;
use loraloop_model::train::{
    BaseTrain, DenseLlama, Grads, LoraParams, PassOptions, Row, TrainBatch,
};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct TrainBenchOptions {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
    pub gradient_checkpointing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
    pub gradient_checkpointing: bool,
    pub steps: usize,
    pub seq_len: usize,
    pub micro_batch: usize,
    pub rank: usize,
    pub loss: f64,
    pub step_secs: Vec<f64>,
}

/// Token `j` of row `r` at step `s`: `(1 + (s * micro_batch + r) * 7919 + j * 104729) % vocab`
/// (the formula `benches/peft_train.py` uses), every next token scored.
pub fn synthetic_rows(step: usize, micro_batch: usize, seq_len: usize, vocab: usize) -> Vec<Row> {
    (0..micro_batch)
        .map(|r| {
            let tokens: Vec<u32> = (0..seq_len)
                .map(|j| ((1 + (step * micro_batch + r) * 7919 + j * 104_729) % vocab) as u32)
                .collect();
            let mut targets: Vec<i32> = tokens[1..].iter().map(|&t| t as i32).collect();
            targets.push(-1);
            let mut weights = vec![1.0; seq_len];
            weights[seq_len - 1] = 0.0;
            Row {
                positions: (0..seq_len as u32).collect(),
                segments: vec![1; seq_len],
                tokens,
                targets,
                weights,
            }
        })
        .collect()
}

/// Peak resident memory of this process (`VmHWM`), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Run the benchmark: `warmup` untimed steps, then `steps` timed optimizer steps
/// (forward, backward, AdamW on the LoRA parameters).
pub fn train_speed(llama: &Llama, o: TrainBenchOptions) -> candle_core::Result<TrainBenchResult> {
    let model = DenseLlama::from_llama(llama, DType::F32)?;
    let peft = PeftConfig::new(o.rank, 2.0 * o.rank as f64, &Projection::ALL);
    let mut lora = LoraParams::init(peft, &model.config, 0, DType::F32, &model.device)?;
    let base = BaseTrain::frozen(model.config.num_layers);
    let mut opt = AdamW::new(AdamWConfig::default());
    let names: Vec<String> = lora.named_params().into_iter().map(|(n, _)| n).collect();
    let mut grads = Grads::default();
    let mut step_secs = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..o.warmup + o.steps {
        let t = Instant::now();
        let rows = synthetic_rows(step, o.micro_batch, o.seq_len, model.config.vocab_size);
        let batch = TrainBatch::new(&rows, &model)?;
        grads.clear();
        let stats = model.forward_backward(
            Some(&lora),
            &base,
            &batch,
            &PassOptions {
                grad_scale: 1.0 / batch.weight_sum(),
                checkpointing: o.gradient_checkpointing,
                dropout_seed: step as u64,
            },
            &mut grads,
        )?;
        loss = stats.loss();
        opt.begin_step();
        for n in &names {
            if let (Some(g), Some(p)) = (grads.get(n), lora.param_mut(n)) {
                *p = opt.update(n, p, g, 1e-4)?;
            }
        }
        if step >= o.warmup {
            step_secs.push(t.elapsed().as_secs_f64());
        } else {
            loraloop_model::train::profile::take();
        }
    }
    let total: f64 = step_secs.iter().sum();
    if loraloop_model::train::profile::enabled() {
        eprintln!("per timed step (LORALOOP_TRAIN_PROFILE):");
        for (tag, secs, calls) in loraloop_model::train::profile::take() {
            eprintln!(
                "  {tag:<24} {:>8.3} s  {:>6} calls",
                secs / o.steps as f64,
                calls / o.steps
            );
        }
    }
    Ok(TrainBenchResult {
        implementation: "loraloop",
        tokens_per_s: (o.steps * o.micro_batch * o.seq_len) as f64 / total,
        peak_rss_mb: peak_rss_mb(),
        gradient_checkpointing: o.gradient_checkpointing,
        steps: o.steps,
        seq_len: o.seq_len,
        micro_batch: o.micro_batch,
        rank: o.rank,
        loss,
        step_secs,
    })
}
