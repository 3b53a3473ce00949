//! `loraloop bench load`: many concurrent streaming chats against `serve` (started in
//! this process on a scratch database), each client on one of several random adapters,
//! and optionally the same clients against another OpenAI-compatible server (llama.cpp's
//! `llama-server`, started by `scripts/bench-serve.sh`) in the same run: aggregate
//! generated tokens/s, time to first token and reply time per number of clients.

use super::BenchLoadArgs;
use super::bench_http::{
    Streamed, percentile, queue_training, random_adapters, start_scratch_serve, stream_chat,
};
use anyhow::bail;
use loraloop_core::Config;
use std::process::ExitCode;
use std::time::Instant;

const TOPICS: [&str; 16] = [
    "the sea",
    "bread",
    "mountains",
    "bicycles",
    "the moon",
    "libraries",
    "rain",
    "coffee",
    "trains",
    "gardens",
    "winter",
    "music",
    "bridges",
    "cats",
    "the desert",
    "markets",
];

/// Numbers the prompts start with, different in every run.
static NONCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// One side's numbers for one number of clients.
#[derive(Debug, serde::Serialize)]
struct Side {
    clients: usize,
    replies: usize,
    tokens: usize,
    wall_s: f64,
    tokens_per_s: f64,
    first_token_p50_ms: f64,
    first_token_p95_ms: f64,
    reply_p95_ms: f64,
}

/// `clients` concurrent clients, each sending `requests` chats one after another; client
/// `i` names `models[i % len]`.
async fn drive(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    models: &[String],
    clients: usize,
    args: &BenchLoadArgs,
) -> anyhow::Result<Side> {
    let start = Instant::now();
    let nonce = NONCE.fetch_add(10_000, std::sync::atomic::Ordering::Relaxed);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, base, key) = (http.clone(), base.to_string(), key.to_string());
        let model = models[c % models.len()].clone();
        let (requests, max_tokens) = (args.requests, args.max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<Streamed> = Vec::new();
            for r in 0..requests {
                let topic = TOPICS[(c * requests + r) % TOPICS.len()];
                // The same system prompt on both sides (each template would add its own
                // default otherwise); a number unique to the run first in the user's turn,
                // so no server answers from a cached prompt of an earlier run.
                let body = serde_json::json!({
                    "model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": format!("{}. Write a short paragraph about {topic}.", nonce + c * requests + r)}
                    ]
                });
                out.push(stream_chat(&http, &base, &key, body).await?);
            }
            anyhow::Ok(out)
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.extend(t.await??);
    }
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(r) = replies.iter().find(|r| !r.done) {
        bail!("a stream ended without [DONE] after {:.0} ms", r.total_ms);
    }
    let tokens: usize = replies.iter().map(|r| r.tokens).sum();
    let mut first: Vec<f64> = replies.iter().map(|r| r.first_ms).collect();
    let mut total: Vec<f64> = replies.iter().map(|r| r.total_ms).collect();
    first.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    Ok(Side {
        clients,
        replies: replies.len(),
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s,
        first_token_p50_ms: percentile(&first, 0.5),
        first_token_p95_ms: percentile(&first, 0.95),
        reply_p95_ms: percentile(&total, 0.95),
    })
}

