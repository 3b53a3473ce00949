//! Start the real server on port 0 with a fresh SQLite file and a tiny random model.
#![allow(dead_code)]

pub mod fake_discord;
pub mod fake_telegram;
pub mod webdriver;

use loraloop::serve::{RunningServer, ServeOptions};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use std::collections::BTreeMap;
use std::time::Duration;

pub const KEY: &str = "key-for-tests";
pub const PASSWORD: &str = "pw-for-tests";

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub http: reqwest::Client,
}

/// The server on `config` (a restart on the same database, or a hand-made config):
/// without the worker, on a free port.
pub async fn start_config(config: loraloop_core::Config) -> RunningServer {
    loraloop::serve::start(
        config,
        ServeOptions {
            bind: Some("127.0.0.1:0".parse().unwrap()),
            worker: false,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

pub async fn start(worker: bool, extra_env: &[(&str, &str)]) -> TestServer {
    start_with_model(worker, extra_env, TinySpec::default()).await
}

/// A random model large enough that a 900-token reply takes seconds even when several
/// are decoded together (the streaming-edit tests need replies that outlast an edit).
pub const SLOW_MODEL: TinySpec = TinySpec {
    hidden: 256,
    intermediate: 768,
    layers: 8,
    heads: 4,
    kv_heads: 2,
    seed: 0,
};

/// [`start`] on a random model of the shape `spec`.
pub async fn start_with_model(
    worker: bool,
    extra_env: &[(&str, &str)],
    spec: TinySpec,
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("models/tiny");
    write_tiny_chat_model(&model, spec).unwrap();
    let mut env = BTreeMap::new();
    env.insert(
        "LORALOOP_DATA_DIR".to_string(),
        dir.path().join("data").display().to_string(),
    );
    env.insert(
        "LORALOOP_MODELS_DIR".to_string(),
        dir.path().join("models").display().to_string(),
    );
    env.insert("LORALOOP_MODEL".to_string(), "tiny".to_string());
    env.insert("LORALOOP_ADMIN_PASSWORD".to_string(), PASSWORD.to_string());
    env.insert("LORALOOP_API_KEY".to_string(), KEY.to_string());
    // Greedy and short, so replies are deterministic and quick.
    env.insert(
        "LORALOOP_GENERATION__TEMPERATURE".to_string(),
        "0".to_string(),
    );
    env.insert(
        "LORALOOP_GENERATION__MAX_NEW_TOKENS".to_string(),
        "12".to_string(),
    );
    // Adapters reach users when a test activates them; the gate's own tests ask for it.
    env.insert(
        "LORALOOP_ASSISTANT__ACTIVATION".to_string(),
        "manual".to_string(),
    );
    // Each turn runs on what is active now; the pinning tests ask for pins.
    env.insert(
        "LORALOOP_ASSISTANT__PIN_IDLE_MINUTES".to_string(),
        "0".to_string(),
    );
    for (k, v) in extra_env {
        env.insert(k.to_string(), v.to_string());
    }
    let config = loraloop_core::Config::load_with_env(&Default::default(), &env).unwrap();
    let server = loraloop::serve::start(
        config,
        ServeOptions {
            bind: Some("127.0.0.1:0".parse().unwrap()),
            worker,
            poll_interval: Duration::from_millis(50),
            only_bot: None,
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", server.addr.expect("serving HTTP"));
    TestServer {
        server,
        dir,
        base,
        http: reqwest::Client::new(),
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(KEY)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(KEY)
    }

    /// DELETE with the key; the status.
    pub async fn delete(&self, path: &str) -> u16 {
        let r = self.http.delete(self.url(path)).bearer_auth(KEY);
        r.send().await.unwrap().status().as_u16()
    }

    /// GET with the key, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// POST JSON with the key: (status, body).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self.post(path).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Upload JSONL as a dataset; its id.
    pub async fn upload_dataset(&self, name: &str, jsonl: &str) -> i64 {
        let r = self
            .post(&format!("/api/v1/datasets?name={name}"))
            .header("content-type", "application/jsonl")
            .body(jsonl.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        v["dataset"]["id"].as_i64().unwrap()
    }

    /// Wait until a job is final; its JSON.
    pub async fn wait_job(&self, id: i64) -> serde_json::Value {
        for _ in 0..1200 {
            let j = self.get_json(&format!("/api/v1/fine-tune/{id}")).await;
            if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap()) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {id} did not finish in 60 s");
    }

    /// A logged-in console client (cookies, no redirects followed) and the page's CSRF token.
    pub async fn console_login(&self) -> (reqwest::Client, String) {
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let login = client
            .post(self.url("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("username=admin&password={}", PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), 303);
        let home = client
            .get(self.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let start = home.find(r#"<meta name="csrf-token" content=""#).unwrap()
            + r#"<meta name="csrf-token" content=""#.len();
        let csrf = home[start..start + home[start..].find('"').unwrap()].to_string();
        (client, csrf)
    }

    pub async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

/// A dataset that teaches one answer.
pub fn zorblax_jsonl(n: usize) -> String {
    let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
    (0..n).map(|_| format!("{line}\n")).collect()
}

/// A chat with the default assistant is answered by adapter `name`.
pub async fn answers_with_adapter(s: &TestServer, name: &str) {
    let (status, reply) = s
        .post_json(
            "/v1/chat/completions",
            &serde_json::json!({"model": "loraloop", "messages": [{"role": "user", "content": "Zorblax?"}]}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("adapter:{name}@")),
        "{reply}"
    );
}

/// Upload the Zorblax dataset, train an adapter on it and activate it through the API;
/// (job id, adapter id, adapter name).
pub async fn active_adapter(s: &TestServer) -> (i64, i64, String) {
    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let (job, adapter_id, name) = train_adapter(s, ds, 1).await;
    let (status, body) = s
        .post_json(
            &format!("/api/v1/adapters/{adapter_id}/activate"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    (job, adapter_id, name)
}

/// Train a small adapter through the API; (job id, adapter id, adapter name).
pub async fn train_adapter(s: &TestServer, dataset_id: i64, seed: u64) -> (i64, i64, String) {
    let (status, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &serde_json::json!({
                "dataset_id": dataset_id,
                "epochs": 2,
                "hyperparameters": {"learning_rate": 0.02, "batch_size": 4, "lora_r": 4, "seed": seed, "sequence_len": 64}
            }),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_i64().unwrap();
    let done = s.wait_job(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let name = done["fine_tuned_adapter"].as_str().unwrap().to_string();
    (id, done["fine_tuned_adapter_id"].as_i64().unwrap(), name)
}

/// Wait until `f` holds, polling every 20 ms; fail the test after `secs`.
pub async fn until<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every log line of the test binary, at debug level (HTTP clients included), for the
/// tests that check no secret reaches a log.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Send every log line of this test binary to [`logs`] (once per binary).
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(|| LogSink)
        .try_init();
}

/// What was logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}
