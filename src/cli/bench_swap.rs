//! `loraloop bench swap`: the time from an activation request to the first token the new
//! adapter generates, measured end to end over HTTP against a real `serve` (started in
//! this process on a scratch database), while other chats stream continuously; every
//! one of those chats must finish.

use super::BenchSwapArgs;
use super::bench_http::{percentile, random_adapters, start_scratch_serve, stream_chat};
use anyhow::bail;
use loraloop_core::Config;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

/// Stream one chat with `max_tokens`; (ms to the first content token, its fingerprint,
/// whether it ended cleanly).
async fn first_token(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    max_tokens: usize,
) -> anyhow::Result<(f64, String, bool)> {
    let r = stream_chat(
        http,
        base,
        key,
        serde_json::json!({
            "model": "loraloop", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}]
        }),
    )
    .await?;
    Ok((r.first_ms, r.fingerprint, r.done))
}

pub async fn swap(config: &Config, args: &BenchSwapArgs) -> anyhow::Result<ExitCode> {
    let serve = start_scratch_serve(config, args.model.as_ref(), false).await?;
    let st = serve.server.state.clone();
    let (base, key) = (serve.base.clone(), serve.key.clone());
    // Two random rank-r adapters on all seven projections, registered like trained ones.
    let ids = random_adapters(&serve, 2, args.rank).await?;
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
    serve.server.stop().await?;
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
