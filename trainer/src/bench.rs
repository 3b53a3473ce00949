//! The training benchmark: LoRA steps on synthetic token rows, the same rows
//! `benches/peft_train.py` feeds PyTorch + PEFT, so the two are comparable in one run.

use crate::optim::{AdamW, AdamWConfig};
use crate::trainable::{LORA_DTYPE, read_adapter};
use candle_core::{DType, Device};
use loraloop_model::llama::{Llama, Projection};
use loraloop_model::lora::PeftConfig;
use loraloop_model::train::{
    BaseTrain, DenseLlama, Grads, LoraParams, PassOptions, Row, TrainBatch,
};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
    pub gradient_checkpointing: bool,
    /// The base model's dtype (LoRA weights and AdamW state are f32 regardless).
    pub dtype: DType,
    /// LoRA dropout on every projection's input (`fine-tune` defaults to 0.05).
    pub lora_dropout: f64,
    /// Start from this PEFT adapter folder instead of a fresh LoRA (seed 0): it must
    /// have rank `rank`, alpha `2 * rank` and all seven projections. With the initial
    /// adapter PEFT saved (`benches/peft_train.py --save-init`), both sides train from the
    /// same weights and their losses can be compared step by step.
    pub init_adapter: Option<std::path::PathBuf>,
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
    /// The loss of every step, warm-up included.
    pub losses: Vec<f64>,
    pub step_secs: Vec<f64>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The base model's dtype (`f32`, `bf16`).
    pub dtype: String,
    /// On CUDA: the most device memory in use (total - free, as `nvidia-smi` counts it:
    /// the CUDA context and the allocator's pool included) seen by a 5 ms sampler over
    /// the whole run; `None` on the CPU.
    pub peak_gpu_mb: Option<f64>,
}

/// Device memory in use on a CUDA device (total - free), in MB; `None` on other devices.
pub fn gpu_used_mb(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        if let Device::Cuda(d) = device {
            return d
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0));
        }
    }
    let _ = device;
    None
}

/// The most device memory in use while it runs, sampled every 5 ms on a thread.
struct GpuPeak {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<f64>>>,
}

