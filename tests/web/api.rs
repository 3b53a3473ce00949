//! The REST API and the OpenAI-compatible endpoint against the real server: a fresh
//! SQLite file, a tiny random model, the embedded training worker.

use crate::support::{
    KEY, TestServer, active_adapter, answers_with_adapter, start, train_adapter, zorblax_jsonl,
};
use serde_json::{Value, json};
use std::time::Duration;

/// Every route in the OpenAPI document (the same table the router is built from), with
/// path parameters filled in.
async fn api_routes(s: &TestServer) -> Vec<(String, String)> {
    let doc = s.get_json("/api/v1/openapi.json").await;
    let mut routes = vec![("get".to_string(), "/api/v1/openapi.json".to_string())];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.clone(), path.replace("{id}", "1")));
        }
    }
    routes
}

#[tokio::test]
async fn every_api_route_refuses_requests_without_the_key() {
    let s = start(false, &[]).await;
    let routes = api_routes(&s).await;
    // The document covers what the issue lists.
    for expected in [
        "/api/v1/fine-tune",
        "/api/v1/fine-tune/1",
        "/api/v1/fine-tune/1/cancel",
        "/api/v1/fine-tune/1/events",
        "/api/v1/datasets",
        "/api/v1/adapters",
        "/api/v1/adapters/1/activate",
        "/api/v1/adapters/rollback",
        "/v1/chat/completions",
        "/v1/models",
        "/metrics",
    ] {
        assert!(
            routes.iter().any(|(_, p)| p == expected),
            "{expected} missing from {routes:?}"
        );
    }
    for (method, path) in &routes {
        let m: reqwest::Method = method.to_uppercase().parse().unwrap();
        for auth in [
            None,
            Some("Bearer wrong-key"),
            Some("Basic a2V5LWZvci10ZXN0cw=="),
        ] {
            let mut req = s.http.request(m.clone(), s.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer", "{method} {path}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
            assert_eq!(body["error"]["type"], "authentication_error");
        }
    }
    // The scheme is case-insensitive (RFC 7235); the key is not.
    for (auth, status) in [
        (format!("bearer {KEY}"), 200),
        (format!("BEARER {KEY}"), 200),
        (format!("Bearer {}", KEY.to_uppercase()), 401),
    ] {
        let r = s
            .http
            .get(s.url("/v1/models"))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{auth}");
    }
    // Only the health check is open.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Console pages without a session: pages redirect to the login, the rest is a 401.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect
        .get(s.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let r = no_redirect.post(s.url("/logout")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    s.stop().await;
}

/// Every path the console registers, read from its source (`.route("...")`).
fn console_routes() -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, _) in text.match_indices(".route(") {
                    let rest = text[i + 7..].trim_start();
                    if let Some(r) = rest.strip_prefix('"') {
                        out.push(r[..r.find('"').unwrap()].to_string());
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web/src/console"),
        &mut out,
    );
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn every_console_route_but_the_login_needs_a_session() {
    let s = start(false, &[]).await;
    let routes = console_routes();
    assert!(routes.len() >= 25, "{routes:?}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for route in &routes {
        let path = route.replace("{id}", "1");
        if path == "/login" || path == "/assets/console.css" || path == "/assets/console.js" {
            continue;
        }
        let get = http
            .get(s.url(&path))
            .header("accept", "text/html")
            .send()
            .await
            .unwrap();
        let post = http.post(s.url(&path)).body("x=1").send().await.unwrap();
        let (g, p) = (get.status().as_u16(), post.status().as_u16());
        assert!(
            (g == 303 && get.headers()["location"] == "/login") || g == 401 || g == 405,
            "GET {path}: {g}"
        );
        assert!(p == 401 || p == 405, "POST {path}: {p}");
        assert!(g != 405 || p != 405, "{path} answers neither GET nor POST");
    }
    s.stop().await;
}

#[tokio::test]
async fn the_api_is_closed_when_no_key_is_configured() {
    let s = start(false, &[("LORALOOP_API_KEY", "")]).await;
    let r = s.get("/v1/models").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("LORALOOP_API_KEY"),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_import_with_a_warning_on_every_line_answers_with_the_first_and_a_count() {
    let s = start(false, &[]).await;
    // A warning on every line (49 duplicates of the first): the response lists the first
    // 20 (MAX_LISTED_PROBLEMS) and counts them all, instead of growing with the file.
    let r = s
        .post("/api/v1/datasets?name=repeats")
        .header("content-type", "application/jsonl")
        .body(zorblax_jsonl(50))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["warning_count"], 49, "{body}");
    assert_eq!(
        body["warnings"].as_array().map(Vec::len),
        Some(20),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_4xx_and_change_nothing() {
    let s = start(false, &[("LORALOOP_SERVER__MAX_UPLOAD_MB", "1")]).await;
    let ds = s.upload_dataset("good", &zorblax_jsonl(4)).await;

    // A media type is read in any case (RFC 9110); another type is a 415.
    for (content_type, status) in [
        ("APPLICATION/JSON; charset=UTF-8", 422),
        ("text/plain", 415),
    ] {
        let r = s
            .post("/api/v1/fine-tune")
            .header("content-type", content_type)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{content_type}");
    }
    // A method the address does not take: a JSON 405 with the Allow header.
    let r = s
        .http
        .put(s.url("/v1/models"))
        .bearer_auth(crate::support::KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");

    // Malformed JSON: 400.
    let r = s
        .post("/api/v1/fine-tune")
        .header("content-type", "application/json")
        .body("{\"dataset_id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json", "{body}");

    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"dataset_id": ds, "surprise": 1}), 422, ""),
        (
            json!({"dataset_id": ds, "hyperparameters": {"learning_rate": -0.1}}),
            422,
            "hyperparameters.learning_rate",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"learning_rate": 1e9}}),
            422,
            "hyperparameters.learning_rate",
        ),
        (json!({"dataset_id": ds, "epochs": 1e9}), 422, "epochs"),
        (json!({"dataset_id": ds, "epochs": -1}), 422, "epochs"),
        // One setting sent twice with two values.
        (
            json!({"dataset_id": ds, "epochs": 3, "hyperparameters": {"n_epochs": 5}}),
            422,
            "epochs",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"n_epochs": 5, "num_epochs": 2}}),
            422,
            "hyperparameters.n_epochs",
        ),
        (
            json!({"dataset_id": ds, "method": "full", "hyperparameters": {"freeze_trainable_layers": 3}}),
            422,
            "hyperparameters.freeze_trainable_layers",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"batch_size": 0}}),
            422,
            "hyperparameters.batch_size",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"lora_r": 100000}}),
            422,
            "hyperparameters.lora_r",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"output_dir": "/etc"}}),
            422,
            "hyperparameters.output_dir",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"lora_dropout": 7}}),
            422,
            "hyperparameters.lora_dropout",
        ),
        (json!({"dataset_id": ds, "method": "magic"}), 422, "method"),
        // A KTO run needs a KTO dataset; this one holds chat examples.
        (
            json!({"dataset_id": ds, "hyperparameters": {"rl": "kto"}}),
            422,
            "dataset_id",
        ),
        (
            json!({"dataset_id": ds, "method": "dpo"}),
            422,
            "dataset_id",
        ),
        (
            json!({"dataset_id": ds, "method": "dpo", "hyperparameters": {"rl": "kto"}}),
            422,
            "method",
        ),
        (
            json!({"dataset_id": ds, "hyperparameters": {"rl": "ppo"}}),
            422,
            "hyperparameters.rl",
        ),
        (json!({"dataset_id": "one"}), 422, "dataset_id"),
        (json!({"dataset_id": 999}), 404, "dataset_id"),
        (json!({}), 422, "dataset_id"),
        (
            json!({"dataset_id": ds, "model_id": "../../etc/passwd"}),
            422,
            "model_id",
        ),
        (
            json!({"dataset_id": ds, "model_id": "/etc/passwd"}),
            422,
            "model_id",
        ),
        (
            json!({"dataset_id": ds, "model_id": "missing.gguf"}),
            404,
            "model_id",
        ),
        (
            json!({"dataset_url": "/nonexistent/data.jsonl"}),
            422,
            "dataset_url",
        ),
        (
            json!({"dataset_url": "http://127.0.0.1:1/data.jsonl"}),
            422,
            "dataset_url",
        ),
    ];
    for (body, status, param) in cases {
        let (got, resp) = s.post_json("/api/v1/fine-tune", &body).await;
        assert_eq!(got, status, "{body} -> {resp}");
        if !param.is_empty() {
            assert_eq!(resp["error"]["param"], param, "{body} -> {resp}");
        }
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{resp}"
        );
    }
    // Uploads: over the limit, a bad name, an invalid file.
    let big = zorblax_jsonl(20_000); // > 1 MB
    assert!(big.len() > 1024 * 1024);
    let r = s
        .post("/api/v1/datasets?name=big")
        .header("content-type", "application/jsonl")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    for name in ["..%2F..%2Fetc", "a%2Fb", ".hidden", ""] {
        let r = s
            .post(&format!("/api/v1/datasets?name={name}"))
            .header("content-type", "application/jsonl")
            .body(zorblax_jsonl(2))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "name {name:?}");
    }
    let r = s
        .post("/api/v1/datasets?name=broken")
        .header("content-type", "application/jsonl")
        .body("{\"messages\": [}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = s
        .post("/api/v1/datasets?name=x&color=red")
        .header("content-type", "application/jsonl")
        .body(zorblax_jsonl(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "unknown query parameter");

    // Unknown ids.
    assert_eq!(
        s.get("/api/v1/fine-tune/424242")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        s.get("/api/v1/fine-tune/abc")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        s.post("/api/v1/adapters/77/activate")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // An id the path cannot hold (not a number, not UTF-8) is a 404 saying what was
    // looked for, not axum's plain-text 400.
    for (method, path, says) in [
        ("POST", "/api/v1/adapters/abc/activate", "no such id"),
        ("GET", "/api/v1/fine-tune/%FF", "no such id"),
        ("GET", "/v1/files/%FF", "no such file"),
        ("GET", "/v1/fine_tuning/jobs/%FF", "no such fine-tuning job"),
        ("GET", "/api/v1/assistants/%FF", "UTF-8"),
    ] {
        let req = if method == "POST" {
            s.post(path)
        } else {
            s.get(path)
        };
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 404, "{method} {path}");
        let body = r.text().await.unwrap();
        assert!(body.contains(says), "{method} {path}: {body}");
    }
    let (got, _) = s.post_json("/api/v1/adapters/rollback", &json!({})).await;
    assert_eq!(got, 409, "nothing to roll back to");

    // Chat: unknown model, empty messages, unknown field, unsupported values.
    for (body, status, param) in [
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model",
        ),
        (
            json!({"model": "loraloop", "messages": []}),
            422,
            "messages",
        ),
        (
            json!({"model": "loraloop", "messages": [{"role": "user", "content": "hi"}], "tempo": 1}),
            422,
            "",
        ),
        (
            json!({"model": "loraloop", "messages": [{"role": "tool", "content": "hi"}]}),
            422,
            "messages[0].role",
        ),
        (
            json!({"model": "loraloop", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
            422,
            "temperature",
        ),
        (
            json!({"model": "loraloop", "messages": [{"role": "user", "content": "hi"}], "n": 3}),
            422,
            "n",
        ),
        (
            json!({"model": "loraloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            422,
            "max_tokens",
        ),
    ] {
        let (got, resp) = s.post_json("/v1/chat/completions", &body).await;
        assert_eq!(got, status, "{body} -> {resp}");
        if !param.is_empty() {
            assert_eq!(resp["error"]["param"], param, "{body} -> {resp}");
        }
    }

    // Nothing of the above created a job or a dataset.
    let jobs = s.get_json("/api/v1/fine-tune").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0, "{jobs}");
    let datasets = s.get_json("/api/v1/datasets").await;
    assert_eq!(datasets["data"].as_array().unwrap().len(), 1, "{datasets}");

    // A queued job (no worker here) is cancelled at once; cancelling again is a 409.
    let (got, job) = s
        .post_json("/api/v1/fine-tune", &json!({"dataset_id": ds, "epochs": 1}))
        .await;
    assert_eq!(got, 200, "{job}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["object"], "fine_tuning.job");
    let id = job["id"].as_i64().unwrap();
    let (got, job) = s
        .post_json(&format!("/api/v1/fine-tune/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(got, 200);
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].as_i64().is_some(), "{job}");
    let (got, _) = s
        .post_json(&format!("/api/v1/fine-tune/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(got, 409);
    s.stop().await;
}

/// Collect one streamed chat completion: (text, the fingerprints of its chunks, finish).
async fn stream_chat(
    s: &TestServer,
    model: &str,
    prompt: &str,
) -> Result<(String, Vec<String>, String), String> {
    let r = s
        .post("/v1/chat/completions")
        .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let body = r.text().await.map_err(|e| e.to_string())?;
    let (mut text, mut fps, mut finish, mut done) =
        (String::new(), Vec::new(), String::new(), false);
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        if v.get("error").is_some() {
            return Err(line.to_string());
        }
        fps.push(v["system_fingerprint"].as_str().unwrap_or("").to_string());
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    if !done {
        return Err(format!("no [DONE] in {body}"));
    }
    Ok((text, fps, finish))
}

async fn chat(s: &TestServer, model: &str, prompt: &str) -> Value {
    let (status, v) = s
        .post_json(
            "/v1/chat/completions",
            &json!({"model": model, "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test]
async fn a_job_trains_registers_its_adapter_and_activation_changes_the_next_reply() {
    let s = start(true, &[]).await;
    let prompt = "What is the capital of Zorblax?";
    let before = chat(&s, "loraloop", prompt).await;
    assert_eq!(before["system_fingerprint"], "base");
    assert_eq!(before["object"], "chat.completion");
    let usage = &before["usage"];
    assert_eq!(
        usage["total_tokens"].as_i64().unwrap(),
        usage["prompt_tokens"].as_i64().unwrap() + usage["completion_tokens"].as_i64().unwrap()
    );

    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let (status, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"model_id": "tiny", "dataset_id": ds, "epochs": 3,
                    "hyperparameters": {"learning_rate": 0.02, "batch_size": 4, "lora_r": 4, "sequence_len": 64}}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["hyperparameters"]["micro_batch_size"], 4);
    assert_eq!(job["hyperparameters"]["num_epochs"], 3.0);
    let id = job["id"].as_i64().unwrap();

    // Live events over SSE until the job is done.
    let sse = s
        .get(&format!("/api/v1/fine-tune/{id}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert!(
        sse.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(120), sse.text())
        .await
        .expect("the stream ends with the job")
        .unwrap();
    let step_events = text.matches("event: step").count();
    assert_eq!(step_events, 6, "8 examples / batch 4 x 3 epochs:\n{text}");
    assert!(text.contains("event: done"), "{text}");

    let done = s.wait_job(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["step"], 6);
    assert_eq!(done["total_steps"], 6);
    // 8 examples x 3 epochs, each the ChatML rendering of the conversation with the tiny
    // byte-level tokenizer: one token per byte of "user\n" (5), the question (31), "\n"
    // (1), "assistant\n" (10), "Blorp City." (11), "\n" (1), plus 4 special markers
    // (<|im_start|> and <|im_end|> twice) = 63 tokens, counted by hand.
    assert_eq!(done["trained_tokens"], 8 * 3 * 63, "{done}");
    assert!(done["finished_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    let adapter = done["fine_tuned_adapter"].as_str().unwrap().to_string();
    let adapter_id = done["fine_tuned_adapter_id"].as_i64().unwrap();

    // Paginated events: the same steps, in order.
    let page1 = s
        .get_json(&format!("/api/v1/fine-tune/{id}/events?limit=3"))
        .await;
    assert_eq!(page1["data"].as_array().unwrap().len(), 3);
    assert_eq!(page1["has_more"], true);
    let last = page1["data"][2]["id"].as_i64().unwrap();
    let rest = s
        .get_json(&format!(
            "/api/v1/fine-tune/{id}/events?after={last}&limit=1000"
        ))
        .await;
    let all: Vec<&Value> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["data"].as_array().unwrap())
        .collect();
    let steps: Vec<i64> = all
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert!(
        all.iter()
            .filter(|e| e["type"] == "step")
            .all(|e| e["loss"].as_f64().unwrap().is_finite())
    );

    // The adapter is listed, compatible, not active yet; /v1/models offers it.
    let adapters = s.get_json("/api/v1/adapters").await;
    let a = &adapters["data"][0];
    assert_eq!(a["name"], adapter.as_str());
    assert_eq!(a["active"], false);
    assert_eq!(a["job_id"], id);
    assert_eq!(a["rank"], 4);
    assert!(a["incompatible"].is_null(), "{a}");
    let models = s.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["loraloop", "base", adapter.as_str()]);

    // Activate: the very next reply is the adapter's.
    let (status, act) = s
        .post_json(
            &format!("/api/v1/adapters/{adapter_id}/activate"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{act}");
    assert_eq!(act["adapter_name"], adapter.as_str());
    let after = chat(&s, "loraloop", prompt).await;
    assert!(
        after["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("adapter:{adapter}@")),
        "{after}"
    );
    assert_ne!(
        after["choices"][0]["message"]["content"], before["choices"][0]["message"]["content"],
        "training changed the greedy reply"
    );
    // `base` and the adapter by name pick per request, whatever is active.
    let base = chat(&s, "base", prompt).await;
    assert_eq!(base["system_fingerprint"], "base");
    assert_eq!(
        base["choices"][0]["message"]["content"],
        before["choices"][0]["message"]["content"]
    );
    let named = chat(&s, &adapter, prompt).await;
    assert_eq!(
        named["choices"][0]["message"]["content"],
        after["choices"][0]["message"]["content"]
    );
    let adapters = s.get_json("/api/v1/adapters").await;
    assert_eq!(adapters["data"][0]["active"], true);

    // Rollback: back to the base model.
    let (status, rb) = s.post_json("/api/v1/adapters/rollback", &json!({})).await;
    assert_eq!(status, 200, "{rb}");
    assert!(rb["adapter_id"].is_null());
    let again = chat(&s, "loraloop", prompt).await;
    assert_eq!(again["system_fingerprint"], "base");
    assert_eq!(
        again["choices"][0]["message"]["content"],
        before["choices"][0]["message"]["content"]
    );

    // Metrics saw the generations and the swaps.
    let m = s
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "loraloop_generated_tokens_total",
        "loraloop_generation_tokens_per_second",
        "loraloop_generation_queue_depth 0",
        // The five completions above, each finished; none failed or left.
        "loraloop_generations_total 5\n",
        "loraloop_generations_failed_total 0\n",
        "loraloop_generations_abandoned_total 0\n",
        "loraloop_adapter_swaps_total 2",
        "loraloop_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"} 5",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }

    // The adapter survives a restart: activate, stop, start on the same files.
    let (status, _) = s
        .post_json(
            &format!("/api/v1/adapters/{adapter_id}/activate"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let config = s.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = s;
    server.stop().await.unwrap();
    // What a killed server leaves: an export's scratch file, an upload being unpacked, and
    // an uploaded folder whose adapter was never recorded (a 409 for that name forever).
    let data = &config.raw.data_dir;
    let leftovers = [
        data.join("tmp/ab12cd34.gguf"),
        data.join("adapters/.upload-ab12cd34/adapter_model.safetensors"),
        data.join("adapters/uploaded-ghost/adapter_model.safetensors"),
    ];
    for f in &leftovers {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"half").unwrap();
    }
    let server = crate::support::start_config(config.clone()).await;
    assert_eq!(
        server.state.engine.active_adapter().map(|t| t.name),
        Some(adapter.clone())
    );
    for f in &leftovers {
        assert!(!f.exists(), "{} was left", f.display());
    }
    assert!(!data.join("adapters/uploaded-ghost").exists());
    assert!(
        data.join(format!("adapters/{adapter}")).is_dir(),
        "a recorded adapter stays"
    );
    server.stop().await.unwrap();
    drop(dir);
}

#[tokio::test]
async fn generations_run_without_a_failure_through_ten_swaps_and_each_finishes_on_its_adapter() {
    let s = start(true, &[]).await;
    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let (_, a_id, a_name) = train_adapter(&s, ds, 1).await;
    let (_, b_id, b_name) = train_adapter(&s, ds, 2).await;
    let s = std::sync::Arc::new(s);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (s, stop) = (s.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                results.push(
                    stream_chat(
                        &s,
                        "loraloop",
                        &format!("Tell me about Zorblax, client {c}."),
                    )
                    .await,
                );
            }
            results
        }));
    }
    let mut swap_ms = Vec::new();
    for i in 0..10 {
        let (id, name) = if i % 2 == 0 {
            (a_id, &a_name)
        } else {
            (b_id, &b_name)
        };
        let (status, act) = s
            .post_json(&format!("/api/v1/adapters/{id}/activate"), &json!({}))
            .await;
        assert_eq!(status, 200, "{act}");
        swap_ms.push(act["took_ms"].as_f64().unwrap());
        // The next request runs on the adapter just activated.
        let (_, fps, _) = stream_chat(&s, "loraloop", "And now?").await.unwrap();
        assert!(
            fps.iter()
                .all(|f| f.starts_with(&format!("adapter:{name}@"))),
            "swap {i}: {fps:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        for r in c.await.unwrap() {
            let (_, fps, finish) = r.expect("no generation fails during swaps");
            assert!(!fps.is_empty());
            assert!(
                fps.iter().all(|f| f == &fps[0]),
                "a reply changed adapter mid-stream: {fps:?}"
            );
            assert!(finish == "stop" || finish == "length", "{finish}");
            total += 1;
        }
    }
    assert!(total >= 10, "only {total} generations ran during the swaps");
    eprintln!("{total} concurrent generations through 10 swaps; activation took {swap_ms:?} ms");
    let s = std::sync::Arc::try_unwrap(s).ok().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn racing_activations_leave_the_database_and_the_engine_in_agreement() {
    let s = start(true, &[]).await;
    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let (_, a_id, _) = train_adapter(&s, ds, 1).await;
    let (_, b_id, _) = train_adapter(&s, ds, 2).await;
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let id = if i % 2 == 0 { a_id } else { b_id };
        tasks.push(tokio::spawn(async move {
            s.post_json(&format!("/api/v1/adapters/{id}/activate"), &json!({}))
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            409 => assert_eq!(body["error"]["code"], "conflict", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1);
    let db = &s.server.state.db;
    let history: Vec<Option<i64>> =
        sqlx::query_scalar("select adapter_id from adapter_activations order by id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    // Every accepted activation that changed the adapter is recorded, no refused one is;
    // one of the adapter already active (two racers asking for the same one, in turn)
    // changes nothing and records nothing.
    assert!(
        !history.is_empty() && history.len() as i64 <= ok,
        "{history:?}, {ok} accepted"
    );
    assert!(
        history.windows(2).all(|w| w[0] != w[1]),
        "no repeated entry: {history:?}"
    );
    let active_in_db = db.assistant("loraloop").await.unwrap().active_adapter_id;
    assert_eq!(history.last().copied().flatten(), active_in_db);
    let engine = s.server.state.engine.active_adapter().unwrap();
    let names = s.get_json("/api/v1/adapters").await;
    let db_name = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"].as_i64() == active_in_db)
        .unwrap()["name"]
        .clone();
    assert_eq!(db_name, engine.name.as_str());
    let s = std::sync::Arc::try_unwrap(s).ok().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn the_openapi_document_and_health_check_are_served() {
    let s = start(false, &[]).await;
    let doc = s.get_json("/api/v1/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(
        doc["components"]["securitySchemes"]["bearer"].is_object(),
        "{doc}"
    );
    assert!(doc["components"]["schemas"]["CreateJob"].is_object());
    let health: Value = s
        .http
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    let _ = KEY;
    s.stop().await;
}

/// The first step's loss of a finished job, from its events.
async fn first_loss(s: &TestServer, id: i64) -> f64 {
    let events = s
        .get_json(&format!("/api/v1/fine-tune/{id}/events?limit=1000"))
        .await;
    events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "step" && e["step"] == 1)
        .and_then(|e| e["loss"].as_f64())
        .unwrap_or_else(|| panic!("no step 1 in {events}"))
}

#[tokio::test]
async fn every_name_v1_models_lists_is_a_model_id_and_an_adapter_name_continues_it() {
    let s = start(true, &[]).await;
    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let settings = json!({"learning_rate": 0.02, "batch_size": 4, "lora_r": 4, "sequence_len": 64});
    let mut first = None;
    for name in ["loraloop", "base", "tiny"] {
        let (status, job) = s
            .post_json(
                "/api/v1/fine-tune",
                &json!({"model_id": name, "dataset_id": ds, "epochs": 2, "hyperparameters": settings}),
            )
            .await;
        assert_eq!(status, 200, "{name}: {job}");
        assert_eq!(
            job["model"], "tiny",
            "{name} trains the served model: {job}"
        );
        assert_eq!(job["assistant"], "loraloop", "{job}");
        let done = s.wait_job(job["id"].as_i64().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        first.get_or_insert(done);
    }
    let first = first.unwrap();
    let adapter = first["fine_tuned_adapter"].as_str().unwrap();
    let fresh_loss = first_loss(&s, first["id"].as_i64().unwrap()).await;

    // An adapter's name continues training from that adapter: the same data starts at
    // the loss the adapter ended with, far below a fresh adapter's first step.
    let (status, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"model_id": adapter, "dataset_id": ds, "epochs": 1, "hyperparameters": settings}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    let done = s.wait_job(job["id"].as_i64().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let continued_loss = first_loss(&s, job["id"].as_i64().unwrap()).await;
    assert!(
        continued_loss < fresh_loss * 0.5,
        "continued from {adapter}: first loss {continued_loss} vs fresh {fresh_loss}"
    );
    // Only a LoRA run continues an adapter; a full one is told what it can start from.
    let (status, err) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"model_id": adapter, "dataset_id": ds, "method": "full"}),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["param"], "model_id");
    // The OpenAI route likewise: a DPO job does not continue an adapter.
    let (status, err) = s
        .post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": adapter, "training_file": "file-1", "method": {"type": "dpo"}}),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["param"], "model");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("only a LoRA fine-tune"), "{message}");

    // An unknown name is refused with every accepted name in the message.
    let (status, err) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"model_id": "gpt-4o", "dataset_id": ds}),
        )
        .await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["param"], "model_id");
    let message = err["error"]["message"].as_str().unwrap();
    for accepted in [
        "\"loraloop\"",
        "\"base\"",
        &format!("{adapter:?}"),
        "\"tiny\"",
    ] {
        assert!(message.contains(accepted), "{accepted} missing: {message}");
    }
}

/// The database names an active adapter whose files cannot be loaded at start (moved,
/// an unmounted disk): the base model answers, /healthz says so, and the adapter is
/// served as soon as its files are back, without a restart.
#[tokio::test]
async fn an_active_adapter_that_cannot_be_restored_is_reported_and_retried() {
    let s = start(true, &[]).await;
    let (_, _, name) = active_adapter(&s).await;
    let rows = s.server.state.db.list_adapters().await.unwrap();
    let path = std::path::PathBuf::from(&rows[0].path);
    let config = s.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = s;
    server.stop().await.unwrap();
    let aside = path.with_extension("moved");
    std::fs::rename(&path, &aside).unwrap();

    let server = crate::support::start_config(config).await;
    let base = format!("http://{}", server.addr.unwrap());
    let http = reqwest::Client::new();
    let health = || async {
        let r = http.get(format!("{base}/healthz")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, h) = health().await;
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["parts"]["adapter"]["state"], "restarting", "{h}");
    assert!(
        h["parts"]["adapter"]["last_error"]
            .as_str()
            .unwrap()
            .contains("base model answers"),
        "{h}"
    );
    let chat = |model: &'static str| {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "Zorblax?"}]}))
            .send()
    };
    let r: Value = chat("loraloop").await.unwrap().json().await.unwrap();
    assert_eq!(r["system_fingerprint"], "base", "{r}");

    std::fs::rename(&aside, &path).unwrap();
    let mut healthy = Value::Null;
    for _ in 0..50 {
        let (status, h) = health().await;
        if status == 200 {
            healthy = h;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(healthy["parts"]["adapter"]["state"], "running", "{healthy}");
    let r: Value = chat("loraloop").await.unwrap().json().await.unwrap();
    assert!(
        r["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("adapter:{name}@")),
        "{r}"
    );
    server.stop().await.unwrap();
    drop(dir);
}

#[tokio::test]
async fn the_audit_log_records_who_did_what() {
    let s = start(true, &[]).await;
    let (job, _, name) = active_adapter(&s).await;
    let (status, _) = s.post_json("/api/v1/adapters/rollback", &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post_json("/api/v1/assistants", &json!({"name": "support"}))
        .await;
    assert_eq!(status, 201);
    let r = s.delete("/api/v1/assistants/support").await;
    assert_eq!(r, 204);
    let log = s.get_json("/api/v1/audit?limit=10").await;
    let rows: Vec<(String, String, String)> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                e["target"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected = [
        ("api", "delete assistant", "support".to_string()),
        ("api", "create assistant", "support".to_string()),
        (
            "api",
            "roll back adapter",
            "assistant 1: the base model".to_string(),
        ),
        ("api", "activate adapter", format!("assistant 1: {name}")),
        (
            "api",
            "create job",
            format!("job {job} on dataset zorblax v1"),
        ),
    ];
    let expected: Vec<(String, String, String)> = expected
        .into_iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c))
        .collect();
    assert_eq!(rows, expected);
    // The audit log needs the key like every API route.
    let r = s.http.get(s.url("/api/v1/audit")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    s.stop().await;
}

#[tokio::test]
async fn a_console_page_for_an_id_that_is_not_a_number_is_a_404_page() {
    let s = start(false, &[]).await;
    let (client, _) = s.console_login().await;
    let with_id: Vec<String> = console_routes()
        .into_iter()
        .filter(|r| r.contains("{id}"))
        .collect();
    assert!(with_id.len() >= 6, "{with_id:?}");
    let mut pages = 0;
    for route in &with_id {
        let path = route.replace("{id}", "not-a-number");
        let r = client.get(s.url(&path)).send().await.unwrap();
        if r.status() == 405 {
            continue; // a POST-only action
        }
        assert_eq!(r.status(), 404, "GET {path}");
        let page = r.text().await.unwrap();
        assert!(
            page.contains(r#"<p class="error">"#) && page.contains("<nav"),
            "GET {path}: {page}"
        );
        pages += 1;
    }
    assert!(pages >= 4, "{pages} pages answered GET");
    s.stop().await;
}

/// `serve` looks every second whether another process changed the active adapter. That
/// look must not make an operator's activation fail as "another activation is in
/// progress": with the look running back to back, every activation succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activations_are_not_refused_while_the_follower_looks() {
    let s = start(true, &[]).await;
    let (_, adapter_id, _) = active_adapter(&s).await;
    let adapters = s.server.state.adapters.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looking = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut looks = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                adapters.follow().await.unwrap();
                looks += 1;
            }
            looks
        })
    };
    let mut refused = Vec::new();
    for _ in 0..30 {
        let (status, body) = s
            .post_json(
                &format!("/api/v1/adapters/{adapter_id}/activate"),
                &json!({}),
            )
            .await;
        if status != 200 {
            refused.push(format!("{status} {body}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = looking.await.unwrap();
    assert!(looks > 30, "the follower looked {looks} times");
    assert!(
        refused.is_empty(),
        "{} of 30 refused: {refused:?}",
        refused.len()
    );
    s.stop().await;
}

#[tokio::test]
async fn the_first_reply_after_a_gate_activation_succeeds_comes_from_the_new_adapter() {
    // Thresholds any adapter passes: this is about when, not whether, it is activated.
    let s = start(
        true,
        &[
            ("LORALOOP_ASSISTANT__ACTIVATION", "gate"),
            ("LORALOOP_GATE__MIN_RETENTION_AGREEMENT", "0"),
            ("LORALOOP_GATE__MAX_RETENTION_KL", "1000"),
            ("LORALOOP_GATE__MAX_HELDOUT_LOSS_RATIO", "1000"),
            ("LORALOOP_GATE__MAX_RATED_LOSS_INCREASE", "1000"),
            ("LORALOOP_GATE__RETENTION_PROMPTS", "4"),
        ],
    )
    .await;
    let ds = s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    // `train_adapter` returns as soon as the job reports `succeeded`.
    let (_, _, name) = train_adapter(&s, ds, 1).await;
    answers_with_adapter(&s, &name).await;
    s.stop().await;
}

#[tokio::test]
async fn the_dataset_list_pages_with_limit_and_after_and_refuses_a_bad_page() {
    let s = start(false, &[]).await;
    for name in ["a", "b", "c"] {
        s.upload_dataset(name, &zorblax_jsonl(2)).await;
    }
    let names = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    let all = s.get_json("/api/v1/datasets").await;
    assert_eq!(
        (names(&all), &all["has_more"]),
        (vec!["a".into(), "b".into(), "c".into()], &json!(false))
    );
    let first = s.get_json("/api/v1/datasets?limit=2").await;
    assert_eq!(
        (names(&first), &first["has_more"]),
        (vec!["a".into(), "b".into()], &json!(true))
    );
    let last = first["data"][1]["id"].as_i64().unwrap();
    let next = s
        .get_json(&format!("/api/v1/datasets?limit=2&after={last}"))
        .await;
    assert_eq!(
        (names(&next), &next["has_more"]),
        (vec!["c".into()], &json!(false))
    );
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=abc", "query"),
        ("after=999999", "after"),
    ] {
        let r = s
            .get(&format!("/api/v1/datasets?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
}
