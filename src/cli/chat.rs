//! `loraloop chat`: an interactive terminal chat (or, with `--json`, a line protocol for
//! scripts) on the inference engine.

use super::ChatArgs;
use super::chat_record::Recorder;
use anyhow::{Context, bail};
use loraloop_core::Config;
use loraloop_core::config::GenerationConfig;
use loraloop_model::engine::{Engine, Event, Finished, GenerateRequest, LoadedModel, Prompt};
use loraloop_model::sampling::SamplingParams;
use loraloop_model::template::TemplateMessage;
use std::io::Write;
use std::process::ExitCode;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Load the model (and adapter) the way every front end does.
pub async fn start_engine(config: &Config, args: &ChatArgs) -> anyhow::Result<Engine> {
    let path = args.model.clone().unwrap_or_else(|| config.model_path());
    let device = super::resolve_device(args.device.as_deref(), config)?;
    tracing::info!(
        "loading {} on {}",
        path.display(),
        loraloop_model::device::device_name(&device)
    );
    let model = tokio::task::spawn_blocking(move || LoadedModel::load(&path, &device))
        .await
        .context("the model loader panicked")??;
    if model.template.is_fallback() {
        tracing::warn!("{} has no chat template: using ChatML", model.name());
    }
    let engine = Engine::start(model);
    if let Some(dir) = &args.adapter {
        super::check_adapter_base(
            dir,
            &args.model.clone().unwrap_or_else(|| config.model_path()),
        )?;
        let adapter = engine
            .load_adapter(dir.clone())
            .await
            .with_context(|| format!("cannot use the adapter {}", dir.display()))?;
        engine.set_adapter(Some(adapter));
    }
    Ok(engine)
}

/// The config's generation settings with the flags over them, held to the same ranges
/// the config is (a flag is no way around them).
fn sampling(config: &Config, args: &ChatArgs) -> anyhow::Result<SamplingParams> {
    let g = &config.raw.generation;
    let merged = GenerationConfig {
        temperature: args.temperature.unwrap_or(g.temperature),
        top_p: args.top_p.unwrap_or(g.top_p),
        top_k: args.top_k.unwrap_or(g.top_k),
        repetition_penalty: args.repetition_penalty.unwrap_or(g.repetition_penalty),
        max_new_tokens: args.max_new_tokens.unwrap_or(g.max_new_tokens),
        seed: args.seed.or(g.seed),
        stop: if args.stop.is_empty() {
            g.stop.clone()
        } else {
            args.stop.clone()
        },
    };
    if let Err((field, message)) = merged.check() {
        let flag = field.split('.').next().unwrap_or(&field).replace('_', "-");
        bail!("--{flag}: {message}");
    }
    Ok(merged.sampling_params())
}

/// A conversation: the system prompt and the turns since the last `/reset`.
struct Conversation {
    system: String,
    turns: Vec<TemplateMessage>,
}

impl Conversation {
    fn messages(&self) -> Vec<TemplateMessage> {
        let mut m = Vec::with_capacity(self.turns.len() + 1);
        if !self.system.is_empty() {
            m.push(TemplateMessage::new("system", self.system.clone()));
        }
        m.extend(self.turns.iter().cloned());
        m
    }
}