impl GpuPeak {
    fn start(device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = gpu_used_mb(device).is_some().then(|| {
            let (stop, device) = (stop.clone(), device.clone());
            std::thread::spawn(move || {
                let mut peak: Option<f64> = None;
                loop {
                    if let Some(mb) = gpu_used_mb(&device) {
                        peak = Some(peak.map_or(mb, |p| p.max(mb)));
                    }
                    if stop.load(Ordering::Relaxed) {
                        return peak;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            })
        });
        Self { stop, thread }
    }

    fn finish(mut self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
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
                soft: Vec::new(),
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

/// One LoRA optimizer step on the synthetic rows of `step`.
struct StepCtx<'a> {
    model: &'a DenseLlama,
    lora: &'a mut LoraParams,
    base: &'a BaseTrain,
    opt: &'a mut AdamW,
    names: &'a [String],
    grads: &'a mut Grads,
}

impl StepCtx<'_> {
    /// Forward, backward and AdamW (learning rate `lr`); returns the loss.
    fn step(
        &mut self,
        step: usize,
        micro_batch: usize,
        seq_len: usize,
        checkpointing: bool,
        lr: f64,
    ) -> candle_core::Result<f64> {
        let rows = synthetic_rows(step, micro_batch, seq_len, self.model.config.vocab_size);
        let batch = TrainBatch::new(&rows, self.model)?;
        self.grads.clear();
        let stats = self.model.forward_backward(
            Some(self.lora),
            self.base,
            &batch,
            &PassOptions {
                grad_scale: 1.0 / batch.weight_sum(),
                checkpointing,
                dropout_seed: step as u64,
                pause: None,
            },
            self.grads,
        )?;
        self.opt.begin_step();
        loraloop_model::train::profile::time("optimizer step", || {
            for n in self.names {
                if let (Some(g), Some(p)) = (self.grads.get(n), self.lora.param_mut(n)) {
                    *p = self.opt.update(n, p, g, lr)?;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
        Ok(stats.loss())
    }
}

/// Settings of [`device_parity`].
#[derive(Debug, Clone, Copy)]
pub struct ParityOptions {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub lr: f64,
    /// Largest accepted `|loss - reference loss| / |reference loss|` at any step.
    pub loss_tolerance: f64,
    /// Largest accepted `||u - u_ref|| / ||u_ref||` for any LoRA pair, `u` being what
    /// training changed: `B` (zero at the start) and the adapter's weight delta `B A`.
    pub update_tolerance: f64,
}

impl Default for ParityOptions {
    fn default() -> Self {
        Self {
            seq_len: 64,
            micro_batch: 2,
            rank: 8,
            steps: 3,
            lr: 1e-3,
            // bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2% per
            // value); the loss of a whole forward pass through bf16 weights and
            // activations drifts by a few of those. 1% leaves room and still catches a
            // wrong graph (a missing term moves the loss by far more).
            loss_tolerance: 1e-2,
            // AdamW's first updates are `lr * sign(grad)`: entries whose gradient is near
            // zero flip sign under bf16 rounding, so the updates differ by more than the
            // loss does (bf16 against f32 on the CPU: 0.14 on the tests' tiny model).
            // Twice the learning rate gives about 1 (trainer/tests/device.rs checks that
            // it fails).
            update_tolerance: 0.25,
        }
    }
}

/// Tensors by name, in a fixed order.
pub type NamedTensors = Vec<(String, candle_core::Tensor)>;

/// Losses and LoRA updates of two runs of the same training, and whether they agree.
#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub reference: String,
    pub candidate: String,
    pub reference_losses: Vec<f64>,
    pub candidate_losses: Vec<f64>,
    pub max_loss_rel_diff: f64,
    pub max_update_rel_diff: f64,
    /// The LoRA tensor with the largest update difference.
    pub worst_tensor: String,
    pub loss_tolerance: f64,
    pub update_tolerance: f64,
    pub pass: bool,
}

/// `steps` LoRA steps (rank `o.rank` on all seven projections, LoRA seed 0, the synthetic
/// rows, AdamW at `o.lr`) on `llama` with the base in `dtype`: the losses and what
/// training changed (f32, on the CPU), by name.
pub fn lora_run(
    llama: &Llama,
    dtype: DType,
    o: &ParityOptions,
) -> candle_core::Result<(Vec<f64>, NamedTensors)> {
    let model = DenseLlama::from_llama(llama, dtype)?;
    let peft = PeftConfig::new(o.rank, 2.0 * o.rank as f64, &Projection::ALL);
    let mut lora = LoraParams::init(peft, &model.config, 0, LORA_DTYPE, &model.device)?;
    let base = BaseTrain::frozen(model.config.num_layers);
    let mut opt = AdamW::new(AdamWConfig::default());
    let names: Vec<String> = lora.named_params().into_iter().map(|(n, _)| n).collect();
    let mut grads = Grads::default();
    let mut losses = Vec::with_capacity(o.steps);
    for step in 0..o.steps {
        let mut s = StepCtx {
            model: &model,
            lora: &mut lora,
            base: &base,
            opt: &mut opt,
            names: &names,
            grads: &mut grads,
        };
        losses.push(s.step(step, o.micro_batch, o.seq_len, false, o.lr)?);
    }
    // What training changed, per LoRA pair: `B` (it starts at zero) and the weight delta
    // the adapter adds, `B A`. Not `A - A_init` alone: `A`'s gradient is exactly zero at
    // the first step (`B = 0`) and tiny after, so AdamW's normalised updates of `A` are
    // mostly the sign of rounding noise; its effect is in `B A`.
    let mut updates = Vec::new();
    for (i, slots) in lora.layers.iter().enumerate() {
        for p in Projection::ALL {
            let Some(ab) = &slots[p.index()] else {
                continue;
            };
            let cpu = |t: &candle_core::Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
            let b = cpu(&ab.b)?;
            let ba = b.matmul(&cpu(&ab.a)?)?;
            updates.push((loraloop_model::lora::peft_name(i, p, 'B'), b));
            updates.push((format!("layer {i} {} B A", p.hf_name()), ba));
        }
    }
    Ok((losses, updates))
}

/// Compare a candidate run (losses, updates) with a reference run of the same training.
pub fn compare_runs(
    reference: (&str, &[f64], &[(String, candle_core::Tensor)]),
    candidate: (&str, &[f64], &[(String, candle_core::Tensor)]),
    o: &ParityOptions,
) -> candle_core::Result<ParityReport> {
    let (rl, cl) = (reference.1, candidate.1);
    if rl.len() != cl.len() || reference.2.len() != candidate.2.len() {
        candle_core::bail!("the two runs have different lengths");
    }
    let max_loss_rel_diff = rl
        .iter()
        .zip(cl)
        .map(|(r, c)| (c - r).abs() / r.abs().max(1e-12))
        .fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    for ((rn, r), (cn, c)) in reference.2.iter().zip(candidate.2) {
        if rn != cn {
            candle_core::bail!("tensor {rn} against {cn}");
        }
        let norm = |t: &candle_core::Tensor| -> candle_core::Result<f64> {
            Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
        };
        let d = norm(&(c - r)?)? / norm(r)?.max(1e-30);
        if d >= worst.0 || !d.is_finite() {
            worst = (d, rn.clone());
        }
    }
    let pass = max_loss_rel_diff <= o.loss_tolerance && worst.0 <= o.update_tolerance;
    Ok(ParityReport {
        reference: reference.0.to_string(),
        candidate: candidate.0.to_string(),
        reference_losses: rl.to_vec(),
        candidate_losses: cl.to_vec(),
        max_loss_rel_diff,
        max_update_rel_diff: worst.0,
        worst_tensor: worst.1,
        loss_tolerance: o.loss_tolerance,
        update_tolerance: o.update_tolerance,
        pass,
    })
}

/// The same LoRA training on the CPU in f32 (the reference: the CPU graph is checked
/// against PyTorch autograd in the model crate's tests) and on `candidate`'s device in
/// `dtype`, compared within the tolerances of `o`.
pub fn device_parity(
    reference: &Llama,
    candidate: &Llama,
    dtype: DType,
    o: &ParityOptions,
) -> candle_core::Result<ParityReport> {
    let (rl, ru) = lora_run(reference, DType::F32, o)?;
    let (cl, cu) = lora_run(candidate, dtype, o)?;
    let name = |l: &Llama, dt: DType| {
        let dev = match l.device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        };
        format!("{dev} {}", format!("{dt:?}").to_lowercase())
    };
    compare_runs(
        (&name(reference, DType::F32), &rl, &ru),
        (&name(candidate, dtype), &cl, &cu),
        o,
    )
}

/// The LoRA of the PEFT adapter folder `dir`, which must have the shape of `want` (rank,
/// alpha, the seven projections): the benchmark reports that shape.
fn init_lora(
    dir: &std::path::Path,
    want: &PeftConfig,
    model: &DenseLlama,
) -> candle_core::Result<LoraParams> {
    let p = read_adapter(dir, model, want.lora_dropout).map_err(candle_core::Error::wrap)?;
    let cfg = &p.config;
    let targets = cfg.targets().map_err(candle_core::Error::wrap)?;
    let all: std::collections::BTreeSet<Projection> = Projection::ALL.into_iter().collect();
    if cfg.r != want.r || cfg.lora_alpha != want.lora_alpha || targets != all {
        candle_core::bail!(
            "--init-adapter {}: rank {}, alpha {} on {} projections; this benchmark trains rank {}, alpha {} on all 7 (set --rank to match)",
            dir.display(),
            cfg.r,
            cfg.lora_alpha,
            targets.len(),
            want.r,
            want.lora_alpha
        );
    }
    Ok(p)
}

/// Run the benchmark: `warmup` untimed steps, then `steps` timed optimizer steps
/// (forward, backward, AdamW on the LoRA parameters).
pub fn train_speed(llama: &Llama, o: TrainBenchOptions) -> candle_core::Result<TrainBenchResult> {
    let peak = GpuPeak::start(&llama.device);
    let model = DenseLlama::from_llama(llama, o.dtype)?;
    let mut peft = PeftConfig::new(o.rank, 2.0 * o.rank as f64, &Projection::ALL);
    peft.lora_dropout = o.lora_dropout;
    let mut lora = match &o.init_adapter {
        Some(dir) => init_lora(dir, &peft, &model)?,
        None => LoraParams::init(peft, &model.config, 0, LORA_DTYPE, &model.device)?,
    };
    let base = BaseTrain::frozen(model.config.num_layers);
    let mut opt = AdamW::new(AdamWConfig::default());
    let names: Vec<String> = lora.named_params().into_iter().map(|(n, _)| n).collect();
    let mut grads = Grads::default();
    let mut step_secs = Vec::new();
    let mut losses = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..o.warmup + o.steps {
        let t = Instant::now();
        let mut s = StepCtx {
            model: &model,
            lora: &mut lora,
            base: &base,
            opt: &mut opt,
            names: &names,
            grads: &mut grads,
        };
        loss = s.step(
            step,
            o.micro_batch,
            o.seq_len,
            o.gradient_checkpointing,
            1e-4,
        )?;
        losses.push(loss);
        // CUDA runs asynchronously: a step is done when the device is.
        model.device.synchronize()?;
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
        losses,
        step_secs,
        device: match model.device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        },
        dtype: format!("{:?}", o.dtype).to_lowercase(),
        peak_gpu_mb: peak.finish(),
    })
}
