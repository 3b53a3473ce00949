//! The console's training, adapter and playground pages, driven over HTTP against the
//! real server (tiny random model, embedded training worker), as a logged-in admin.

use loraloop::serve::{RunningServer, ServeOptions};
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

struct Console {
    server: RunningServer,
    http: reqwest::Client,
    base: String,
    csrf: String,
    _dir: tempfile::TempDir,
}

impl Console {
    /// A console whose adapters reach users when the test activates them.
    async fn start() -> Self {
        Self::start_with(&[("LORALOOP_ASSISTANT__ACTIVATION", "manual")]).await
    }

    async fn start_with(extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("models").join("tiny");
        write_tiny_chat_model(&model, TinySpec::default()).unwrap();
        let mut env = BTreeMap::new();
        let data = dir.path().join("data");
        env.insert("LORALOOP_DATA_DIR".into(), data.display().to_string());
        env.insert("LORALOOP_MODEL".into(), model.display().to_string());
        env.insert("LORALOOP_ADMIN_PASSWORD".into(), "pw-for-tests".into());
        env.insert("LORALOOP_API_KEY".into(), "key-for-tests".into());
        env.insert("LORALOOP_GENERATION__TEMPERATURE".into(), "0".into());
        env.insert("LORALOOP_GENERATION__MAX_NEW_TOKENS".into(), "24".into());
        for (k, v) in extra_env {
            env.insert(k.to_string(), v.to_string());
        }
        let config = loraloop_core::Config::load_with_env(&Default::default(), &env).unwrap();
        let server = loraloop::serve::start(
            config,
            ServeOptions {
                bind: Some("127.0.0.1:0".parse().unwrap()),
                worker: true,
                poll_interval: Duration::from_millis(100),
                only_bot: None,
            },
        )
        .await
        .unwrap();
        let base = format!("http://{}", server.addr.expect("serving HTTP"));
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs(180))
            .build()
            .unwrap();
        let resp = http
            .post(format!("{base}/login"))
            .form(&[("username", "admin"), ("password", "pw-for-tests")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let home = resp.text().await.unwrap();
        let csrf = between(&home, r#"<meta name="csrf-token" content=""#, "\"")
            .expect("the dashboard carries the CSRF token")
            .to_string();
        Self {
            server,
            http,
            base,
            csrf,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A form post with the CSRF field; the final status and page (after redirects).
    async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String, String) {
        let mut all = vec![("_csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        let r = self
            .http
            .post(self.url(path))
            .form(&all)
            .send()
            .await
            .unwrap();
        let at = r.url().path().to_string();
        (r.status().as_u16(), at, r.text().await.unwrap())
    }

    async fn upload(&self, name: &str, zip: Vec<u8>) -> (u16, String) {
        let form = reqwest::multipart::Form::new()
            .text("name", name.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(zip).file_name(format!("{name}.zip")),
            );
        let r = self
            .http
            .post(self.url(&format!("/adapters/upload?_csrf={}", self.csrf)))
            .multipart(form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn import_dataset(&self) -> i64 {
        self.import_examples(8).await
    }

    async fn import_examples(&self, n: usize) -> i64 {
        let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
        let body = format!("{line}\n").repeat(n);
        let r = self
            .http
            .post(self.url("/api/v1/datasets?name=zorblax"))
            .bearer_auth("key-for-tests")
            .header("content-type", "application/jsonl")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        v["dataset"]["id"].as_i64().unwrap()
    }

    fn active(&self) -> Option<String> {
        self.server.state.engine.active_adapter().map(|t| t.name)
    }

    fn adapters_dir(&self) -> std::path::PathBuf {
        self.server.state.adapters_dir.clone()
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// The `(event, data)` pairs of a server-sent-events body.
fn sse_events(body: &str) -> Vec<(String, String)> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_string();
            let mut data = Vec::new();
            for l in block.lines() {
                if let Some(n) = l.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = l.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
                }
            }
            (!data.is_empty()).then(|| (name, data.join("\n")))
        })
        .collect()
}

fn unzip(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        out.insert(f.name().unwrap().to_string(), b);
    }
    out
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Nothing an upload leaves behind: no staging folders, and only these adapter folders.
fn assert_folders(dir: &std::path::Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, expected, "folders in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_job_form_refuses_bad_settings_and_creates_nothing() {
    let c = Console::start().await;
    let ds = c.import_dataset().await.to_string();
    let (status, page) = c.get("/jobs/new").await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"id="job-form""#));
    assert!(page.contains("zorblax v1"), "the dataset is offered");
    assert!(page.contains("Estimate: about"), "the estimate is shown");
    assert!(page.contains(r#"value="standard" selected"#));

    let (status, _, page) = c
        .post_form(
            "/jobs",
            &[
                ("dataset_id", &ds),
                ("method", "lora"),
                ("learning_rate", "5"),
                ("epochs", "1"),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(page.contains(r#"id="form-error""#), "{page}");
    assert!(page.contains("learning_rate must be a number greater than 0 and at most 1"));
    assert!(page.contains(
        r#"name="learning_rate" id="job-learning_rate" type="text" value="5" aria-invalid="true""#
    ));

    let (status, _, page) = c
        .post_form("/jobs", &[("dataset_id", &ds), ("epochs", "two")])
        .await;
    assert_eq!(status, 422);
    assert!(
        page.contains("epochs: &quot;two&quot; is not a number"),
        "{page}"
    );

    let (status, _, page) = c
        .post_form(
            "/jobs",
            &[
                ("dataset_id", &ds),
                ("method", "sideways"),
                ("preset", "quick"),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(page.contains("unknown method"), "{page}");

    // Without the CSRF token nothing is even looked at.
    let r = c
        .http
        .post(c.url("/jobs"))
        .form(&[("dataset_id", ds.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    assert!(
        c.server
            .state
            .db
            .list_jobs(None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The estimate grows with the epochs.
    let (_, one) = c
        .get(&format!(
            "/jobs/estimate?dataset_id={ds}&epochs=1&batch_size=2"
        ))
        .await;
    let (_, five) = c
        .get(&format!(
            "/jobs/estimate?dataset_id={ds}&epochs=5&batch_size=2"
        ))
        .await;
    let secs = |p: &str| {
        between(p, r#"data-seconds=""#, "\"")
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert!(secs(&five) > secs(&one) * 4.0, "{one}\n{five}");
    c.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn train_activate_download_upload_chat_and_compare_from_the_console() {
    let c = Console::start().await;
    let ds = c.import_dataset().await.to_string();

    // A tiny job from the form runs to the end on the embedded worker.
    let (status, at, page) = c
        .post_form(
            "/jobs",
            &[
                ("dataset_id", &ds),
                ("preset", ""),
                ("method", "lora"),
                ("epochs", "1"),
                ("learning_rate", "0.001"),
                ("batch_size", "2"),
                ("lora_r", "4"),
                ("lora_alpha", "8"),
                ("sequence_len", "64"),
                ("val_set_size", "0.25"),
                ("max_steps", "3"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let job: i64 = at.strip_prefix("/jobs/").unwrap().parse().unwrap();
    assert!(page.contains(r#"id="loss-chart""#) && page.contains(r#"data-points="0""#));
    let stored = c.server.state.db.job(job).await.unwrap();
    let hp: serde_json::Value = serde_json::from_str(&stored.hyperparameters).unwrap();
    assert_eq!(hp["lora_r"], 4);
    assert_eq!(hp["sequence_len"], 64);
    assert_eq!(hp["gradient_accumulation_steps"], 1);

    // Its event stream (what the chart reads) delivers the steps, then the final job.
    let sse = tokio::time::timeout(Duration::from_secs(150), async {
        c.http
            .get(c.url(&format!("/jobs/{job}/events")))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("the job finishes");
    let events = sse_events(&sse);
    let steps: Vec<serde_json::Value> = events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(steps.len(), 3, "{sse}");
    assert_eq!(steps[2]["step"], 3);
    assert!(steps[0]["loss"].as_f64().unwrap() > 0.0);
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "done");
    let done: serde_json::Value = serde_json::from_str(done).unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    let adapter_name = format!("job-{job}");
    assert_eq!(done["fine_tuned_adapter"], adapter_name.as_str());

    let (_, page) = c.get(&format!("/jobs/{job}")).await;
    assert!(
        page.contains(r#"id="job-status" class="status status-succeeded">succeeded<"#),
        "{page}"
    );
    assert!(page.contains(r#"data-kind="step""#) && page.contains(r#"id="job-log""#));
    assert!(
        !page.contains(r#"id="cancel-job""#),
        "no cancel button for a finished job"
    );
    let (status, _, page) = c.post_form(&format!("/jobs/{job}/cancel"), &[]).await;
    assert_eq!(status, 409);
    assert!(page.contains("has already finished"));
    let (_, list) = c.get("/jobs").await;
    assert!(list.contains(&format!(r#"href="/jobs/{job}""#)) && list.contains(&adapter_name));

    // The adapter is listed; nothing to roll back to yet.
    let (_, page) = c.get("/adapters").await;
    assert!(
        page.contains(&format!(r#"data-name="{adapter_name}""#)),
        "{page}"
    );
    let trained = c.server.state.db.list_adapters().await.unwrap();
    assert_eq!(trained.len(), 1);
    let trained_id = trained[0].id;
    let (status, _, page) = c.post_form("/adapters/rollback", &[]).await;
    assert_eq!(status, 409);
    assert!(page.contains("nothing to roll back to"), "{page}");
    assert_eq!(c.active(), None);

    // Download, then upload the zip again under a new name.
    let r = c
        .http
        .get(c.url(&format!("/adapters/{trained_id}/download")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let zip = r.bytes().await.unwrap().to_vec();
    let files = unzip(&zip);
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "loraloop_adapter.json"
        ]
    );
    // The same adapter as a llama.cpp LoRA GGUF, from the list's "GGUF" link.
    let list = c
        .http
        .get(c.url("/adapters"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let link = format!("/adapters/{trained_id}/export?format=lora");
    assert!(list.contains(&link), "{list}");
    let r = c.http.get(c.url(&link)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .ends_with(".gguf\""),
        "{:?}",
        r.headers()
    );
    let gguf = r.bytes().await.unwrap();
    assert_eq!(&gguf[..4], b"GGUF");
    let (status, page) = c.upload("reup", zip.clone()).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(r#"id="adapter-notice""#) && page.contains(r#"data-name="reup""#));
    let all = c.server.state.db.list_adapters().await.unwrap();
    let reup = all.iter().find(|a| a.name == "reup").unwrap();
    assert_eq!(reup.rank, Some(4));
    assert_eq!(reup.alpha, Some(8.0));
    assert_eq!(reup.base_model_hash, c.server.state.model.hash);
    assert!(
        std::path::Path::new(&reup.path)
            .join("adapter_model.safetensors")
            .is_file()
    );
    let (status, page) = c.upload("reup", zip.clone()).await;
    assert_eq!(status, 409, "a name is taken once: {page}");

    // Activate from the page, activate another, roll back.
    let (status, _, page) = c
        .post_form(&format!("/adapters/{}/activate", reup.id), &[])
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(c.active().as_deref(), Some("reup"));
    assert!(
        page.contains(r#"<strong id="active-adapter">reup</strong>"#),
        "{page}"
    );
    c.post_form(&format!("/adapters/{trained_id}/activate"), &[])
        .await;
    assert_eq!(c.active().as_deref(), Some(adapter_name.as_str()));
    let (status, _, page) = c.post_form("/adapters/rollback", &[]).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(c.active().as_deref(), Some("reup"));
    let (status, _, _) = c.post_form("/adapters/base", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(c.active(), None);
    let (status, _, page) = c.post_form("/adapters/9999/activate", &[]).await;
    assert_eq!(status, 404, "{page}");

    // Refused uploads leave nothing behind.
    let adapters_before = c.server.state.db.list_adapters().await.unwrap().len();
    let folders = [format!("job-{job}"), "uploaded-reup".to_string()];
    let folders: Vec<&str> = folders.iter().map(String::as_str).collect();
    assert_folders(&c.adapters_dir(), &folders);
    let evil = zip_of(&[
        ("adapter_config.json", &files["adapter_config.json"]),
        (
            "adapter_model.safetensors",
            &files["adapter_model.safetensors"],
        ),
        ("../evil", b"gotcha"),
    ]);
    let (status, page) = c.upload("evil", evil).await;
    assert_eq!(status, 422, "{page}");
    assert!(page.contains("points outside the adapter folder"), "{page}");
    assert!(!c.adapters_dir().join("../evil").exists());
    let mut meta: serde_json::Value =
        serde_json::from_slice(&files["loraloop_adapter.json"]).unwrap();
    meta["base_model_hash"] = "0".repeat(64).into();
    let meta = meta.to_string();
    let mismatch = zip_of(&[
        ("adapter_config.json", &files["adapter_config.json"]),
        (
            "adapter_model.safetensors",
            &files["adapter_model.safetensors"],
        ),
        ("loraloop_adapter.json", meta.as_bytes()),
    ]);
    let (status, page) = c.upload("mismatch", mismatch).await;
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("different base model"), "{page}");
    let extra = zip_of(&[
        ("adapter_config.json", &files["adapter_config.json"]),
        (
            "adapter_model.safetensors",
            &files["adapter_model.safetensors"],
        ),
        ("notes.txt", b"hi"),
    ]);
    let (status, page) = c.upload("extra", extra).await;
    assert_eq!(status, 422, "{page}");
    let (status, _) = c.upload("../up", zip.clone()).await;
    assert_eq!(status, 422);
    let (status, _) = c.upload("base", zip.clone()).await;
    assert_eq!(status, 422);
    assert_folders(&c.adapters_dir(), &folders);
    assert_eq!(
        c.server.state.db.list_adapters().await.unwrap().len(),
        adapters_before
    );

    // The playground streams a reply from the chosen adapter and stores both turns.
    let r = c
        .http
        .post(c.url("/playground/send"))
        .json(&serde_json::json!({"message": "Hello there", "adapter": adapter_name}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the CSRF header is required");
    let send = |adapter: &str| {
        c.http
            .post(c.url("/playground/send"))
            .header("x-csrf-token", &c.csrf)
            .json(&serde_json::json!({"message": "Hello there", "adapter": adapter}))
            .send()
    };
    let r = send(&adapter_name).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&r.text().await.unwrap());
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "text")
        .map(|(_, d)| serde_json::from_str::<String>(d).unwrap())
        .collect();
    let texts = events.iter().filter(|(n, _)| n == "text").count();
    assert!(texts >= 1, "{events:?}");
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "done", "{events:?}");
    let done: serde_json::Value = serde_json::from_str(done).unwrap();
    assert_eq!(done["adapter"], adapter_name.as_str());
    let conv = c
        .server
        .state
        .chat
        .playground_conversation(&c.server.state.assistant, false)
        .await
        .unwrap();
    let msgs = c.server.state.db.recent_messages(conv, 10).await.unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0].role.as_str(), msgs[0].content.as_str()),
        ("user", "Hello there")
    );
    assert_eq!(msgs[1].role, "assistant");
    assert_eq!(msgs[1].id, done["message_id"].as_i64().unwrap());
    assert_eq!(msgs[1].content, text);
    assert_eq!(msgs[1].adapter_name.as_deref(), Some(adapter_name.as_str()));
    assert_eq!(msgs[1].adapter_id, Some(trained_id));

    let r = send("base").await.unwrap();
    let events = sse_events(&r.text().await.unwrap());
    let done: serde_json::Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(done["adapter"], "base");
    let r = send("no-such-adapter").await.unwrap();
    assert_eq!(r.status(), 404);
    let msgs = c.server.state.db.recent_messages(conv, 10).await.unwrap();
    assert_eq!(msgs.len(), 4, "an unknown adapter stores nothing");
    assert_eq!(msgs[3].adapter_name, None);
    // A message the engine refuses (longer than the context window) is not stored.
    let r = c
        .http
        .post(c.url("/playground/send"))
        .header("x-csrf-token", &c.csrf)
        .json(&serde_json::json!({"message": "word ".repeat(20_000), "adapter": "base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let refused = r.text().await.unwrap();
    assert!(refused.contains("context window"), "{refused}");
    let msgs = c.server.state.db.recent_messages(conv, 10).await.unwrap();
    assert_eq!(msgs.len(), 4, "the refused message was stored");

    // Pages that show conversations are kept out of caches; no inline script runs.
    let r = c.http.get(c.url("/playground")).send().await.unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    let (_, page) = c.get("/playground").await;
    assert!(
        page.contains(&format!(
            r#"class="msg assistant" data-adapter="{adapter_name}""#
        )),
        "{page}"
    );
    assert!(page.contains(r#"class="msg assistant" data-adapter="base""#));
    assert!(page.contains(r#"id="chat-form""#) && page.contains(r#"id="adapter-select""#));
    let (status, _, page) = c.post_form("/playground/new", &[]).await;
    assert_eq!(status, 200);
    assert!(page.contains("No messages yet."));
    assert_ne!(
        c.server
            .state
            .chat
            .playground_conversation(&c.server.state.assistant, false)
            .await
            .unwrap(),
        conv
    );

    // Comparison: both answers to each prompt, side by side.
    let r = c
        .http
        .get(c.url("/adapters/compare"))
        .query(&[
            ("a", "base"),
            ("b", adapter_name.as_str()),
            ("prompts", "Hi\nWhat is 2+2?\n\n"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert_eq!(page.matches(r#"data-adapter="base""#).count(), 2, "{page}");
    assert_eq!(
        page.matches(&format!(r#"data-adapter="{adapter_name}""#))
            .count(),
        2
    );
    let six = "a\nb\nc\nd\ne\nf";
    let r = c
        .http
        .get(c.url("/adapters/compare"))
        .query(&[("a", "base"), ("b", "active"), ("prompts", six)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    c.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_job_on_defaults_gets_a_report_card_and_the_gate_decides_activation() {
    // Nothing configured: the default activation policy (the gate) and thresholds.
    let c = Console::start_with(&[]).await;
    let ds = c.import_examples(20).await.to_string();
    // The form as a browser without scripts sends it: the standard preset, nothing typed.
    let (status, at, page) = c
        .post_form("/jobs", &[("dataset_id", &ds), ("preset", "standard")])
        .await;
    assert_eq!(status, 200, "{page}");
    let job: i64 = at.strip_prefix("/jobs/").unwrap().parse().unwrap();
    let mut done = serde_json::Value::Null;
    for _ in 0..1500 {
        let r = c
            .http
            .get(c.url(&format!("/api/v1/fine-tune/{job}")))
            .bearer_auth("key-for-tests")
            .send()
            .await
            .unwrap();
        done = r.json().await.unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&done["status"].as_str().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    let card = &done["report_card"];
    // 2 of the 20 examples held out (val_set_size 0.1), the shipped probe, three checks.
    assert_eq!(card["heldout"]["examples"], 2, "{card}");
    assert!(
        card["retention"]["prompts"].as_u64().unwrap() > 100,
        "{card}"
    );
    let checks: Vec<&str> = card["verdict"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        checks,
        ["retention_agreement", "retention_kl", "heldout_loss"],
        "{card}"
    );
    let passed = card["verdict"]["pass"].as_bool().unwrap();
    let adapter = format!("job-{job}");
    // The adapter carries the same card in the API's list.
    let list: serde_json::Value = c
        .http
        .get(c.url("/api/v1/adapters"))
        .bearer_auth("key-for-tests")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == adapter.as_str())
        .expect("the job's adapter is listed");
    assert_eq!(&listed["report_card"], card);
    let (_, page) = c.get(&format!("/jobs/{job}")).await;
    assert!(
        page.contains(&format!(r#"id="report-card" data-pass="{passed}""#)),
        "{page}"
    );
    // The gate acted on the verdict, and the serving engine follows the activation.
    let said = if passed {
        "passed and is now active"
    } else {
        "held back"
    };
    assert!(page.contains(said), "{page}");
    if passed {
        super::support::until(10, "the gate's activation reaches the engine", || {
            c.active().as_deref() == Some(adapter.as_str())
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(c.active(), None);
    }
}

/// The assistants page: the config's assistants with their routes; create one, change
/// its settings, add and remove a route, delete it; bad input is shown, not stored. The
/// adapters page and the playground act on the assistant their address names.
#[tokio::test]
async fn assistants_are_managed_from_the_console() {
    let c = Console::start_with(&[(
        "LORALOOP_ASSISTANTS",
        "[{name: support, system_prompt: Help with travel., routes: {telegram_chats: [-100777]}}]",
    )])
    .await;
    let (status, page) = c.get("/assistants").await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"id="assistant-loraloop""#), "{page}");
    assert!(page.contains(r#"id="assistant-support""#));
    assert!(page.contains("Help with travel.") && page.contains("-100777"));

    let (status, _, page) = c
        .post_form(
            "/assistants",
            &[
                ("name", "sales"),
                ("system_prompt", "Sell things."),
                ("generation", r#"{"max_new_tokens": 5}"#),
                ("activation", "manual"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"id="assistant-notice""#), "{page}");
    let db = &c.server.state.db;
    let sales = db.assistant("sales").await.unwrap();
    assert_eq!(
        (
            sales.system_prompt.as_str(),
            sales.generation.as_str(),
            sales.activation.as_deref()
        ),
        ("Sell things.", r#"{"max_new_tokens":5}"#, Some("manual"))
    );
    // Bad settings are refused with the reason, and nothing changes.
    let (status, _, page) = c
        .post_form(
            "/assistants/sales",
            &[
                ("system_prompt", "x"),
                ("generation", r#"{"temperature": 7}"#),
            ],
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        page.contains(r#"id="assistant-error""#) && page.contains("temperature"),
        "{page}"
    );
    assert_eq!(
        db.assistant("sales").await.unwrap().system_prompt,
        "Sell things."
    );
    let (status, _, _) = c
        .post_form(
            "/assistants/sales",
            &[("system_prompt", "Sell more."), ("generation", "{}")],
        )
        .await;
    assert_eq!(status, 200);
    let sales = db.assistant("sales").await.unwrap();
    assert_eq!(
        (sales.system_prompt.as_str(), sales.activation),
        ("Sell more.", None)
    );

    let (status, _, _) = c
        .post_form(
            "/assistants/sales/routes",
            &[("route", "discord:guild"), ("key", "5000")],
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, page) = c
        .post_form(
            "/assistants/sales/routes",
            &[("route", "discord:guild"), ("key", "lobby")],
        )
        .await;
    assert_eq!(status, 422, "{page}");
    let routes = db.routes().await.unwrap();
    let route = routes.iter().find(|r| r.assistant_id == sales.id).unwrap();
    assert_eq!(
        (
            route.platform.as_str(),
            route.scope.as_str(),
            route.key.as_str()
        ),
        ("discord", "guild", "5000")
    );
    assert_eq!(
        routes.len(),
        2,
        "the config's route and this one: {routes:?}"
    );

    // The adapters page and the playground are per assistant.
    let (_, page) = c.get("/adapters?assistant=sales").await;
    assert!(page.contains(r#"id="adapter-assistant">sales<"#), "{page}");
    assert!(page.contains(r#"action="/adapters/rollback?assistant=sales""#));
    let (_, page) = c.get("/playground?assistant=support").await;
    assert!(
        page.contains(r#"action="/playground/send?assistant=support""#),
        "{page}"
    );
    let (status, _) = c.get("/adapters?assistant=nobody").await;
    assert_eq!(status, 404);

    let (status, _, _) = c
        .post_form(
            &format!("/assistants/sales/routes/{}/delete", route.id),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(db.routes().await.unwrap().len(), 1);
    let (status, _, page) = c.post_form("/assistants/loraloop/delete", &[]).await;
    assert_eq!(status, 409, "the default assistant stays: {page}");
    let (status, _, _) = c.post_form("/assistants/sales/delete", &[]).await;
    assert_eq!(status, 200);
    assert!(db.assistant("sales").await.is_err());
    c.server.stop().await.unwrap();
}