pub async fn run(config: &Config, args: &ChatArgs) -> anyhow::Result<ExitCode> {
    let params = sampling(config, args)?;
    let engine = start_engine(config, args).await?;
    let mut conv = Conversation {
        system: args
            .system
            .clone()
            .unwrap_or_else(|| config.raw.assistant.system_prompt.clone()),
        turns: Vec::new(),
    };
    let recorder = Recorder::open(config).await;
    if args.json {
        return json_loop(&engine, &mut conv, &params, recorder.as_ref()).await;
    }
    let model = engine.model();
    eprintln!(
        "loraloop chat: {} ({} layers, context {}){}",
        model.name(),
        model.llama.config.num_layers,
        model.context_length(),
        engine
            .active_adapter()
            .map(|a| format!(", adapter {}", a.name))
            .unwrap_or_default()
    );
    eprintln!(
        "/reset starts over, /system TEXT sets the system prompt, /quit or Ctrl-D leaves; Ctrl-C stops a reply."
    );
    let mut lines = StdinLines::default();
    loop {
        eprint!("> ");
        let line = tokio::select! {
            line = lines.next() => line?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else {
            eprintln!();
            return Ok(ExitCode::SUCCESS);
        };
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let line = line.trim();
        match command(line, &mut conv) {
            Some(Handled::Quit) => return Ok(ExitCode::SUCCESS),
            Some(Handled::Done(msg)) => {
                eprintln!("{msg}");
                continue;
            }
            None if line.is_empty() => continue,
            None => {}
        }
        conv.turns.push(TemplateMessage::new("user", line));
        // One Ctrl-C listener for the whole reply, registered (polled once) before it
        // starts. A fresh `ctrl_c()` in each turn of the loop below missed a Ctrl-C that
        // came between two pieces of text, when none existed: the reply ran on.
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        let _ = std::future::Future::poll(
            interrupted.as_mut(),
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        );
        let mut generation = match engine.generate(GenerateRequest {
            prompt: Prompt::Chat(conv.messages()),
            params: params.clone(),
            adapter: loraloop_model::engine::AdapterChoice::Active,
            user: None,
        }) {
            Ok(g) => g,
            Err(e) => {
                conv.turns.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        let recorded = match &recorder {
            Some(r) => r.turn(&conv.turns).await,
            None => None,
        };
        if generation.dropped_messages > 0 {
            eprintln!(
                "(the conversation is longer than the context window: the {} oldest message(s) are left out)",
                generation.dropped_messages
            );
        }
        let mut reply = String::new();
        let mut finished = None;
        let mut stdout = std::io::stdout();
        loop {
            tokio::select! {
                event = generation.next() => match event {
                    Some(Event::Text(t)) => {
                        reply.push_str(&t);
                        print!("{t}");
                        stdout.flush()?;
                    }
                    Some(Event::Finished(f)) => { finished = Some(f); break; }
                    None => break,
                    Some(Event::Failed(m)) => { eprintln!("\nerror: {m}"); break; }
                    Some(Event::Started { .. } | Event::Queued { .. }) => {}
                },
                _ = &mut interrupted => {
                    // Dropping the generation below cancels it; only this reply stops.
                    eprintln!(" [stopped]");
                    break;
                }
            }
        }
        drop(generation);
        println!();
        // A reply stopped with Ctrl-C is not stored: it is not what the model would say.
        if let (Some(r), Some(f)) = (&recorder, &finished) {
            r.reply(recorded, f).await;
        }
        conv.turns.push(TemplateMessage::new("assistant", reply));
    }
}

enum Handled {
    Quit,
    Done(String),
}

fn command(line: &str, conv: &mut Conversation) -> Option<Handled> {
    if line == "/quit" || line == "/exit" {
        return Some(Handled::Quit);
    }
    if line == "/reset" {
        conv.turns.clear();
        return Some(Handled::Done("(conversation reset)".into()));
    }
    if let Some(rest) = line.strip_prefix("/system") {
        conv.system = rest.trim().to_string();
        conv.turns.clear();
        return Some(Handled::Done(format!(
            "(system prompt set; conversation reset): {}",
            conv.system
        )));
    }
    None
}

/// `--json`: each stdin line is a prompt (plain text, or `{"prompt": "..."}`); each reply is
/// one JSON object on stdout. The conversation keeps its history; `/reset` and
/// `/system TEXT` lines work as in the terminal.
async fn json_loop(
    engine: &Engine,
    conv: &mut Conversation,
    params: &SamplingParams,
    recorder: Option<&Recorder>,
) -> anyhow::Result<ExitCode> {
    let mut lines = StdinLines::default();
    let mut failures = 0;
    while let Some(line) = lines.next().await? {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                println!("{}", serde_json::json!({"error": e}));
                failures += 1;
                continue;
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let prompt = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => match v.get("prompt").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => {
                    println!(
                        "{}",
                        serde_json::json!({"error": "a JSON line needs a \"prompt\" string"})
                    );
                    failures += 1;
                    continue;
                }
            },
            _ => line.to_string(),
        };
        if let Some(h) = command(&prompt, conv) {
            match h {
                Handled::Quit => break,
                Handled::Done(msg) => {
                    println!("{}", serde_json::json!({"command": prompt, "result": msg}))
                }
            }
            continue;
        }
        conv.turns
            .push(TemplateMessage::new("user", prompt.clone()));
        let result = match engine.generate(GenerateRequest {
            prompt: Prompt::Chat(conv.messages()),
            params: params.clone(),
            adapter: loraloop_model::engine::AdapterChoice::Active,
            user: None,
        }) {
            Ok(g) => {
                let recorded = match recorder {
                    Some(r) => r.turn(&conv.turns).await,
                    None => None,
                };
                let f = g.finish().await.map_err(anyhow::Error::msg);
                if let (Some(r), Ok(f)) = (recorder, &f) {
                    r.reply(recorded, f).await;
                }
                f
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(f) => {
                println!("{}", reply_json(&prompt, &f));
                conv.turns.push(TemplateMessage::new("assistant", f.text));
            }
            Err(e) => {
                conv.turns.pop();
                failures += 1;
                println!(
                    "{}",
                    serde_json::json!({"prompt": prompt, "error": e.to_string()})
                );
            }
        }
        std::io::stdout().flush()?;
    }
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn reply_json(prompt: &str, f: &Finished) -> serde_json::Value {
    serde_json::json!({
        "prompt": prompt,
        "reply": f.text,
        "finish_reason": match f.reason {
            loraloop_model::engine::FinishReason::Stop => "stop",
            loraloop_model::engine::FinishReason::Length => "length",
        },
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "adapter": f.adapter.as_ref().map(|a| &a.name),
        "decode_tokens_per_second": if f.decode_secs > 0.0 { f.completion_tokens as f64 / f.decode_secs } else { 0.0 },
    })
}

/// Stdin, a line at a time. A line that is not UTF-8 is an error naming it; the lines
/// after it are still read (`lines()` ended the whole input there).
struct StdinLines {
    reader: BufReader<tokio::io::Stdin>,
    number: usize,
}

impl Default for StdinLines {
    fn default() -> Self {
        Self {
            reader: BufReader::new(tokio::io::stdin()),
            number: 0,
        }
    }
}

impl StdinLines {
    /// The next line without its line break; None at the end of input.
    async fn next(&mut self) -> std::io::Result<Option<Result<String, String>>> {
        let mut bytes = Vec::new();
        if self.reader.read_until(b'\n', &mut bytes).await? == 0 {
            return Ok(None);
        }
        self.number += 1;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        Ok(Some(String::from_utf8(bytes).map_err(|e| {
            format!(
                "line {} is not UTF-8 text (byte {} is not): skipped",
                self.number,
                e.utf8_error().valid_up_to() + 1
            )
        })))
    }
}
