//! `loraloop export`: an adapter for llama.cpp and Ollama. `--format lora` writes the
//! adapter as a llama.cpp LoRA GGUF (`llama-cli -m BASE --lora adapter.gguf`), `--format
//! merged` the base model with the adapter merged in as a GGUF of `--type` (f16, q8_0,
//! q4_1); either comes with an Ollama Modelfile.

use anyhow::Context;
use clap::Args;
use loraloop_core::Config;
use loraloop_model::engine::LoadedModel;
use loraloop_model::export::{Export, GgufType, export_adapter, modelfile};
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
        let base = LoadedModel::load(&model_path, &candle_core::Device::Cpu)?;
        let cfg = &base.llama.config;
        let name = adapter_dir
            .file_name()
            .map_or("adapter".to_string(), |n| n.to_string_lossy().into_owned());
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let (file, from, adapter_line) = if args_format == "lora" {
            let file = out.join("adapter.gguf");
            export_adapter(&adapter_dir, &model_path, cfg, Export::Lora, &name, &file)?;
            let from = std::fs::canonicalize(&model_path).unwrap_or(model_path.clone());
            (file, from.display().to_string(), Some("./adapter.gguf"))
        } else {
            let file_name = format!("model-{}.gguf", ty.as_str());
            let file = out.join(&file_name);
            export_adapter(
                &adapter_dir,
                &model_path,
                cfg,
                Export::Merged(ty),
                &name,
                &file,
            )?;
            (file, format!("./{file_name}"), None)
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
