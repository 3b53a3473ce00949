//! `loraloop bot telegram`: the bot alone, as its own process, against a fake Telegram
//! Bot API server; SIGTERM stops it cleanly.

#[path = "../../server/tests/common/fake_telegram.rs"]
mod fake_telegram;

use fake_telegram::{TOKEN, fake_telegram, rated_replies};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_telegram_bot_runs_alone_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let (fake, url) = fake_telegram().await;
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("loraloop"));
    cmd.current_dir(dir.path());
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") || super::SCRUBBED.contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .args(["bot", "telegram"])
        .env("LORALOOP_MODELS_DIR", dir.path().join("models"))
        .env("LORALOOP_MODEL", "tiny")
        .env("LORALOOP_GENERATION__MAX_NEW_TOKENS", "8")
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("LORALOOP_TELEGRAM__API_URL", &url)
        .stderr(std::process::Stdio::piped())
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit after SIGTERM: {stderr}");
    assert!(stderr.contains("the telegram bot is running"), "{stderr}");
    assert!(!stderr.contains("secret-test-token"), "{stderr}");
    // The conversation is in the database the console reads.
    assert!(dir.path().join("data/loraloop.db").exists());
}
