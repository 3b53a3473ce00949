//! The crash campaign: `loraloop serve` (both bots and the training worker, the tiny
//! model) killed with SIGKILL at a random point of every round while Telegram and Discord
//! users write and training jobs run, then started again on the same files. At the end
//! every message must be answered once and every job must have finished: the counts of
//! lost, duplicated and unanswered messages and stuck jobs are printed (the README's
//! figures come from `CRASH_ROUNDS=40`).

use super::fake_discord::FakeDiscord;
use super::fake_telegram::{self, TOKEN, bot_messages, rated_replies};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use serde_json::json;
use std::time::{Duration, Instant};

const KEY: &str = "crash-api-key";
const DISCORD_TOKEN: &str = "crash-discord-token";

struct Serve {
    dir: std::path::PathBuf,
    port: u16,
    tg_url: String,
    discord_url: String,
}

impl Serve {
    fn spawn(&self) -> std::process::Child {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"));
        for (key, _) in std::env::vars() {
            if key.starts_with("LORALOOP_") || key.ends_with("_BOT_TOKEN") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(&self.dir)
            .args(["serve"])
            .env("LORALOOP_MODELS_DIR", self.dir.join("models"))
            .env("LORALOOP_MODEL", "tiny")
            .env("LORALOOP_SERVER__PORT", self.port.to_string())
            .env("LORALOOP_API_KEY", KEY)
            .env("LORALOOP_ADMIN_PASSWORD", "crash-password")
            .env("LORALOOP_GENERATION__MAX_NEW_TOKENS", "24")
            .env("LORALOOP_ASSISTANT__ACTIVATION", "manual")
            .env("TELEGRAM_BOT_TOKEN", TOKEN)
            .env("LORALOOP_TELEGRAM__API_URL", &self.tg_url)
            .env("DISCORD_BOT_TOKEN", DISCORD_TOKEN)
            .env("LORALOOP_DISCORD__API_URL", &self.discord_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }
}

fn sigkill(child: &mut std::process::Child) {
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}

/// The Telegram messages the bot sent (as the fake recorded them) whose ids the database
/// of the killed process does not hold: neither as the message a reply streams into nor
/// as a stored reply's. The kill came between Telegram creating each and the bot
/// recording it, so the bot cannot know of them and sends the reply again (Telegram has
/// no idempotency key; the README says so). Read after the kill, before the next start,
/// for the sends after the first `since` (the killed process's own: a later process may
/// overwrite an earlier one's record).
async fn sends_unrecorded_at_kill(
    tg: &fake_telegram::FakeTelegram,
    dir: &std::path::Path,
    since: usize,
) -> Vec<(i64, i64)> {
    // Serve was up before the first kill, so the database exists. Opening it recovers
    // the write-ahead log, as the next start would; the connection closes before it.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("data/loraloop.db"));
    let mut db = sqlx::ConnectOptions::connect(&options)
        .await
        .expect("the killed process's database");
    let recorded: std::collections::HashSet<String> = sqlx::query_scalar(
        "select reply_platform_id from inbound_updates where reply_platform_id is not null \
         union select platform_message_id from messages where platform_message_id is not null",
    )
    .fetch_all(&mut db)
    .await
    .expect("the recorded reply ids")
    .into_iter()
    .collect();
    tg.calls("sendmessage")
        .iter()
        .skip(since)
        .filter_map(|p| Some((p["chat_id"].as_i64()?, p["_message_id"].as_i64()?)))
        .filter(|(_, id)| !recorded.contains(&id.to_string()))
        .collect()
}

/// A small xorshift: the kill points vary per round and are the same for one seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_duplicates_and_strands_nothing() {
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let (tg, tg_url) = fake_telegram::fake_telegram().await;
    let discord = FakeDiscord::start(DISCORD_TOKEN).await;
    let serve = Serve {
        dir: dir.path().to_path_buf(),
        port: std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
        tg_url,
        discord_url: discord.api_url.clone(),
    };
    let base = format!("http://127.0.0.1:{}", serve.port);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
    let mut tg_users = Vec::new();
    // Discord users are returning ones: a bot learns of a DM channel only from a message
    // in it, and a new session does not receive what was sent while none was live, so
    // only channels the bot has seen are read after downtime (see the README).
    let dc_users: Vec<u64> = (60_001..=60_004).collect();
    let mut dc_sent = 0usize;
    let mut jobs = Vec::new();
    // (chat, message id) of Telegram sends the database had not recorded at a kill.
    let mut unrecorded = std::collections::HashSet::new();
    let mut sends_before = 0;
    let mut child = serve.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !discord.is_live() {
        assert!(Instant::now() < deadline, "the Discord bot did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for u in &dc_users {
        discord.dm(*u, "Hello!");
    }
    dc_sent += 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dc_users
        .iter()
        .all(|u| discord.replies(FakeDiscord::dm_channel(*u)).len() == 1)
    {
        assert!(Instant::now() < deadline, "the first Discord replies");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for round in 0..rounds {
        // Up: HTTP answers (the bots start beside it).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http.get(format!("{base}/healthz")).send().await, Ok(r) if r.status().is_success() || r.status() == 503)
        {
            assert!(
                Instant::now() < deadline,
                "serve did not come up in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every other round a training job joins the queue.
        if round % 2 == 0 {
            let r = http
                .post(format!("{base}/api/v1/datasets?name=zorblax-{round}"))
                .bearer_auth(KEY)
                .header("content-type", "application/x-ndjson")
                .body(format!("{line}\n").repeat(8 + round as usize))
                .send()
                .await;
            if let Ok(r) = r
                && r.status().is_success()
            {
                let ds: serde_json::Value = r.json().await.unwrap();
                let ds = ds["dataset"]["id"].as_i64().unwrap();
                if let Ok(r) = http
                    .post(format!("{base}/api/v1/fine-tune"))
                    .bearer_auth(KEY)
                    .json(&json!({"dataset_id": ds, "epochs": 3,
                                  "hyperparameters": {"batch_size": 4, "lora_r": 4, "sequence_len": 64}}))
                    .send()
                    .await
                    && r.status().is_success()
                {
                    let job: serde_json::Value = r.json().await.unwrap();
                    jobs.push(job["id"].as_i64().unwrap());
                }
            }
        }
        // Users write on both platforms, one message each (a new user per message, so
        // every chat's bot messages are that message's replies).
        for i in 0..4 {
            let tg_user = 50_000 + (round * 10 + i) as i64;
            tg.text(tg_user, "Tell me about Zorblax.");
            tg_users.push(tg_user);
        }
        for u in &dc_users {
            discord.dm(*u, "Tell me about Zorblax.");
        }
        dc_sent += 1;
        // Killed at a random point: while updates are stored, replies stream, jobs train.
        tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
        sigkill(&mut child);
        unrecorded.extend(sends_unrecorded_at_kill(&tg, dir.path(), sends_before).await);
        sends_before = tg.calls("sendmessage").len();
        child = serve.spawn();
    }

    // The last start: everything settles.
    let settle = Instant::now() + Duration::from_secs(240);
    let answered_tg = |u: &i64| rated_replies(&tg, *u) >= 1;
    // Each Discord user wrote `dc_sent` messages: as many replies are due.
    let answered_dc = |u: &u64| discord.replies(FakeDiscord::dm_channel(*u)).len() >= dc_sent;
    let mut job_states = Vec::new();
    loop {
        job_states.clear();
        for id in &jobs {
            let state = match http
                .get(format!("{base}/api/v1/fine-tune/{id}"))
                .bearer_auth(KEY)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    r.json::<serde_json::Value>().await.unwrap()["status"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string()
                }
                _ => "?".to_string(),
            };
            job_states.push(state);
        }
        let done = tg_users.iter().all(answered_tg)
            && dc_users.iter().all(answered_dc)
            && job_states
                .iter()
                .all(|s| ["succeeded", "failed", "cancelled"].contains(&s.as_str()));
        if done || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let unanswered_tg = tg_users.iter().filter(|u| !answered_tg(u)).count();
    let unanswered_dc: usize = dc_users
        .iter()
        .map(|u| dc_sent.saturating_sub(discord.replies(FakeDiscord::dm_channel(*u)).len()))
        .sum();
    // A chat's second bot message is explained only by a first one the kill kept the
    // database from recording; any other is a defect.
    let mut duplicated_tg = 0;
    let mut unexplained_tg = 0;
    for u in &tg_users {
        let (messages, _) = bot_messages(&tg, *u);
        let extra = messages.saturating_sub(1);
        let cut_off = unrecorded.iter().filter(|(chat, _)| chat == u).count();
        duplicated_tg += extra;
        unexplained_tg += extra.saturating_sub(cut_off);
    }
    let duplicated_dc: usize = dc_users
        .iter()
        .map(|u| {
            discord
                .sent()
                .iter()
                .filter(|m| m.channel == FakeDiscord::dm_channel(*u))
                .count()
                .saturating_sub(dc_sent)
        })
        .sum();
    let stuck = job_states
        .iter()
        .filter(|s| !["succeeded", "failed", "cancelled"].contains(&s.as_str()))
        .count();
    let failed_jobs = job_states.iter().filter(|s| s.as_str() == "failed").count();
    let messages = tg_users.len() + dc_users.len() * dc_sent;
    eprintln!(
        "crash campaign: {rounds} SIGKILLs (seed {seed}); {messages} messages ({} Telegram, {} Discord), {} jobs; \
         unanswered {unanswered_tg} + {unanswered_dc}, duplicated {duplicated_tg} + {duplicated_dc} \
         (Telegram sends the kill kept the database from recording: {}), stuck jobs {stuck}, failed jobs {failed_jobs}",
        tg_users.len(),
        dc_users.len() * dc_sent,
        jobs.len(),
        unrecorded.len()
    );
    sigkill(&mut child);
    assert_eq!(
        (unanswered_tg, unanswered_dc),
        (0, 0),
        "every message answered"
    );
    assert_eq!(stuck, 0, "every job finished: {job_states:?}");
    assert_eq!(duplicated_dc, 0, "Discord: each reply once");
    assert_eq!(
        unexplained_tg, 0,
        "Telegram: each reply once, but for a send the kill kept from being recorded"
    );
}
