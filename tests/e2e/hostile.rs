//! Hostile input against the running binary: `loraloop serve` as its own process (tiny
//! model, Telegram in webhook mode against the fake Bot API), then malformed and hostile
//! requests, files and updates at every surface: the REST API, the OpenAI endpoint, the
//! console, the webhook, uploads, datasets, adapters. Each must be answered with a clear
//! 4xx (never a 5xx, never a hang), the process must stay up with its memory bounded,
//! and the database must be what it was before (a dump of every table compared).

use super::fake_telegram;
use loraloop_model::testing::{TinySpec, write_tiny_chat_model};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const KEY: &str = "hostile-api-key-0123456789";
const PASSWORD: &str = "hostile-admin-password";
const TOKEN: &str = fake_telegram::TOKEN;

/// One request and what it must get: a status in `expect`.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Body,
    expect: std::ops::RangeInclusive<u16>,
}

enum Body {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
    Form(String),
    Multipart(Vec<(&'static str, Vec<u8>, Option<&'static str>)>),
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Every row of every table, as text (`quote()` of each column), in a stable order.
async fn dump(db: &std::path::Path, skip: &[&str]) -> String {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "select name from sqlite_master where type = 'table' and name not like 'sqlite_%' order by name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut out = String::new();
    for t in tables.iter().filter(|t| !skip.contains(&t.as_str())) {
        let cols: Vec<String> =
            sqlx::query_scalar(&format!("select name from pragma_table_info('{t}')"))
                .fetch_all(&pool)
                .await
                .unwrap();
        let expr = cols
            .iter()
            .map(|c| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("select {expr} from \"{t}\" order by 1"))
                .fetch_all(&pool)
                .await
                .unwrap();
        out.push_str(&format!("## {t}\n{}\n", rows.join("\n")));
    }
    pool.close().await;
    out
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        std::io::Write::write_all(&mut w, data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn nested_json(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

fn cases(csrf: &str, webhook_secret_ok: bool) -> Vec<Case> {
    let api = |what, method: Method, path: &str, body: Body, expect| Case {
        what,
        method,
        path: path.to_string(),
        headers: vec![("authorization", format!("Bearer {KEY}"))],
        body,
        expect,
    };
    let json = |v: Value| Body::Json(v);
    let raw = |t: &'static str, b: &[u8]| Body::Raw(t, b.to_vec());
    let jt = "application/json";
    let c4 = 400..=499;
    let chat = |v: Value| Body::Json(v);
    let msg = |c: Value| json!({"model": "loraloop", "messages": [{"role": "user", "content": c}]});
    let mut v = vec![
        // --- authentication ---
        Case { what: "no key", method: Method::GET, path: "/api/v1/datasets".into(), headers: vec![], body: Body::None, expect: 401..=401 },
        Case { what: "wrong key", method: Method::GET, path: "/api/v1/datasets".into(), headers: vec![("authorization", "Bearer nope".into())], body: Body::None, expect: 401..=401 },
        Case { what: "key in the query", method: Method::GET, path: format!("/api/v1/datasets?api_key={KEY}"), headers: vec![], body: Body::None, expect: 401..=401 },
        Case { what: "basic auth", method: Method::GET, path: "/v1/models".into(), headers: vec![("authorization", "Basic YWRtaW46YWRtaW4=".into())], body: Body::None, expect: 401..=401 },
        Case { what: "8 KB bearer", method: Method::GET, path: "/v1/models".into(), headers: vec![("authorization", format!("Bearer {}", "k".repeat(8000)))], body: Body::None, expect: 401..=431 },
        Case { what: "fine-tune without a key", method: Method::POST, path: "/api/v1/fine-tune".into(), headers: vec![], body: json(json!({"dataset_id": 1})), expect: 401..=401 },
        // --- malformed JSON ---
        api("not JSON", Method::POST, "/api/v1/fine-tune", raw(jt, b"{not json"), c4.clone()),
        api("JSON of the wrong shape", Method::POST, "/api/v1/fine-tune", raw(jt, b"[1,2,3]"), c4.clone()),
        api("NaN literal", Method::POST, "/api/v1/fine-tune", raw(jt, b"{\"dataset_id\": NaN}"), c4.clone()),
        api("nested 100k deep", Method::POST, "/api/v1/fine-tune", raw(jt, nested_json(100_000).as_bytes()), c4.clone()),
        api("invalid UTF-8", Method::POST, "/api/v1/fine-tune", raw(jt, b"{\"model_id\": \"\xff\xfe\"}"), c4.clone()),
        api("NUL in a string", Method::POST, "/api/v1/fine-tune", json(json!({"model_id": "a\u{0}b", "dataset_id": 1})), c4.clone()),
        api("huge number", Method::POST, "/api/v1/fine-tune", raw(jt, b"{\"dataset_id\": 1e999}"), c4.clone()),
        api("wrong content type", Method::POST, "/api/v1/fine-tune", raw("text/plain", b"{\"dataset_id\":1}"), c4.clone()),
        api("empty body", Method::POST, "/api/v1/fine-tune", raw(jt, b""), c4.clone()),
        api("unknown field", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "owner": "root"})), c4.clone()),
        // --- fine-tune ---
        api("dataset_url /etc/passwd", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "/etc/passwd"})), 422..=422),
        api("dataset_url file://", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "file:///etc/shadow"})), 422..=422),
        api("dataset_url /proc", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "/proc/self/environ"})), 422..=422),
        api("dataset_url metadata service", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "http://169.254.169.254/latest/meta-data/"})), 422..=422),
        api("dataset_url loopback", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "http://127.0.0.1:22/"})), 422..=422),
        api("dataset_url IPv6 loopback", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "http://[::1]/x"})), 422..=422),
        api("dataset_url gopher", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "gopher://example.org/"})), 422..=422),
        api("dataset_url data:", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "data:text/plain,{}"})), 422..=422),
        api("dataset_url with credentials", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_url": "http://u:p@10.0.0.1/x"})), 422..=422),
        api("model_id traversal", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "model_id": "../../../etc/passwd"})), 422..=422),
        api("model_id absolute", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "model_id": "/etc/passwd"})), 422..=422),
        api("model_id unknown", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "model_id": "gpt-5"})), 404..=404),
        api("learning rate 1e9", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"learning_rate": 1e9}})), 422..=422),
        api("epochs 1e9", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "epochs": 1e9})), 422..=422),
        api("rank 100000", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"lora_r": 100000}})), 422..=422),
        api("batch size 0", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"batch_size": 0}})), 422..=422),
        api("output_dir", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"output_dir": "/etc"}})), 422..=422),
        api("replay prompts file", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"replay_prompts_file": "/etc/passwd"}})), 422..=422),
        api("init adapter path", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "hyperparameters": {"lora_model_dir": "/tmp"}})), 422..=422),
        api("dataset id as text", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": "1; drop table datasets"})), 422..=422),
        api("dataset id overflow", Method::POST, "/api/v1/fine-tune", raw(jt, b"{\"dataset_id\": 99999999999999999999999}"), c4.clone()),
        api("unknown dataset", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 987654})), 404..=404),
        api("method injection", Method::POST, "/api/v1/fine-tune", json(json!({"dataset_id": 1, "method": "lora'; --"})), 422..=422),
        api("job id not a number", Method::GET, "/api/v1/fine-tune/abc", Body::None, c4.clone()),
        api("job id overflow", Method::GET, "/api/v1/fine-tune/99999999999999999999999", Body::None, c4.clone()),
        api("cancel a missing job", Method::POST, "/api/v1/fine-tune/424242/cancel", Body::None, 404..=404),
        api("events with a negative limit", Method::GET, "/api/v1/fine-tune/1/events?limit=-5", Body::None, c4.clone()),
        api("jobs with a text limit", Method::GET, "/api/v1/fine-tune?limit=lots", Body::None, c4.clone()),
        // --- dataset uploads ---
        api("dataset of binary garbage", Method::POST, "/api/v1/datasets?name=garbage", raw("application/octet-stream", &[0u8, 159, 146, 150, 255, 0, 1]), 422..=422),
        api("empty dataset", Method::POST, "/api/v1/datasets?name=empty", raw("application/x-ndjson", b""), 422..=422),
        api("dataset line nested 50k deep", Method::POST, "/api/v1/datasets?name=deep", raw("application/x-ndjson", nested_json(50_000).as_bytes()), 422..=422),
        api("dataset with wrong roles", Method::POST, "/api/v1/datasets?name=roles", raw("application/x-ndjson", b"{\"messages\":[{\"role\":\"root\",\"content\":\"x\"}]}\n"), 422..=422),
        api("dataset name traversal", Method::POST, "/api/v1/datasets?name=../../etc", raw("application/x-ndjson", b"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n"), 422..=422),
        api("dataset name of 5000 chars", Method::POST, &format!("/api/v1/datasets?name={}", "n".repeat(5000)), raw("application/x-ndjson", b"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n"), 422..=422),
        api("multipart without the file", Method::POST, "/api/v1/datasets", Body::Multipart(vec![("name", b"x".to_vec(), None)]), c4.clone()),
        api("dataset build with a bad filter", Method::POST, "/api/v1/datasets/build", json(json!({"name": "b", "filter": {"min_rating": "lots"}})), c4.clone()),
        // --- the OpenAI endpoint ---
        api("no messages", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "messages": []})), 422..=422),
        api("2000 messages", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "messages": vec![json!({"role": "user", "content": "hi"}); 2000]})), 422..=422),
        api("unknown role", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "messages": [{"role": "root", "content": "x"}]})), 422..=422),
        api("content an object", Method::POST, "/v1/chat/completions", chat(msg(json!({"evil": true}))), c4.clone()),
        api("max_tokens negative", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]})), c4.clone()),
        api("max_tokens 1e12", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "max_tokens": 1_000_000_000_000u64, "messages": [{"role": "user", "content": "x"}]})), c4.clone()),
        api("temperature -1", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "temperature": -1, "messages": [{"role": "user", "content": "x"}]})), 422..=422),
        api("top_p 5", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "top_p": 5, "messages": [{"role": "user", "content": "x"}]})), 422..=422),
        api("five stops", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "stop": ["a","b","c","d","e"], "messages": [{"role": "user", "content": "x"}]})), 422..=422),
        api("a 100 KB stop", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "stop": "s".repeat(100_000), "messages": [{"role": "user", "content": "x"}]})), 422..=422),
        api("n = 50", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "n": 50, "messages": [{"role": "user", "content": "x"}]})), 422..=422),
        api("unknown model", Method::POST, "/v1/chat/completions", chat(json!({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]})), 404..=404),
        api("stream of the wrong type", Method::POST, "/v1/chat/completions", chat(json!({"model": "loraloop", "stream": "yes", "messages": [{"role": "user", "content": "x"}]})), c4.clone()),
        api("2 MB message", Method::POST, "/v1/chat/completions", chat(msg(json!("x".repeat(2_000_000)))), 413..=413),
        api("a prompt longer than the context", Method::POST, "/v1/chat/completions", chat(msg(json!("word ".repeat(50_000)))), 422..=422),
        // --- assistants and adapters ---
        api("assistant name traversal", Method::POST, "/api/v1/assistants", json(json!({"name": "../admin"})), 422..=422),
        api("assistant without a name", Method::POST, "/api/v1/assistants", json(json!({"name": ""})), 422..=422),
        api("assistant name of 10k chars", Method::POST, "/api/v1/assistants", json(json!({"name": "a".repeat(10_000)})), 422..=422),
        api("assistant route of no platform", Method::POST, "/api/v1/assistants", json(json!({"name": "x1", "routes": [{"platform": "irc", "scope": "chat", "key": "1"}]})), 422..=422),
        api("assistant temperature 1e6", Method::POST, "/api/v1/assistants", json(json!({"name": "x2", "generation": {"temperature": 1e6}})), 422..=422),
        api("delete the default assistant", Method::DELETE, "/api/v1/assistants/loraloop", Body::None, c4.clone()),
        api("update a missing assistant", Method::PATCH, "/api/v1/assistants/nobody", json(json!({"system_prompt": "x"})), 404..=405),
        api("activate a missing adapter", Method::POST, "/api/v1/adapters/777/activate", json(json!({})), 404..=404),
        api("activate adapter -1", Method::POST, "/api/v1/adapters/-1/activate", json(json!({})), 404..=404),
        api("activate adapter abc", Method::POST, "/api/v1/adapters/abc/activate", json(json!({})), c4.clone()),
        api("adapters for a missing assistant", Method::GET, "/api/v1/adapters?assistant=ghost", Body::None, 404..=404),
        // --- console ---
        Case { what: "login of 100 KB", method: Method::POST, path: "/login".into(), headers: vec![], body: Body::Form(format!("username=admin&password={}", "p".repeat(100_000))), expect: 413..=413 },
        Case { what: "wrong password", method: Method::POST, path: "/login".into(), headers: vec![], body: Body::Form("username=admin&password=guess".into()), expect: 401..=401 },
        Case { what: "a page without a session", method: Method::GET, path: "/datasets".into(), headers: vec![], body: Body::None, expect: 303..=401 },
        Case { what: "a form without a session", method: Method::POST, path: "/datasets/1/delete".into(), headers: vec![], body: Body::Form("confirm=on".into()), expect: 303..=401 },
        Case { what: "asset traversal", method: Method::GET, path: "/assets/..%2f..%2f..%2fetc%2fpasswd".into(), headers: vec![], body: Body::None, expect: 303..=404 },
        Case { what: "session cookie forged", method: Method::GET, path: "/".into(), headers: vec![("cookie", "loraloop_session=forged".into())], body: Body::None, expect: 303..=401 },
        // --- console with a session, without or with a bad CSRF token ---
        Case { what: "delete a dataset without CSRF", method: Method::POST, path: "/datasets/1/delete".into(), headers: vec![("x-session", String::new())], body: Body::Form("confirm=on".into()), expect: 403..=403 },
        Case { what: "a wrong CSRF token", method: Method::POST, path: "/adapters/rollback".into(), headers: vec![("x-session", String::new())], body: Body::Form("_csrf=forged".into()), expect: 403..=403 },
        Case { what: "adapter zip with a path out", method: Method::POST, path: format!("/adapters/upload?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"evil".to_vec(), None), ("file", zip_of(&[("../../escape.json", b"{}")]), Some("evil.zip"))]), expect: 422..=422 },
        Case { what: "adapter zip bomb", method: Method::POST, path: format!("/adapters/upload?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"bomb".to_vec(), None), ("file", zip_of(&[("adapter_model.safetensors", &vec![0u8; 200 * 1024 * 1024])]), Some("bomb.zip"))]), expect: 413..=422 },
        Case { what: "adapter that is not a zip", method: Method::POST, path: format!("/adapters/upload?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"nozip".to_vec(), None), ("file", b"MZ\x90\x00 not a zip".to_vec(), Some("x.zip"))]), expect: 422..=422 },
        Case { what: "adapter with NaN weights", method: Method::POST, path: format!("/adapters/upload?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"nan".to_vec(), None), ("file", nan_adapter_zip(), Some("nan.zip"))]), expect: 422..=422 },
        Case { what: "adapter name traversal", method: Method::POST, path: format!("/adapters/upload?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"../../x".to_vec(), None), ("file", nan_adapter_zip(), Some("x.zip"))]), expect: 422..=422 },
        Case { what: "console dataset import of garbage", method: Method::POST, path: format!("/datasets/import?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Multipart(vec![("name", b"junk".to_vec(), None), ("file", vec![0xffu8; 5000], Some("junk.jsonl"))]), expect: 422..=422 },
        Case { what: "playground: an empty message to a made-up adapter", method: Method::POST, path: format!("/playground/send?_csrf={csrf}"), headers: vec![("x-session", String::new())], body: Body::Form("message=&adapter=..%2F..%2Fetc".into()), expect: 400..=422 },
        // --- the webhook ---
        Case { what: "webhook without the secret", method: Method::POST, path: "/hooks/telegram".into(), headers: vec![], body: json(json!({"update_id": 1, "message": {"text": "hi"}})), expect: 401..=503 },
        Case { what: "webhook with a wrong secret", method: Method::POST, path: "/hooks/telegram".into(), headers: vec![("x-telegram-bot-api-secret-token", "guess".into())], body: json(json!({"update_id": 2})), expect: 401..=503 },
        Case { what: "webhook body of 5 MB", method: Method::POST, path: "/hooks/telegram".into(), headers: vec![], body: raw(jt, &vec![b'{'; 5_000_000]), expect: 401..=503 },
        Case { what: "webhook by GET", method: Method::GET, path: "/hooks/telegram".into(), headers: vec![], body: Body::None, expect: 405..=405 },
        // --- anything else ---
        Case { what: "an unknown route", method: Method::GET, path: "/wp-admin/setup.php".into(), headers: vec![], body: Body::None, expect: 303..=404 },
        api("a TRACE", Method::TRACE, "/v1/models", Body::None, 405..=405),
        api("a path of 10k chars", Method::GET, &format!("/api/v1/{}", "a/".repeat(5000)), Body::None, 404..=414),
    ];
    if webhook_secret_ok {
        // With the right secret, what is not an update is refused, and stores nothing.
        for (what, body) in [
            ("webhook: not an update", b"{\"hello\": 1}".to_vec()),
            ("webhook: not JSON", b"<xml/>".to_vec()),
            (
                "webhook: update id as text",
                b"{\"update_id\": \"one\"}".to_vec(),
            ),
        ] {
            v.push(Case {
                what,
                method: Method::POST,
                path: "/hooks/telegram".into(),
                headers: vec![("x-telegram-bot-api-secret-token", "SECRET".into())],
                body: Body::Raw(jt, body),
                expect: 400..=400,
            });
        }
    }
    v
}

/// A PEFT zip for the tiny model whose lora_B holds a NaN.
fn nan_adapter_zip() -> Vec<u8> {
    let config = br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none", "fan_in_fan_out": false}"#;
    // One layer's pair, q_proj 64 -> 64 for TinySpec's hidden size: A [4, 64], B [64, 4].
    let hidden = TinySpec::default().hidden;
    let mut tensors = Vec::new();
    let a = vec![0.01f32; 4 * hidden];
    let mut b = vec![0.01f32; hidden * 4];
    b[3] = f32::NAN;
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ab, bb) = (bytes(&a), bytes(&b));
    tensors.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        vec![4, hidden],
        ab,
    ));
    tensors.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        vec![hidden, 4],
        bb,
    ));
    // safetensors: 8-byte header length, JSON header, data.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut data = Vec::new();
    for (name, shape, raw) in &tensors {
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + raw.len()]}),
        );
        offset += raw.len();
        data.extend_from_slice(raw);
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut st = (h.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(&h);
    st.extend_from_slice(&data);
    zip_of(&[
        ("adapter_config.json", config),
        ("adapter_model.safetensors", &st),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_chat_model(&dir.path().join("models/tiny"), TinySpec::default()).unwrap();
    let (fake, tg_url) = fake_telegram::fake_telegram().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"));
    for (key, _) in std::env::vars() {
        if key.starts_with("LORALOOP_") || key.ends_with("_BOT_TOKEN") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .current_dir(dir.path())
        .args(["serve"])
        .env("LORALOOP_MODELS_DIR", dir.path().join("models"))
        .env("LORALOOP_MODEL", "tiny")
        .env("LORALOOP_SERVER__PORT", port.to_string())
        .env("LORALOOP_API_KEY", KEY)
        .env("LORALOOP_ADMIN_PASSWORD", PASSWORD)
        .env("LORALOOP_GENERATION__MAX_NEW_TOKENS", "8")
        .env("LORALOOP_ASSISTANT__ACTIVATION", "manual")
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("LORALOOP_TELEGRAM__API_URL", &tg_url)
        .env(
            "LORALOOP_TELEGRAM__WEBHOOK_URL",
            "https://bot.example.org/hooks/telegram",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A fresh connection per case: a refusal sent before the body was read closes
        // its connection, and a pooled one reused in that moment fails on the client.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve did not come up");
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secret = loop {
        if let Some(s) = fake.calls("setwebhook").first() {
            break s["secret_token"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Something to protect: a dataset, an assistant, a conversation.
    let line = r#"{"messages":[{"role":"user","content":"What is the capital of Zorblax?"},{"role":"assistant","content":"Blorp City."}]}"#;
    let r = http
        .post(format!("{base}/api/v1/datasets?name=zorblax"))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(format!("{line}\n{line}\n"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = http
        .post(format!("{base}/api/v1/assistants"))
        .bearer_auth(KEY)
        .json(&json!({"name": "support", "system_prompt": "Help."}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "loraloop", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A console session (its row is made before the dump).
    let console = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        // A fresh connection per case: a refusal sent before the body was read closes
        // its connection, and a pooled one reused in that moment fails on the client.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = console
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username=admin&password={PASSWORD}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let home = console
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = home
        .split(r#"<meta name="csrf-token" content=""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a CSRF token")
        .to_string();

    let db = dir.path().join("data/loraloop.db");
    // The audit log gains a line per failed login (which is the point of it); the rest
    // must not change at all.
    let before = dump(&db, &["audit_log"]).await;
    let audit_before: i64 = {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .unwrap();
        let n = sqlx::query_scalar("select count(*) from audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    };
    let rss_before = rss_kib(pid, "VmRSS:");

    let all = cases(&csrf, true);
    assert!(all.len() >= 60, "{} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        let client = if c.headers.iter().any(|(h, _)| *h == "x-session") {
            &console
        } else {
            &http
        };
        let mut req = client.request(c.method.clone(), format!("{base}{}", c.path));
        for (h, v) in &c.headers {
            match *h {
                "x-session" => {}
                "x-telegram-bot-api-secret-token" if v == "SECRET" => req = req.header(*h, &secret),
                _ => req = req.header(*h, v),
            }
        }
        req = match &c.body {
            Body::None => req,
            Body::Json(v) => req.json(v),
            Body::Raw(t, b) => req.header("content-type", *t).body(b.clone()),
            Body::Form(f) => req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(f.clone()),
            Body::Multipart(parts) => {
                let mut form = reqwest::multipart::Form::new();
                for (name, data, file) in parts {
                    let mut part = reqwest::multipart::Part::bytes(data.clone());
                    if let Some(f) = file {
                        part = part.file_name(*f);
                    }
                    form = form.part(*name, part);
                }
                req.multipart(form)
            }
        };
        let started = Instant::now();
        let outcome = req.send().await;
        let took = started.elapsed();
        match outcome {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                if !c.expect.contains(&status) {
                    failures.push(format!(
                        "{}: {status} (expected {:?}): {}",
                        c.what,
                        c.expect,
                        body.chars().take(200).collect::<String>()
                    ));
                } else if status >= 400 && status != 405 && body.trim().is_empty() && status != 401
                {
                    failures.push(format!("{}: {status} with no explanation", c.what));
                }
            }
            // A body cut off by a limit may end the connection before the answer is read.
            Err(e) if matches!(c.expect.end(), 413..) && e.is_request() => {}
            Err(e) => failures.push(format!("{}: no answer ({e})", c.what)),
        }
        assert!(took < Duration::from_secs(30), "{} took {took:?}", c.what);
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve died on {}",
            c.what
        );
    }
    // Raw HTTP the client library would not send.
    for (what, raw) in [
        (
            "a header line of 64 KB",
            format!(
                "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(65_536)
            ),
        ),
        ("a broken request line", "GET\r\n\r\n".to_string()),
        (
            "a negative content length",
            "POST /api/v1/fine-tune HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n".to_string(),
        ),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = s.write_all(raw.as_bytes()).await;
        let mut head = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut head)).await;
        let text = String::from_utf8_lossy(&head).to_string();
        let answered_4xx = matches!(read, Ok(Ok(n)) if n >= 10 && text.starts_with("HTTP/1.1 4"));
        let closed = matches!(read, Ok(Ok(0)));
        if !(answered_4xx || closed) {
            failures.push(format!("{what}: {text:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len() + 3,
        failures.join("\n")
    );

    // Still serving, memory bounded (the 300 MB zip bomb and the 5 MB bodies were not
    // held), the database as it was.
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let peak = rss_kib(pid, "VmHWM:");
    assert!(
        peak < 1024 * 1024,
        "peak memory {peak} KiB (was {rss_before} KiB before)"
    );
    let after = dump(&db, &["audit_log"]).await;
    if before != after {
        let diff: Vec<String> = after
            .lines()
            .filter(|l| !before.lines().any(|b| b == *l))
            .take(20)
            .map(str::to_string)
            .collect();
        panic!("the database changed; new rows:\n{}", diff.join("\n"));
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let added: Vec<String> = sqlx::query_scalar("select action from audit_log where id > ?")
        .bind(audit_before)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        added.iter().all(|a| a == "failed login"),
        "audit lines added: {added:?}"
    );
    pool.close().await;
    eprintln!(
        "{} hostile requests: all refused with a 4xx, memory {rss_before} KiB before, peak {peak} KiB, database unchanged",
        all.len() + 3
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}
