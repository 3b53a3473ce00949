//! What the HTTP benchmarks share: a `serve` on a scratch database in this process,
//! random adapters registered like trained ones, and one streamed chat completion timed
//! from the request to its first token and to its end.

use anyhow::{Context, bail};
use candle_core::Device;
use loraloop_core::Config;
use loraloop_core::storage::NewAdapter;
use loraloop_model::llama::Projection;
use loraloop_model::lora::{PeftConfig, random_peft_tensors, write_peft_dir};
use std::path::PathBuf;
use std::time::Instant;

/// A `serve` started for a benchmark: its address, API key and scratch folder.
pub struct ScratchServe {
    pub server: loraloop::serve::RunningServer,
    pub base: String,
    pub key: String,
    pub scratch: tempfile::TempDir,
}

/// Start `serve` (HTTP, and the training worker when `worker`) on a scratch database with
/// `model` (default: the configured one).
pub async fn start_scratch_serve(
    config: &Config,
    model: Option<&PathBuf>,
    worker: bool,
) -> anyhow::Result<ScratchServe> {
    let scratch = tempfile::tempdir()?;
    let mut config = config.clone();
    if let Some(m) = model {
        config.raw.model = m.display().to_string();
    }
    config.raw.model = config.model_path().display().to_string();
    config.raw.data_dir = scratch.path().join("data");
    config.database_path = scratch.path().join("data/bench.db");
    let key = loraloop_core::token::random_token(16);
    config.secrets.api_key = Some(key.clone().into());
    let server = loraloop::serve::start(
        config,
        loraloop::serve::ServeOptions {
            bind: Some("127.0.0.1:0".parse()?),
            worker,
            ..Default::default()
        },
    )
    .await?;
    let base = format!("http://{}", server.addr.expect("serving HTTP"));
    Ok(ScratchServe {
        server,
        base,
        key,
        scratch,
    })
}

/// Register `n` random rank-`rank` adapters on all seven projections, named `bench-0`,
/// `bench-1`, ...; their ids and names.
pub async fn random_adapters(
    s: &ScratchServe,
    n: usize,
    rank: usize,
) -> anyhow::Result<Vec<(i64, String)>> {
    let st = s.server.state.clone();
    let mut out = Vec::new();
    for i in 0..n {
        let peft = PeftConfig::new(rank, 2.0 * rank as f64, &Projection::ALL);
        let cfg = st.engine.model().llama.config.clone();
        let tensors = random_peft_tensors(&cfg, &peft, 0.02, &Device::Cpu)?;
        let dir = s.scratch.path().join(format!("adapter-{i}"));
        write_peft_dir(&dir, &peft, &tensors)?;
        let a = st
            .db
            .insert_adapter(&NewAdapter {
                assistant_id: None,
                name: &format!("bench-{i}"),
                path: &dir.display().to_string(),
                base_model: &st.model.name,
                base_model_hash: &st.model.hash,
                tokenizer_hash: &st.model.tokenizer_hash,
                chat_template_hash: &st.model.chat_template_hash,
                rank: Some(rank as i64),
                alpha: Some(2.0 * rank as f64),
                target_modules: &[],
                metrics: &serde_json::json!({}),
                job_id: None,
            })
            .await?;
        out.push((a.id, a.name));
    }
    Ok(out)
}

/// One streamed chat completion, timed.
pub struct Streamed {
    /// Request to the first non-empty content.
    pub first_ms: f64,
    /// Request to the end of the stream.
    pub total_ms: f64,
    /// Completion tokens: the usage the server reports, else the content chunks.
    pub tokens: usize,
    /// The first chunk's `system_fingerprint`.
    pub fingerprint: String,
    /// Whether the stream ended with `[DONE]`.
    pub done: bool,
}

/// POST `body` (with `"stream": true` and usage requested) to `{base}/v1/chat/completions`.
pub async fn stream_chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    mut body: serde_json::Value,
) -> anyhow::Result<Streamed> {
    body["stream"] = serde_json::json!(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let start = Instant::now();
    let mut resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("status {}: {}", resp.status(), resp.text().await?);
    }
    let (mut buf, mut first, mut fp, mut done) = (String::new(), None, String::new(), false);
    let (mut chunks, mut usage) = (0usize, None);
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if v.get("error").is_some() {
                bail!("{data}");
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                chunks += 1;
                if first.is_none() {
                    first = Some(start.elapsed().as_secs_f64() * 1e3);
                    fp = v["system_fingerprint"].as_str().unwrap_or("").to_string();
                }
            }
        }
    }
    Ok(Streamed {
        first_ms: first.context("no token came")?,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        tokens: usage.unwrap_or(chunks),
        fingerprint: fp,
        done,
    })
}

/// The `p` quantile (0..1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Queue a LoRA job on the served model with `examples` synthetic question/answer pairs
/// and the default settings; its id.
pub async fn queue_training(s: &ScratchServe, examples: usize) -> anyhow::Result<i64> {
    use loraloop_core::domain::{ChatExample, ChatMessage, Role};
    use loraloop_core::storage::{JobState, NewDataset, NewJob};
    let st = s.server.state.clone();
    let ex: Vec<ChatExample> = (0..examples)
        .map(|i| ChatExample {
            messages: vec![
                ChatMessage::new(Role::User, format!("What is the code word number {i}?")),
                ChatMessage::new(
                    Role::Assistant,
                    format!("The code word number {i} is pebble-{}.", i * 7919 % 1000),
                ),
            ],
        })
        .collect();
    let ds = st
        .db
        .insert_dataset(&NewDataset {
            assistant_id: None,
            name: "bench-training",
            format: "openai",
            source: "bench",
            content_hash: "bench",
            examples: &ex,
            ..Default::default()
        })
        .await?
        .dataset()
        .id;
    let job = st
        .db
        .create_job(&NewJob {
            assistant_id: None,
            dataset_id: ds,
            base_model: &st.model.name,
            method: "lora",
            hyperparameters: &serde_json::json!({"replay": false}),
        })
        .await?;
    st.db
        .transition_job(job.id, JobState::ValidatingFiles, JobState::Queued, None)
        .await?;
    Ok(job.id)
}
