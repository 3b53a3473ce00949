//! `loraloop export`: an adapter for llama.cpp and Ollama. `--format lora` writes the
//! adapter as a llama.cpp LoRA GGUF (`llama-cli -m BASE --lora adapter.gguf`), `--format
//! merged` the base model with the adapter merged in as a GGUF of `--type` (f16, q8_0,
//! q4_1); either comes with an Ollama Modelfile.

use anyhow::Context;
use clap::Args;
use loraloop_core::Config;
use loraloop_model::engine::LoadedModel;
use loraloop_model::export::{GgufType, modelfile, write_gguf_lora, write_merged_gguf};
use loraloop_model::lora::LoraAdapter;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A PEFT adapter folder (a training job's output).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model the adapter was trained on (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `lora`: the adapter as a llama.cpp LoRA GGUF; `merged`: the model with the adapter
    /// merged in, as a GGUF (the base must be a GGUF).
    #[arg(long, default_value = "lora", value_parser = ["lora", "merged"])]
    pub format: String,
    /// Weights of a merged GGUF: f16, q8_0 or q4_1.
    #[arg(long = "type", default_value = "q8_0", value_parser = ["f16", "q8_0", "q4_1"])]
    pub gguf_type: String,
    /// Folder to write the GGUF file and the Modelfile into.
    #[arg(long)]
    pub output_dir: PathBuf,
}

pub async fn export(config: &Config, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let (args_format, ty) = (
        args.format.clone(),
        GgufType::parse(&args.gguf_type).map_err(anyhow::Error::msg)?,
    );
    let (adapter_dir, out) = (args.adapter.clone(), args.output_dir.clone());
    let system = config.raw.assistant.system_prompt.clone();
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<PathBuf>> {
        let device = candle_core::Device::Cpu;
        let base = LoadedModel::load(&model_path, &device)?;
        let cfg = &base.llama.config;
        let adapter = LoraAdapter::load(&adapter_dir, cfg, &device)
            .with_context(|| format!("cannot load the adapter {}", adapter_dir.display()))?;
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let (file, from, adapter_line) = if args_format == "lora" {
            let file = out.join("adapter.gguf");
            write_gguf_lora(&adapter, cfg, &file)?;
            let from = std::fs::canonicalize(&model_path).unwrap_or(model_path.clone());
            (file, from.display().to_string(), Some("./adapter.gguf"))
        } else {
            let name = format!("model-{}.gguf", ty.as_str());
            let file = out.join(&name);
            write_merged_gguf(&model_path, Some(&adapter), cfg, ty, &adapter.name, &file)?;
            (file, format!("./{name}"), None)
        };
        let mf = out.join("Modelfile");
        std::fs::write(&mf, modelfile(&from, adapter_line, &system))
            .with_context(|| format!("cannot write {}", mf.display()))?;
        Ok(vec![file, mf])
    })
    .await
    .context("the export panicked")??;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
