//! Load test of the chat bots: simulated users, each sending messages one after another
//! (the next once the previous reply is complete), through a fake platform server, with
//! the real bot, engine and database. Reports messages/s, the p50/p95 reply latency
//! (message sent to final reply text) and time to first visible text (message sent to
//! the first streamed words), and checks that every message was stored and answered once.
//!
//! cargo bench --bench bot_load -- telegram|discord [--users 50] [--messages 10]
//!     [--model PATH.gguf] [--max-new-tokens 24]
//!
//! Without --model it runs a tiny random-weight model (the bot's own overhead); with the
//! real SmolLM2-135M GGUF the first-visible-text figure is what users would see.

#[path = "../tests/support/mod.rs"]
mod common;

use common::fake_discord::FakeDiscord;
use common::fake_telegram::{FakeTelegram, TOKEN, fake_telegram};
use std::time::{Duration, Instant};

struct Args {
    platform: String,
    users: usize,
    messages: usize,
    model: Option<std::path::PathBuf>,
    max_new_tokens: usize,
}

fn args() -> Args {
    let mut a = Args {
        platform: String::new(),
        users: 50,
        messages: 10,
        model: None,
        max_new_tokens: 24,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match x.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--users" => a.users = value("--users").parse().expect("--users N"),
            "--messages" => a.messages = value("--messages").parse().expect("--messages N"),
            "--model" => {
                // A relative path is taken from the workspace root (this package's
                // folder), where the README's commands run, wherever the binary is started.
                let given = std::path::PathBuf::from(value("--model"));
                let path = if given.is_absolute() {
                    given
                } else {
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(given)
                };
                a.model = Some(
                    path.canonicalize()
                        .unwrap_or_else(|e| panic!("--model {}: {e}", path.display())),
                )
            }
            "--max-new-tokens" => {
                a.max_new_tokens = value("--max-new-tokens").parse().expect("a number")
            }
            p if !p.starts_with('-') && a.platform.is_empty() => a.platform = p.to_string(),
            other => panic!("unknown argument {other:?}"),
        }
    }
    if a.platform.is_empty() {
        a.platform = "telegram".to_string();
    }
    a
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// When the bot first showed text in `chat` after `since`, and when the final reply (the
/// message with the rating buttons) arrived; None while it has not.
fn reply_times(fake: &FakeTelegram, chat: i64, since: Instant) -> Option<(Instant, Instant)> {
    let f = fake.0.lock().unwrap();
    let mut first = None;
    for &i in f.by_chat.get(&chat)? {
        let ((method, p), at) = (&f.calls[i], f.call_times[i]);
        if at < since {
            continue;
        }
        let is_text = method == "sendmessage" || method == "editmessagetext";
        if is_text && first.is_none() {
            first = Some(at);
        }
        let rated = p["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
            .as_str()
            .is_some_and(|d| d.starts_with("rate:"));
        if rated {
            return Some((first.unwrap_or(at), at));
        }
    }
    None
}

/// The configuration both platforms share: the model, reply length, no rate limit in
/// the way.
fn model_env(a: &Args) -> (Vec<(&'static str, String)>, String) {
    let mut env = vec![(
        "LORALOOP_GENERATION__MAX_NEW_TOKENS",
        a.max_new_tokens.to_string(),
    )];
    let name = match &a.model {
        Some(m) => {
            let dir = m.parent().expect("--model is a file path");
            let file = m.file_name().unwrap().to_string_lossy().into_owned();
            env.push(("LORALOOP_MODELS_DIR", dir.display().to_string()));
            env.push(("LORALOOP_MODEL", file.clone()));
            file
        }
        None => {
            // Greedy on random weights the tiny model says only newlines; a penalty on
            // repeats makes it say words, so replies stream as real ones do.
            env.push(("LORALOOP_GENERATION__REPETITION_PENALTY", "2".to_string()));
            "a tiny random-weight model".to_string()
        }
    };
    (env, name)
}

/// Each simulated user sends its messages one after another (the next once the previous
/// reply is complete); `send(user, i)` sends one and returns the moment it went out,
/// `done(user, since)` says (first visible text, final text) once the reply is complete.
async fn drive<S, D>(a: &Args, send: S, done: D) -> (f64, Vec<f64>, Vec<f64>)
where
    S: Fn(usize, usize) + Send + Sync + Clone + 'static,
    D: Fn(usize, Instant) -> Option<(Instant, Instant)> + Send + Sync + Clone + 'static,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for u in 0..a.users {
        let (send, done) = (send.clone(), done.clone());
        let n = a.messages;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..n {
                let sent = Instant::now();
                send(u, i);
                let deadline = sent + Duration::from_secs(600);
                loop {
                    if let Some((first, last)) = done(u, sent) {
                        out.push((
                            (first - sent).as_secs_f64() * 1e3,
                            (last - sent).as_secs_f64() * 1e3,
                        ));
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "user {u} got no reply to message {i}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            out
        }));
    }
    let (mut first, mut reply) = (Vec::new(), Vec::new());
    for t in tasks {
        for (f, r) in t.await.unwrap() {
            first.push(f);
            reply.push(r);
        }
    }
    first.sort_by(f64::total_cmp);
    reply.sort_by(f64::total_cmp);
    (start.elapsed().as_secs_f64(), first, reply)
}

