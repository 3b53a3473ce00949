//! `dataset_url: s3://bucket/key` against a real S3-compatible server: `s3s-fs` (the s3s
//! project's file-system-backed S3 server, which checks SigV4 signatures; scripts/test.sh
//! installs it with cargo), with the server's credentials and endpoint in the environment
//! of `loraloop serve` as the AWS tools read them.

use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "object-storage-test-key";
const ACCESS: &str = "loraloop-test-access";
const SECRET: &str = "loraloop-test-secret-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(url: &str, http: &reqwest::Client, accept_any_status: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http.get(url).send().await {
            Ok(r) if accept_any_status || r.status() == 200 => return,
            _ => {}
        }
        assert!(Instant::now() < deadline, "{url} did not answer in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_dataset_url_is_read_with_credentials_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    // The bucket is a folder of s3s-fs's root, its objects the files in it.
    let root = dir.path().join("s3");
    std::fs::create_dir_all(root.join("datasets/team")).unwrap();
    let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
    let data: String = (0..8).map(|_| format!("{line}\n")).collect();
    std::fs::write(root.join("datasets/team/zorblax.jsonl"), &data).unwrap();
    std::fs::write(
        root.join("datasets/big.jsonl"),
        format!("{line}\n").repeat(2 * 1024 * 1024 / line.len() + 1),
    )
    .unwrap();
    let s3_port = free_port();
    let s3 = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &s3_port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let s3 = Killed(s3.expect(
        "this test needs the s3s-fs S3 server: cargo install --locked s3s-fs --features binary (scripts/test.sh does)",
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    // Unsigned: s3s-fs answers 403, which says it is up.
    wait_for(&endpoint, &http, true).await;

    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraloop"));
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") || key.starts_with("AWS_") || key.ends_with("_BOT_TOKEN") {
            cmd.env_remove(key);
        }
    }
    let server = cmd
        .current_dir(dir.path())
        .args(["serve"])
        .env("LORALOOP_MODELS_DIR", dir.path().join("models"))
        .env("LORALOOP_MODEL", "tiny")
        .env("LORALOOP_SERVER__PORT", port.to_string())
        .env("LORALOOP_SERVER__MAX_UPLOAD_MB", "1")
        .env("LORALOOP_API_KEY", KEY)
        .env("LORALOOP_ADMIN_PASSWORD", "object-storage-password")
        .env("AWS_ACCESS_KEY_ID", ACCESS)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", &endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Killed(server);
    let base = format!("http://127.0.0.1:{port}");
    wait_for(&format!("{base}/healthz"), &http, false).await;
    let fine_tune = |url: &str| {
        http.post(format!("{base}/api/v1/fine-tune"))
            .bearer_auth(KEY)
            .json(&json!({"dataset_url": url, "epochs": 1}))
            .send()
    };

    let r = fine_tune("s3://datasets/team/zorblax.jsonl").await.unwrap();
    let status = r.status().as_u16();
    let job: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{job}");
    let datasets: Value = http
        .get(format!("{base}/api/v1/datasets"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = &datasets["data"][0];
    assert_eq!(d["id"], job["dataset_id"], "{datasets}");
    assert_eq!(d["name"], "zorblax");
    assert_eq!(d["example_count"], 8);
    assert_eq!(d["source"], "s3://datasets/team/zorblax.jsonl");

    let refused = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (
            status,
            body["error"]["message"].as_str().unwrap_or("").to_string(),
        )
    };
    let (status, message) =
        refused(fine_tune("s3://datasets/team/missing.jsonl").await.unwrap()).await;
    assert_eq!(status, 422, "{message}");
    assert!(
        message.contains("there is no object at s3://datasets/team/missing.jsonl"),
        "{message}"
    );
    // Over the upload limit (1 MB here): refused from its size, before it is read.
    let (status, message) = refused(fine_tune("s3://datasets/big.jsonl").await.unwrap()).await;
    assert_eq!(status, 413, "{message}");
    // Credentials belong in the environment, never in the URL (which is stored).
    let (status, message) = refused(
        fine_tune("s3://someone:secret@datasets/team/zorblax.jsonl")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 422, "{message}");
    assert!(!message.contains("secret"), "{message}");
    // A store that is down: a 422 that says the object cannot be read, within seconds.
    drop(s3);
    let asked = std::time::Instant::now();
    let (status, message) =
        refused(fine_tune("s3://datasets/team/zorblax.jsonl").await.unwrap()).await;
    assert_eq!(status, 422, "{message}");
    assert!(
        message.starts_with("cannot read s3://datasets/team/zorblax.jsonl"),
        "{message}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
}
