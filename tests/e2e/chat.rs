use super::loraloop;
use std::path::Path;

fn real_model() -> std::path::PathBuf {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "run `cargo run -- models fetch` first");
    p
}

#[test]
fn chat_json_answers_each_stdin_line_with_one_json_object_and_keeps_history() {
    let dir = tempfile::tempdir().unwrap();
    let out = loraloop(dir.path())
        .args(["chat", "--json", "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "24", "--model"])
        .arg(real_model())
        .write_stdin(&b"What is the capital of France?\n/reset\n{\"prompt\": \"What is the capital of France?\"}\nnot \xff UTF-8\n{\"oops\": 1}\n"[..])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    // The greedy answer llama.cpp gives for this ChatML prompt (see model/tests/real_model.rs).
    assert_eq!(lines[0]["reply"], "The capital of France is Paris.");
    assert_eq!(lines[0]["finish_reason"], "stop");
    assert_eq!(lines[0]["prompt_tokens"], 27);
    assert_eq!(lines[1]["command"], "/reset");
    assert_eq!(
        lines[2]["reply"], "The capital of France is Paris.",
        "after /reset the prompt is the same"
    );
    // A line that is not UTF-8 is one error; the lines after it are still read.
    assert_eq!(
        lines[3]["error"],
        "line 4 is not UTF-8 text (byte 5 is not): skipped"
    );
    assert!(lines[4]["error"].as_str().unwrap().contains("prompt"));
    assert!(
        !out.status.success(),
        "a bad line makes the exit status non-zero"
    );
    // The session was stored like a bot's chat (platform cli, one user for the session):
    // /reset started a second conversation.
    let rows = cli_messages(&dir.path().join("data/loraloop.db"));
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let (user, conv_a, _, _) = &rows[0];
    assert!(user.starts_with("session-"), "{rows:#?}");
    assert!(rows.iter().all(|r| &r.0 == user), "{rows:#?}");
    let texts: Vec<(&str, &str)> = rows.iter().map(|r| (r.2.as_str(), r.3.as_str())).collect();
    let turn = [
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris."),
    ];
    assert_eq!(texts[..2], turn);
    assert_eq!(texts[2..], turn);
    assert_eq!(rows[1].1, *conv_a);
    assert_ne!(rows[2].1, *conv_a, "after /reset, a new conversation");
}

/// Every stored `cli` message: (user, conversation, role, text), in order.
fn cli_messages(db: &Path) -> Vec<(String, i64, String, String)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = loraloop_core::storage::Db::open(db).await.unwrap();
        sqlx::query_as(
            "select u.platform_user_id, m.conversation_id, m.role, m.content
             from messages m join conversations c on c.id = m.conversation_id
             join chats ch on ch.id = c.chat_id join platform_users u on u.id = c.user_id
             where ch.platform = 'cli' order by m.id",
        )
        .fetch_all(db.pool())
        .await
        .unwrap()
    })
}

#[test]
fn with_record_cli_off_a_chat_writes_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = loraloop(dir.path())
        .env("LORALOOP_RECORD__CLI", "false")
        .args(["chat", "--json", "--max-new-tokens", "2", "--model"])
        .arg(real_model())
        .write_stdin("hi\n")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("data/loraloop.db").exists());
}

#[test]
fn chat_refuses_a_missing_model_and_a_bad_adapter_with_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = loraloop(dir.path())
        .args(["chat", "--json"])
        .write_stdin("hi\n")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("loraloop models fetch"), "{stderr}");

    let bad = dir.path().join("adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}"#,
    )
    .unwrap();
    let out = loraloop(dir.path())
        .args(["chat", "--json", "--model"])
        .arg(real_model())
        .arg("--adapter")
        .arg(&bad)
        .write_stdin("hi\n")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot use the adapter"), "{stderr}");

    // Sampling flags are held to the config's ranges (NaN was taken and sampled with).
    for (flag, said) in [
        (
            "--repetition-penalty=nan",
            "--repetition-penalty: got NaN; allowed: 1 (off) to 2",
        ),
        (
            "--temperature=100",
            "--temperature: got 100; allowed: 0 to 2 (0 means greedy)",
        ),
        (
            "--max-new-tokens=99999999",
            "--max-new-tokens: got 99999999; allowed: 1 to 32768",
        ),
        (
            "--stop=",
            "--stop: got an empty string; allowed: non-empty strings",
        ),
    ] {
        let out = loraloop(dir.path())
            .args(["chat", "--json", flag, "--model"])
            .arg(real_model())
            .write_stdin("hi\n")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}");
        assert!(stderr.contains(said), "{flag}: {stderr}");
    }
}

#[test]
fn ctrl_c_during_a_reply_stops_only_that_reply() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("loraloop");
    let mut child = std::process::Command::new(bin)
        .current_dir(dir.path())
        .args([
            "chat",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--max-new-tokens",
            "2000",
            "--model",
        ])
        .arg(real_model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    writeln!(stdin, "Write a very long essay about the history of Rome.").unwrap();
    // Wait until the reply is streaming, then interrupt it.
    let mut buf = [0u8; 64];
    let n = stdout.read(&mut buf).unwrap();
    assert!(n > 0, "no streamed text");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The program is still there: a second question gets an answer, then EOF ends it.
    writeln!(stdin, "/system You are a helpful assistant.").unwrap();
    writeln!(stdin, "What is the capital of France?").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[stopped]"), "{stderr}");
    assert!(rest.contains("The capital of France is Paris."), "{rest}");
}

/// `loraloop chat` on `model` with these variables set, which must fail: its stderr.
fn chat_fails_on(dir: &std::path::Path, model: &std::path::Path, env: &[(&str, &str)]) -> String {
    let out = loraloop(dir)
        .envs(env.iter().copied())
        .args(["chat", "--json", "--model"])
        .arg(model)
        .write_stdin("hi\n")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn chat_on_a_truncated_model_says_it_is_corrupt_and_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(real_model()).unwrap();
    // The default model's file: fetching it again is the remedy; a file of the user's
    // own is theirs to get again (`models fetch` would not bring it back).
    for (name, remedy) in [
        (
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "run `loraloop models fetch --force`",
        ),
        (
            "cut.gguf",
            "check the path, or download or convert the model again",
        ),
    ] {
        let cut = dir.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
        let stderr = chat_fails_on(dir.path(), &cut, &[]);
        assert!(
            stderr.contains("corrupt or truncated") && stderr.contains(remedy),
            "{stderr}"
        );
    }
}

#[test]
fn with_rust_backtrace_set_an_error_stays_a_message_not_a_stack() {
    // candle captures a backtrace into each error it makes when RUST_BACKTRACE is set,
    // and prints it with the message: a bad header read as some 40 lines of frames.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"not a model file at all, only some bytes").unwrap();
    let stderr = chat_fails_on(dir.path(), &bad, &[("RUST_BACKTRACE", "1")]);
    let error: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .collect();
    assert!(
        error.first().is_some_and(|l| l.contains("bad GGUF header")),
        "{stderr}"
    );
    assert!(error.len() <= 2, "{stderr}");
    assert!(!stderr.contains("candle-core"), "{stderr}");
}
