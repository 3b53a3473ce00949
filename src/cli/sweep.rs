//! `loraloop sweep --config sweep.yaml`: start a hyperparameter sweep on the running
//! server (its worker trains the trials on the base model it already holds), follow it,
//! and print the trials ranked by their report cards.

use anyhow::{Context, bail};
use clap::Args;
use loraloop_core::Config;
use secrecy::ExposeSecret;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The server (default: http://server.host:server.port); the API key comes from
    /// LORALOOP_API_KEY or the config.
    #[arg(long)]
    pub server: Option<String>,
    /// Start it and print its id without waiting for the trials.
    #[arg(long)]
    pub no_wait: bool,
}

/// `file`: the sweep's YAML (the `--config` flag).
pub async fn sweep(
    config: &Config,
    args: &SweepArgs,
    file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let Some(file) = file else {
        bail!("name the sweep's YAML with --config sweep.yaml");
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let spec: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", file.display()))?;
    let s = &config.raw.server;
    let base = args
        .server
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", s.host, s.port));
    let Some(key) = &config.secrets.api_key else {
        bail!("set LORALOOP_API_KEY (the server's API key) to start a sweep");
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let key = key.expose_secret();
    let started = call(
        http.post(format!("{base}/api/v1/sweeps")).json(&spec),
        key,
        &base,
    )
    .await?;
    let id = started["id"]
        .as_i64()
        .context("the server answered without a sweep id")?;
    eprintln!(
        "sweep {id}: {} trials queued",
        started["trials"].as_array().map_or(0, Vec::len)
    );
    if args.no_wait {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = String::new();
    let done = loop {
        let v = call(http.get(format!("{base}/api/v1/sweeps/{id}")), key, &base).await?;
        let states: Vec<&str> = v["trials"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["status"].as_str()).collect())
            .unwrap_or_default();
        let line = format!(
            "{} of {} trials ended",
            states
                .iter()
                .filter(|s| matches!(**s, "succeeded" | "failed" | "cancelled"))
                .count(),
            states.len()
        );
        if line != last {
            eprintln!("sweep {id}: {line}");
            last = line;
        }
        if v["status"] == "finished" {
            break v;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    print!("{}", table(&done));
    Ok(ExitCode::SUCCESS)
}

/// Send `req` with the API key; the JSON answer, or the server's refusal as an error.
async fn call(req: reqwest::RequestBuilder, key: &str, base: &str) -> anyhow::Result<Value> {
    let r = req.bearer_auth(key).send().await.with_context(|| {
        format!("cannot reach the server at {base} (is `loraloop serve` running?)")
    })?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "the server refused ({status}): {}",
            v["error"]["message"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(v)
}

/// The trials as a Markdown table, best first.
fn table(v: &Value) -> String {
    let mut trials: Vec<&Value> = v["trials"]
        .as_array()
        .map(|t| t.iter().collect())
        .unwrap_or_default();
    trials.sort_by_key(|t| t["rank"].as_i64().unwrap_or(i64::MAX));
    let num = |x: &Value| x.as_f64().map_or("-".to_string(), |f| format!("{f:.4}"));
    let mut out = String::from(
        "| rank | job | settings | status | passes gate | held-out loss (base) | drift KL | adapter |\n|---|---|---|---|---|---|---|---|\n",
    );
    for t in trials {
        let st = &t["standing"];
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} |\n",
            t["rank"].as_i64().map_or("-".into(), |r| r.to_string()),
            t["job_id"],
            t["varied"],
            t["status"].as_str().unwrap_or("?"),
            st["passes"]
                .as_bool()
                .map_or("-", |p| if p { "yes" } else { "no" }),
            num(&st["heldout_loss"]),
            num(&st["base_heldout_loss"]),
            num(&st["drift_kl"]),
            t["adapter"].as_str().unwrap_or("-"),
        ));
    }
    if let Some(d) = v["decision"].as_str() {
        out.push_str(&format!("\n{d}\n"));
    }
    out
}
