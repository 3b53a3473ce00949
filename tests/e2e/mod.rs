#[path = "../support/fake_discord.rs"]
#[allow(dead_code)]
mod fake_discord;
#[path = "../support/fake_telegram.rs"]
mod fake_telegram;

mod bot;
mod chat;
mod classify;
mod config;
mod crash;
mod data;
mod export;
mod hostile;
mod models;
mod object_storage;
mod train;

use assert_cmd::Command;
use std::path::{Path, PathBuf};

/// Variables that would leak the developer's environment into a test.
const SCRUBBED: [&str; 4] = [
    "TELEGRAM_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
    "RUST_LOG",
    "LORALOOP_LOG",
];

/// `loraloop` run in `dir` with a clean configuration environment: no config file, data in
/// `dir/data`, no secrets unless the test sets them.
pub fn loraloop(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("loraloop").expect("the binary is built");
    cmd.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") || SCRUBBED.contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
    cmd
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("trainer/tests/fixtures/datasets")
        .join(rel)
}

pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the binary runs");
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