pub async fn load(config: &Config, args: &BenchLoadArgs) -> anyhow::Result<ExitCode> {
    // Numbers no earlier run of this command used either (a server kept running between
    // runs would otherwise find their prompts cached).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as usize);
    NONCE.store(
        (now % 1_000_000) * 1_000_000,
        std::sync::atomic::Ordering::Relaxed,
    );
    let serve = start_scratch_serve(config, args.model.as_ref(), args.while_training).await?;
    let models: Vec<String> = if args.adapters == 0 {
        vec!["base".to_string()]
    } else {
        random_adapters(&serve, args.adapters, args.rank)
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    };
    // A fresh connection per chat: a pooled one that the other server closed while idle
    // fails the next request ("connection closed before message completed").
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let other_key = std::env::var("BENCH_AGAINST_KEY").unwrap_or_else(|_| "none".into());
    let other_models = vec!["default".to_string()];
    // Warm both sides (page cache, allocations, each adapter loaded once).
    drive(
        &http,
        &serve.base,
        &serve.key,
        &models,
        models.len(),
        &BenchLoadArgs {
            requests: 1,
            max_tokens: 4,
            ..args.clone()
        },
    )
    .await?;
    if let Some(url) = &args.against {
        drive(
            &http,
            url,
            &other_key,
            &other_models,
            1,
            &BenchLoadArgs {
                requests: 1,
                max_tokens: 4,
                ..args.clone()
            },
        )
        .await?;
    }
    let mut rows = Vec::new();
    for &n in &args.clients {
        let theirs = match &args.against {
            Some(url) => Some(drive(&http, url, &other_key, &other_models, n, args).await?),
            None => None,
        };
        let ours = drive(&http, &serve.base, &serve.key, &models, n, args).await?;
        eprintln!(
            "{n} clients: loraloop {:.1} tok/s{}",
            ours.tokens_per_s,
            theirs
                .as_ref()
                .map(|t| format!(", other {:.1} tok/s", t.tokens_per_s))
                .unwrap_or_default()
        );
        rows.push((ours, theirs));
    }
    let training = if args.while_training {
        Some(beside_training(&serve, &http, &models, args).await?)
    } else {
        None
    };
    let stats = serve.server.state.engine.stats();
    serve.server.stop().await?;
    if let Some(t) = &training {
        println!("{t}");
    }
    if args.json {
        for (ours, theirs) in &rows {
            println!(
                "{}",
                serde_json::json!({"loraloop": ours, "other": theirs, "adapters": args.adapters})
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let with = if args.adapters == 0 {
        "no adapter".to_string()
    } else {
        format!("{} adapters", args.adapters)
    };
    println!(
        "| clients | other tok/s | loraloop ({with}) tok/s | ratio | first token p50 other / loraloop | p95 other / loraloop | reply p95 other / loraloop |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (o, t) in &rows {
        let (tt, tp50, tp95, trep) = match t {
            Some(t) => (
                format!("{:.1}", t.tokens_per_s),
                format!("{:.2}", t.first_token_p50_ms / 1e3),
                format!("{:.2}", t.first_token_p95_ms / 1e3),
                format!("{:.2}", t.reply_p95_ms / 1e3),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let ratio = t
            .as_ref()
            .map(|t| format!("{:.2}x", o.tokens_per_s / t.tokens_per_s))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {tt} | {:.1} | {ratio} | {tp50} / {:.2} s | {tp95} / {:.2} s | {trep} / {:.2} s |",
            o.clients,
            o.tokens_per_s,
            o.first_token_p50_ms / 1e3,
            o.first_token_p95_ms / 1e3,
            o.reply_p95_ms / 1e3,
        );
    }
    println!(
        "loraloop engine: {} decode steps, {:.1} rows per step on average, at most {}; {} prompt tokens started from cached prefixes; {} replies parked for room",
        stats.decode_steps,
        stats.decoded_rows as f64 / stats.decode_steps.max(1) as f64,
        stats.largest_batch,
        stats.reused_prompt_tokens,
        stats.parked
    );
    Ok(ExitCode::SUCCESS)
}

/// The same clients on loraloop alone and while a fine-tune runs in the same `serve`
/// (the job queued once, measured from its first step on); a markdown table.
async fn beside_training(
    serve: &super::bench_http::ScratchServe,
    http: &reqwest::Client,
    models: &[String],
    args: &BenchLoadArgs,
) -> anyhow::Result<String> {
    let db = serve.server.state.db.clone();
    let mut idle = Vec::new();
    for &n in &args.clients {
        idle.push(drive(http, &serve.base, &serve.key, models, n, args).await?);
    }
    let id = queue_training(serve, 400).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(900);
    while db.job(id).await?.step < 1 {
        if let Some(e) = db.job(id).await?.error {
            bail!("the training job failed: {e}");
        }
        if Instant::now() > deadline {
            bail!("the training job did not start within 15 minutes");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut out = String::from(
        "| clients | idle tok/s | while training tok/s | ratio | first token p95 idle / training | training steps during the run |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for (&n, quiet) in args.clients.iter().zip(&idle) {
        let before = db.job(id).await?.step;
        let busy = drive(http, &serve.base, &serve.key, models, n, args).await?;
        let after = db.job(id).await?.step;
        eprintln!(
            "{n} clients while training: {:.1} tok/s (idle {:.1})",
            busy.tokens_per_s, quiet.tokens_per_s
        );
        out.push_str(&format!(
            "| {n} | {:.1} | {:.1} | {:.2}x | {:.2} / {:.2} s | {} in {:.0} s |\n",
            quiet.tokens_per_s,
            busy.tokens_per_s,
            busy.tokens_per_s / quiet.tokens_per_s,
            quiet.first_token_p95_ms / 1e3,
            busy.first_token_p95_ms / 1e3,
            after - before,
            busy.wall_s,
        ));
    }
    db.request_cancel(id).await?;
    Ok(out)
}
