//! `loraloop export`: an adapter for llama.cpp and Ollama. `--format lora` writes the
//! adapter as a llama.cpp LoRA GGUF (`llama-cli -m BASE --lora adapter.gguf`), `--format
//! merged` the base model with the adapter merged in as a GGUF of `--type` (f16, q8_0,
//! q4_1); either comes with an Ollama Modelfile.

use anyhow::Context;
use clap::Args;
use loraloop_core::Config;
use loraloop_model::engine::LoadedModel;
use loraloop_model::export::{Export, GgufType, export_adapter, modelfile, write_merged_hf};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// The CLI's exports run to the end (Ctrl-C ends the process).
static NO_CANCEL: AtomicBool = AtomicBool::new(false);
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
    /// merged in, as a GGUF (from a GGUF base or a Hugging Face folder); `hf`: the merged
    /// model as a Hugging Face folder (safetensors, tokenizer, chat template).
    #[arg(long, default_value = "lora", value_parser = ["lora", "merged", "hf"])]
    pub format: String,
    /// Weights: f16, q8_0 or q4_1 for a merged GGUF (default q8_0); f16 or f32 for a
    /// Hugging Face folder (default f16).
    #[arg(long = "type", value_parser = ["f16", "f32", "q8_0", "q4_1"])]
    pub gguf_type: Option<String>,
    /// Folder to write the GGUF file and the Modelfile into.
    #[arg(long)]
    pub output_dir: PathBuf,
}

pub async fn export(config: &Config, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let args_format = args.format.clone();
    let asked = args.gguf_type.as_deref();
    if args_format == "hf" {
        let dtype = match asked.unwrap_or("f16") {
            "f16" => candle_core::DType::F16,
            "f32" => candle_core::DType::F32,
            other => anyhow::bail!("a Hugging Face folder is f16 or f32, not {other}"),
        };
        return export_hf(config, args, dtype).await;
    }
    if args_format == "lora"
        && let Some(t) = asked
    {
        anyhow::bail!(
            "--type {t} is for --format merged or hf: a LoRA GGUF keeps the adapter's f32 weights"
        );
    }
    let ty = GgufType::parse(asked.unwrap_or("q8_0")).map_err(anyhow::Error::msg)?;
    let (adapter_dir, out) = (args.adapter.clone(), args.output_dir.clone());
    let system = config.raw.assistant.system_prompt.clone();
    let written = in_output_dir(&args.output_dir, move || -> anyhow::Result<Vec<PathBuf>> {
        super::check_adapter_base(&adapter_dir, &model_path)?;
        let base = LoadedModel::load(&model_path, &candle_core::Device::Cpu)?;
        let cfg = &base.llama.config;
        let name = adapter_dir
            .file_name()
            .map_or("adapter".to_string(), |n| n.to_string_lossy().into_owned());
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let (file, from, adapter_line) = if args_format == "lora" {
            let file = out.join("adapter.gguf");
            export_adapter(
                &adapter_dir,
                &model_path,
                cfg,
                Export::Lora,
                &name,
                &file,
                &NO_CANCEL,
            )?;
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
                &NO_CANCEL,
            )?;
            (file, format!("./{file_name}"), None)
        };
        let mf = out.join("Modelfile");
        std::fs::write(&mf, modelfile(&from, adapter_line, &system))
            .with_context(|| format!("cannot write {}", mf.display()))?;
        Ok(vec![file, mf])
    })
    .await?;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--format hf`: the merged model as a Hugging Face folder.
async fn export_hf(
    config: &Config,
    args: &ExportArgs,
    dtype: candle_core::DType,
) -> anyhow::Result<ExitCode> {
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let (adapter_dir, out) = (args.adapter.clone(), args.output_dir.clone());
    in_output_dir(&args.output_dir, move || -> anyhow::Result<()> {
        super::check_adapter_base(&adapter_dir, &model_path)?;
        let device = candle_core::Device::Cpu;
        let base = LoadedModel::load(&model_path, &device)?;
        let adapter =
            loraloop_model::lora::LoraAdapter::load(&adapter_dir, &base.llama.config, &device)
                .with_context(|| format!("cannot load the adapter {}", adapter_dir.display()))?;
        write_merged_hf(&base, Some(&adapter), dtype, &out)?;
        Ok(())
    })
    .await?;
    println!("wrote {}", args.output_dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Run an export that writes into `out` off the async threads; when it fails, a folder it
/// made and left empty goes (a refused adapter left an empty output folder).
async fn in_output_dir<T: Send + 'static>(
    out: &std::path::Path,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let existed = out.exists();
    let result = tokio::task::spawn_blocking(work)
        .await
        .context("the export panicked")?;
    if result.is_err() && !existed {
        let _ = std::fs::remove_dir(out);
    }
    result
}
