//! `loraloop bench swap`: the time from an activation request to the first token the new
//! adapter generates, measured end to end over HTTP against a real `serve` (started in
//! this process on a scratch database), while other chats stream continuously; every
//! one of those chats must finish.

use super::BenchSwapArgs;
use anyhow::{Context, bail};
use candle_core::Device;
use loraloop_core::Config;
use loraloop_core::storage::NewAdapter;
use loraloop_model::llama::Projection;
use loraloop_model::lora::{PeftConfig, random_peft_tensors, write_peft_dir};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

/// Stream one chat; returns (ms to the first content token, its fingerprint), or an error.
async fn first_token(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    max_tokens: usize,
) -> anyhow::Result<(f64, String, bool)> {
    let start = Instant::now();
    let mut resp = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": "loraloop", "stream": true, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}]
        }))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let (mut buf, mut first, mut fp, mut done) = (String::new(), None, String::new(), false);
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
            if first.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                first = Some(start.elapsed().as_secs_f64() * 1e3);
                fp = v["system_fingerprint"].as_str().unwrap_or("").to_string();
            }
        }
    }
    Ok((first.context("no token came")?, fp, done))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn swap(config: &Config, args: &BenchSwapArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::tempdir()?;
    let mut config = config.clone();
    if let Some(m) = &args.model {
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
            worker: false,
            ..Default::default()
        },
    )
    .await?;
    let st = server.state.clone();
    let base = format!("http://{}", server.addr.expect("serving HTTP"));

    // Two random rank-r adapters on all seven projections, registered like trained ones.
    let mut ids = Vec::new();
    for i in 0..2 {
        let peft = PeftConfig::new(args.rank, 2.0 * args.rank as f64, &Projection::ALL);
        let cfg = st.engine.model().llama.config.clone();
        let tensors = random_peft_tensors(&cfg, &peft, 0.02, &Device::Cpu)?;
        let dir = scratch.path().join(format!("adapter-{i}"));
        write_peft_dir(&dir, &peft, &tensors)?;
        let a = st
            .db
            .insert_adapter(&NewAdapter {
                name: &format!("bench-{i}"),
                path: &dir.display().to_string(),
                base_model: &st.model.name,
                base_model_hash: &st.model.hash,
                tokenizer_hash: &st.model.tokenizer_hash,
                chat_template_hash: &st.model.chat_template_hash,
                rank: Some(args.rank as i64),
                alpha: Some(2.0 * args.rank as f64),
                target_modules: &[],
                metrics: &serde_json::json!({}),
                job_id: None,
            })
            .await?;
        ids.push((a.id, a.name));
    }
    let http = reqwest::Client::new();

    // Background chats that keep the engine busy through every swap.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..args.load {
        let (http, base, key, stop, ok, failed) = (
            http.clone(),
            base.clone(),
            key.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match first_token(&http, &base, &key, 48).await {
                    Ok((_, _, true)) => ok.fetch_add(1, Ordering::SeqCst),
                    Ok(_) | Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    eprintln!(
        "model {} | {} swaps between two random rank-{} adapters | {} chats streaming in the background",
        st.model.name, args.swaps, args.rank, args.load
    );
    // The same request without a swap before it (an adapter active, as in the swaps): the
    // time to first token the swap adds to.
    let r = http
        .post(format!("{base}/api/v1/adapters/{}/activate", ids[1].0))
        .bearer_auth(&key)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("activation failed: {}", r.text().await?);
    }
    let mut baseline = Vec::new();
    for _ in 0..args.swaps.min(20) {
        baseline.push(first_token(&http, &base, &key, 4).await?.0);
    }
    baseline.sort_by(f64::total_cmp);
    let (mut to_first, mut activate_ms, mut wrong) = (Vec::new(), Vec::new(), 0usize);
    for i in 0..args.swaps + 1 {
        let (id, name) = &ids[i % 2];
        let t0 = Instant::now();
        let r = http
            .post(format!("{base}/api/v1/adapters/{id}/activate"))
            .bearer_auth(&key)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("activation failed: {}", r.text().await?);
        }
        let act_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (_, fp, _) = first_token(&http, &base, &key, 4).await?;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        if !fp.starts_with(&format!("adapter:{name}@")) {
            wrong += 1;
        }
        // The first activation of each adapter loads it from disk: report those apart.
        if i >= 2 {
            to_first.push(total);
            activate_ms.push(act_ms);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        let _ = l.await;
    }
    server.stop().await?;
    to_first.sort_by(f64::total_cmp);
    activate_ms.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "swaps": to_first.len(),
        "activate_to_first_token_ms": {"p50": percentile(&to_first, 0.5), "p99": percentile(&to_first, 0.99), "max": to_first[to_first.len() - 1]},
        "activate_request_ms": {"p50": percentile(&activate_ms, 0.5), "p99": percentile(&activate_ms, 0.99)},
        "first_token_without_swap_ms": {"p50": percentile(&baseline, 0.5), "p99": percentile(&baseline, 0.99)},
        "replies_from_the_wrong_adapter": wrong,
        "background_chats_ok": ok.load(Ordering::SeqCst),
        "background_chats_failed": failed.load(Ordering::SeqCst),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "activate -> first token of the new adapter: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} swaps; the activation request alone p50 {:.2} ms)",
            report["activate_to_first_token_ms"]["p50"]
                .as_f64()
                .unwrap_or(0.0),
            report["activate_to_first_token_ms"]["p99"]
                .as_f64()
                .unwrap_or(0.0),
            report["activate_to_first_token_ms"]["max"]
                .as_f64()
                .unwrap_or(0.0),
            to_first.len(),
            report["activate_request_ms"]["p50"].as_f64().unwrap_or(0.0),
        );
        println!(
            "the same request without a swap: first token p50 {:.1} ms, p99 {:.1} ms (prompt processing under the background load)",
            report["first_token_without_swap_ms"]["p50"]
                .as_f64()
                .unwrap_or(0.0),
            report["first_token_without_swap_ms"]["p99"]
                .as_f64()
                .unwrap_or(0.0),
        );
        println!(
            "replies from the wrong adapter: {wrong}; background chats: {} finished, {} failed",
            report["background_chats_ok"], report["background_chats_failed"]
        );
    }
    let failed = failed.load(Ordering::SeqCst);
    Ok(if wrong == 0 && failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
