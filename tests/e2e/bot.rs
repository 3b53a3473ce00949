//! `loraloop bot telegram|discord`: each bot alone, as its own process, against the fake
//! Telegram Bot API server and the fake Discord of the server tests; SIGTERM stops it
//! cleanly.

use super::fake_discord;
use super::fake_telegram::{TOKEN, fake_telegram, rated_replies};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use std::time::{Duration, Instant};

/// `loraloop bot <kind>` in `dir` with the tiny model there and a clean environment.
fn bot(dir: &std::path::Path, kind: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("loraloop"));
    cmd.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") || super::SCRUBBED.contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
    cmd.args(["bot", kind])
        .env("LORALOOP_MODELS_DIR", dir.join("models"))
        .env("LORALOOP_MODEL", "tiny")
        .env("LORALOOP_GENERATION__MAX_NEW_TOKENS", "8")
        .stderr(std::process::Stdio::piped());
    cmd
}

/// SIGTERM; the process must exit 0. Its stderr.
async fn terminate(child: std::process::Child) -> String {
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit after SIGTERM: {stderr}");
    stderr
}

#[tokio::test]
async fn the_telegram_bot_runs_alone_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let (fake, url) = fake_telegram().await;
    let mut child = bot(dir.path(), "telegram")
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("LORALOOP_TELEGRAM__API_URL", &url)
        .spawn()
        .unwrap();
    fake.text(9001, "hello from the command line");
    let deadline = Instant::now() + Duration::from_secs(60);
    while rated_replies(&fake, 9001) == 0 {
        assert!(
            Instant::now() < deadline,
            "no reply from `loraloop bot telegram`"
        );
        assert!(child.try_wait().unwrap().is_none(), "the bot exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stderr = terminate(child).await;
    assert!(stderr.contains("the telegram bot is running"), "{stderr}");
    assert!(!stderr.contains("secret-test-token"), "{stderr}");
    // The conversation is in the database the console reads: the user's message and the
    // reply, in one Telegram conversation.
    let db = loraloop_core::Db::open(&dir.path().join("data/loraloop.db"))
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "select ch.platform, m.role, m.content from messages m
         join conversations c on c.id = m.conversation_id join chats ch on ch.id = c.chat_id
         order by m.id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2.as_str()),
        ("telegram", "user", "hello from the command line")
    );
    assert_eq!(
        (rows[1].0.as_str(), rows[1].1.as_str()),
        ("telegram", "assistant")
    );
}

#[tokio::test]
async fn the_discord_bot_runs_alone_and_closes_the_gateway_on_sigterm() {
    const DISCORD_TOKEN: &str = "discord-e2e-secret-token";
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let fake = fake_discord::FakeDiscord::start(DISCORD_TOKEN).await;
    let mut child = bot(dir.path(), "discord")
        .env("DISCORD_BOT_TOKEN", DISCORD_TOKEN)
        .env("LORALOOP_DISCORD__API_URL", &fake.api_url)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fake.is_live() {
        assert!(Instant::now() < deadline, "the bot did not connect");
        assert!(child.try_wait().unwrap().is_none(), "the bot exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = fake_discord::FakeDiscord::dm_channel(4242);
    fake.dm(4242, "hello from the command line");
    while fake.replies(channel).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no reply from `loraloop bot discord`"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stderr = terminate(child).await;
    assert!(stderr.contains("the discord bot is running"), "{stderr}");
    assert!(!stderr.contains(DISCORD_TOKEN), "{stderr}");
    let closed_by = Instant::now() + Duration::from_secs(5);
    while !fake.all_closed() {
        assert!(
            Instant::now() < closed_by,
            "the gateway connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
