//! `loraloop bench generate`: prompt processing and decode speed of the model on this
//! machine, with and without a rank-r adapter on all seven projections, and the time to
//! load and swap an adapter. Shaped like llama.cpp's `llama-bench -p N -n M` so the two
//! can be run side by side (see `scripts/bench-generate.sh`).

use super::BenchGenerateArgs;
use anyhow::Context;
use candle_core::Tensor;
use loraloop_core::Config;
use loraloop_model::engine::{Engine, LoadedModel};
use loraloop_model::llama::{Llama, Projection};
use loraloop_model::lora::{LoraAdapter, PeftConfig, random_peft_tensors, write_peft_dir};
use loraloop_trainer::config::Method;
use std::process::ExitCode;
use std::time::Instant;

struct Stats {
    mean: f64,
    std: f64,
}

fn stats(xs: &[f64]) -> Stats {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Stats {
        mean,
        std: var.sqrt(),
    }
}

/// Tokens/s of one prompt pass of `n` tokens on an empty cache.
fn prompt_speed(llama: &Llama, n: usize, adapter: Option<&LoraAdapter>) -> anyhow::Result<f64> {
    let vocab = llama.config.vocab_size as u32;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let input = Tensor::new(ids.as_slice(), &llama.device)?.unsqueeze(0)?;
    let mut cache = llama.new_cache();
    let t = Instant::now();
    llama.forward(&input, &mut cache, adapter)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Tokens/s of `n` single-token steps from an empty cache (greedy), as llama-bench's `tg`.
fn decode_speed(llama: &Llama, n: usize, adapter: Option<&LoraAdapter>) -> anyhow::Result<f64> {
    let mut cache = llama.new_cache();
    let mut token = 1u32;
    let t = Instant::now();
    for _ in 0..n {
        let input = Tensor::new(&[token], &llama.device)?.unsqueeze(0)?;
        let logits = llama.forward(&input, &mut cache, adapter)?.squeeze(0)?;
        token = logits.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

pub async fn generate(config: &Config, args: &BenchGenerateArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.clone().unwrap_or_else(|| config.model_path());
    let device = super::resolve_device(args.device.as_deref(), config)?;
    let model = tokio::task::spawn_blocking({
        let (path, device) = (path.clone(), device.clone());
        move || LoadedModel::load(&path, &device)
    })
    .await??;
    let rank = args.rank;
    let peft = PeftConfig::new(rank, 2.0 * rank as f64, &Projection::ALL);
    let tensors = random_peft_tensors(&model.llama.config, &peft, 0.02, &device)?;
    let adapter =
        LoraAdapter::from_tensors("bench".into(), peft.clone(), &tensors, &model.llama.config)?;
    let threads = candle_core::utils::get_num_threads();
    eprintln!(
        "model {} | {} | {} threads | prompt {} tokens, decode {} tokens, {} repeats, adapter rank {} on all 7 projections",
        path.display(),
        loraloop_model::device::device_name(&device),
        threads,
        args.prompt_tokens,
        args.gen_tokens,
        args.repeats,
        rank
    );
    // Warm-up (first-touch of the weights, allocator).
    prompt_speed(&model.llama, 16, None)?;
    decode_speed(&model.llama, 4, Some(&adapter))?;

    let mut rows = Vec::new();
    for (label, a) in [("base", None), ("adapter", Some(&adapter))] {
        let mut pp = Vec::new();
        let mut tg = Vec::new();
        // Alternate the two measurements so drift on a shared machine hits both alike.
        for _ in 0..args.repeats {
            pp.push(prompt_speed(&model.llama, args.prompt_tokens, a)?);
            tg.push(decode_speed(&model.llama, args.gen_tokens, a)?);
        }
        rows.push((label, stats(&pp), stats(&tg)));
    }

    // Adapter swap: load a PEFT folder from disk, validate it, and activate it.
    let dir = tempfile::tempdir()?;
    write_peft_dir(dir.path(), &peft, &tensors).context("cannot write the benchmark adapter")?;
    let engine = Engine::start(model);
    let mut load_ms = Vec::new();
    let mut swap_us = Vec::new();
    for _ in 0..args.repeats.max(3) {
        let t = Instant::now();
        let a = engine.load_adapter(dir.path().to_path_buf()).await?;
        load_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        engine.set_adapter(Some(a));
        swap_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (load, swap) = (stats(&load_ms), stats(&swap_us));

    if args.json {
        let mut out = serde_json::json!({
            "model": path, "threads": threads, "rank": rank,
            "device": loraloop_model::device::device_name(&device),
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "adapter_load_ms": load.mean, "adapter_swap_us": swap.mean,
        });
        for (label, pp, tg) in &rows {
            out[format!("{label}_prompt_tps")] = pp.mean.into();
            out[format!("{label}_decode_tps")] = tg.mean.into();
        }
        println!("{out}");
    } else {
        println!("| test | base t/s | rank-{rank} adapter t/s |");
        println!("| --- | --- | --- |");
        println!(
            "| pp{} | {:.1} ± {:.1} | {:.1} ± {:.1} |",
            args.prompt_tokens, rows[0].1.mean, rows[0].1.std, rows[1].1.mean, rows[1].1.std
        );
        println!(
            "| tg{} | {:.1} ± {:.1} | {:.1} ± {:.1} |",
            args.gen_tokens, rows[0].2.mean, rows[0].2.std, rows[1].2.mean, rows[1].2.std
        );
        println!(
            "adapter load + validate {:.1} ± {:.1} ms; swap (atomic store) {:.1} µs",
            load.mean, load.std, swap.mean
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn train(config: &Config, args: &super::BenchTrainArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.clone().unwrap_or_else(|| config.model_path());
    let device = super::resolve_device(args.device.as_deref(), config)?;
    let dtype = super::train_dtype(&args.dtype, &device, Method::Lora)?;
    let opts = loraloop_trainer::bench::TrainBenchOptions {
        seq_len: args.seq_len,
        micro_batch: args.micro_batch,
        rank: args.rank,
        steps: args.steps.max(1),
        warmup: args.warmup,
        gradient_checkpointing: args.gradient_checkpointing,
        dtype,
        lora_dropout: args.lora_dropout,
        init_adapter: args.init_adapter.clone(),
    };
    if !(0.0..1.0).contains(&args.lora_dropout) {
        anyhow::bail!(
            "--lora-dropout must be in [0, 1), got {}",
            args.lora_dropout
        );
    }
    eprintln!(
        "model {} | {} {dtype:?} | {} threads | LoRA rank {} on all 7 projections, dropout {} | {} x {} tokens | {} warm-up + {} timed steps | gradient checkpointing {}",
        path.display(),
        loraloop_model::device::device_name(&device),
        candle_core::utils::get_num_threads(),
        opts.rank,
        opts.lora_dropout,
        opts.micro_batch,
        opts.seq_len,
        opts.warmup,
        opts.steps,
        if opts.gradient_checkpointing {
            "on"
        } else {
            "off"
        },
    );
    let r = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let model = LoadedModel::load(&path, &device)?;
        Ok(loraloop_trainer::bench::train_speed(&model.llama, opts)?)
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let gpu = r
            .peak_gpu_mb
            .map_or(String::new(), |mb| format!(", peak GPU memory {mb:.0} MB"));
        println!(
            "{:.1} tokens/s, peak RSS {:.0} MB{gpu}, final loss {:.3} (step times: {})",
            r.tokens_per_s,
            r.peak_rss_mb,
            r.loss,
            r.step_secs
                .iter()
                .map(|s| format!("{s:.2}s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn parity(config: &Config, args: &super::BenchParityArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.clone().unwrap_or_else(|| config.model_path());
    let device = super::resolve_device(Some(&args.device), config)?;
    let dtype = super::train_dtype(&args.dtype, &device, Method::Lora)?;
    let o = loraloop_trainer::bench::ParityOptions {
        seq_len: args.seq_len,
        micro_batch: args.micro_batch,
        rank: args.rank,
        steps: args.steps.max(1),
        ..Default::default()
    };
    let r = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let cpu = LoadedModel::load(&path, &candle_core::Device::Cpu)?;
        let dev = LoadedModel::load(&path, &device)?;
        Ok(loraloop_trainer::bench::device_parity(
            &cpu.llama, &dev.llama, dtype, &o,
        )?)
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|l| format!("{l:.5}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("losses {}: {}", r.reference, fmt(&r.reference_losses));
        println!("losses {}: {}", r.candidate, fmt(&r.candidate_losses));
        println!(
            "largest loss difference {:.2e} (tolerance {:.0e}); largest LoRA update difference {:.3} in {} (tolerance {})",
            r.max_loss_rel_diff,
            r.loss_tolerance,
            r.max_update_rel_diff,
            r.worst_tensor,
            r.update_tolerance
        );
        println!("{}", if r.pass { "PASS" } else { "FAIL" });
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