/// Print the figures; check every message was stored once and answered once.
async fn report(
    platform: &str,
    a: &Args,
    s: common::TestServer,
    (wall, first, reply): (f64, Vec<f64>, Vec<f64>),
    delivered: usize,
) {
    // Let the last updates be marked done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db = &s.server.state.db;
    let count = |sql: &'static str| async move {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(db.pool()).await.unwrap();
        n as usize
    };
    let total = a.users * a.messages;
    let users = count("select count(*) from messages where role = 'user'").await;
    let replies = count("select count(*) from messages where role = 'assistant'").await;
    let done = count("select count(*) from inbound_updates where status = 'done'").await;
    println!(
        "{platform} load: {total} messages from {} users in {wall:.1} s = {:.1} messages/s",
        a.users,
        total as f64 / wall
    );
    println!(
        "  reply latency (sent -> final text):  p50 {:.0} ms, p95 {:.0} ms",
        percentile(&reply, 0.5),
        percentile(&reply, 0.95)
    );
    println!(
        "  time to first visible text:          p50 {:.0} ms, p95 {:.0} ms",
        percentile(&first, 0.5),
        percentile(&first, 0.95)
    );
    println!(
        "  stored: {users} user messages, {replies} replies; {done} updates done; {delivered} rated replies delivered"
    );
    let ok = users == total && replies == total && done == total && delivered == total;
    s.stop().await;
    if !ok {
        eprintln!("FAILED: every message must be stored and answered exactly once");
        std::process::exit(1);
    }
}

async fn telegram(a: &Args) {
    let (fake, url) = fake_telegram().await;
    let (mut env, model_name) = model_env(a);
    env.push(("TELEGRAM_BOT_TOKEN", TOKEN.to_string()));
    env.push(("LORALOOP_TELEGRAM__API_URL", url.clone()));
    env.push((
        "LORALOOP_TELEGRAM__RATE_LIMIT_PER_MINUTE",
        "1000".to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = common::start(false, &env).await;
    // Wait for the bot to be about to poll (deleteWebhook comes right before).
    common::until(30, "the bot polling", || {
        !fake.calls("deletewebhook").is_empty()
    })
    .await;
    eprintln!(
        "telegram: {} users x {} messages, {model_name}, max_new_tokens {}",
        a.users, a.messages, a.max_new_tokens
    );
    let chat = |u: usize| 100_000 + u as i64;
    let (f1, f2) = (fake.clone(), fake.clone());
    let figures = drive(
        a,
        move |u, i| {
            f1.text(
                chat(u),
                &format!("Message {i} from user {u}: tell me about Zorblax."),
            );
        },
        move |u, since| reply_times(&f2, chat(u), since),
    )
    .await;
    let delivered = (0..a.users)
        .map(|u| common::fake_telegram::rated_replies(&fake, chat(u)))
        .sum();
    report("telegram", a, s, figures, delivered).await;
}

async fn discord(a: &Args) {
    const DISCORD_TOKEN: &str = "discord-bench-token";
    let fake = FakeDiscord::start(DISCORD_TOKEN).await;
    let (mut env, model_name) = model_env(a);
    env.push(("DISCORD_BOT_TOKEN", DISCORD_TOKEN.to_string()));
    env.push(("LORALOOP_DISCORD__API_URL", fake.api_url.clone()));
    env.push((
        "LORALOOP_DISCORD__RATE_LIMIT_PER_MINUTE",
        "1000".to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = common::start(false, &env).await;
    common::until(30, "the bot to connect", || fake.is_live()).await;
    eprintln!(
        "discord: {} users x {} messages, {model_name}, max_new_tokens {}",
        a.users, a.messages, a.max_new_tokens
    );
    let user = |u: usize| 200_000 + u as u64;
    let (f1, f2) = (fake.clone(), fake.clone());
    let figures = drive(
        a,
        move |u, i| {
            f1.dm(
                user(u),
                &format!("Message {i} from user {u}: tell me about Zorblax."),
            );
        },
        move |u, since| {
            // A reply is complete once the bot put the rating reactions on it.
            f2.replies(FakeDiscord::dm_channel(user(u)))
                .into_iter()
                .find(|r| r.created >= since)
                .map(|r| (r.created, r.versions.last().map_or(r.created, |v| v.0)))
        },
    )
    .await;
    let delivered = (0..a.users)
        .map(|u| fake.replies(FakeDiscord::dm_channel(user(u))).len())
        .sum();
    report("discord", a, s, figures, delivered).await;
}

fn main() {
    // As the `loraloop` binary does: without it every candle matmul parses /proc/cpuinfo.
    // SAFETY: first thing in `main`, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        loraloop_model::pin_candle_thread_count()
    };
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match a.platform.as_str() {
        "telegram" => rt.block_on(telegram(&a)),
        "discord" => rt.block_on(discord(&a)),
        other => panic!("unknown platform {other:?}: use telegram or discord"),
    }
}
