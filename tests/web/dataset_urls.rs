//! A job's `dataset_url` against the real server: local files only under the import
//! folder, http(s) to public addresses unless the config allows private ones, every
//! read bounded, no credentials stored or echoed, the database unchanged by a refusal.

use crate::support::{TestServer, start, zorblax_jsonl};
use serde_json::{Value, json};

/// A one-connection HTTP server on 127.0.0.1 that answers `response` to the first request.
async fn serve_once(response: Vec<u8>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await.unwrap();
        let _ = sock.write_all(&response).await;
    });
    addr
}

fn ok_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn datasets(s: &TestServer) -> Vec<(String, i64, String)> {
    let d = s.get_json("/api/v1/datasets").await;
    d["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["example_count"].as_i64().unwrap(),
                d["source"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn refused(s: &TestServer, url: &str) -> Value {
    let (status, resp) = s
        .post_json("/api/v1/fine-tune", &json!({"dataset_url": url}))
        .await;
    assert_eq!(status, 422, "{url} -> {resp}");
    assert_eq!(resp["error"]["param"], "dataset_url", "{url} -> {resp}");
    resp
}

#[tokio::test]
async fn local_files_are_read_only_under_the_import_folder() {
    let imports = tempfile::tempdir().unwrap();
    let dir = imports.path().to_str().unwrap().to_string();
    let s = start(false, &[("LORALOOP_IMPORTS__DIR", &dir)]).await;
    let file = imports.path().join("my-data.jsonl");
    std::fs::write(&file, zorblax_jsonl(3)).unwrap();
    let (got, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"dataset_url": file, "epochs": 1}),
        )
        .await;
    assert_eq!(got, 200, "{job}");
    // A relative name is read from the import folder.
    std::fs::write(imports.path().join("more.jsonl"), zorblax_jsonl(2)).unwrap();
    let (got, job) = s
        .post_json("/api/v1/fine-tune", &json!({"dataset_url": "more.jsonl"}))
        .await;
    assert_eq!(got, 200, "{job}");
    let before = datasets(&s).await;
    assert_eq!(
        before
            .iter()
            .map(|d| (d.0.as_str(), d.1))
            .collect::<Vec<_>>(),
        vec![("more", 2), ("my-data", 3)]
    );

    // Outside the folder, through `..`, through a link, a folder, a special file: one
    // answer whether the path exists or not, naming no size and no line.
    std::os::unix::fs::symlink("/etc/hostname", imports.path().join("link.jsonl")).unwrap();
    std::fs::create_dir(imports.path().join("sub.jsonl")).unwrap();
    let outside = s.dir.path().join("secret.jsonl");
    std::fs::write(&outside, zorblax_jsonl(1)).unwrap();
    let mut messages = Vec::new();
    for url in [
        "/etc/passwd".to_string(),
        "/nonexistent/data.jsonl".to_string(),
        "file:///etc/passwd".to_string(),
        "/proc/self/environ".to_string(),
        "../../../../etc/passwd".to_string(),
        outside.display().to_string(),
        "link.jsonl".to_string(),
        "sub.jsonl".to_string(),
        "gopher://example.org/x".to_string(),
    ] {
        let resp = refused(&s, &url).await;
        let m = resp["error"]["message"].as_str().unwrap().to_string();
        assert!(!m.contains("bytes") && !m.contains("line"), "{url}: {m}");
        assert!(!m.contains("No such file"), "{url}: {m}");
        messages.push(m);
    }
    // A file in the folder that is not JSONL: refused with its problems.
    std::fs::write(
        imports.path().join("notes.txt"),
        "just some text\nnot json\n",
    )
    .unwrap();
    let resp = refused(&s, "notes.txt").await;
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{resp}"
    );
    assert_eq!(datasets(&s).await, before, "refusals import nothing");
    s.stop().await;

    // Without an import folder no local path is read at all.
    let s = start(false, &[]).await;
    let file = s.dir.path().join("data.jsonl");
    std::fs::write(&file, zorblax_jsonl(3)).unwrap();
    let resp = refused(&s, file.to_str().unwrap()).await;
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("imports.dir"),
        "{resp}"
    );
    assert!(datasets(&s).await.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn downloads_reach_public_addresses_only_unless_allowed() {
    let s = start(false, &[]).await;
    let addr = serve_once(ok_response(&zorblax_jsonl(2))).await;
    for url in [
        format!("http://{addr}/data.jsonl"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]:9/x.jsonl".to_string(),
        "http://[::ffff:127.0.0.1]:9/x.jsonl".to_string(),
        "http://10.0.0.1:9/x.jsonl".to_string(),
        "http://0.0.0.0:9/x.jsonl".to_string(),
        format!("http://localhost:{}/data.jsonl", addr.port()),
        // A name the resolver answers with a loopback address.
        format!("http://localhost.:{}/data.jsonl", addr.port()),
        "ftp://example.org/x.jsonl".to_string(),
    ] {
        refused(&s, &url).await;
    }
    // Credentials and a signed query are used, never echoed.
    let resp = refused(
        &s,
        "https://me:hunter2@10.0.0.1/x.jsonl?X-Amz-Signature=abc123",
    )
    .await;
    let m = resp["error"]["message"].as_str().unwrap();
    assert!(
        !m.contains("hunter2") && !m.contains("abc123"),
        "credentials echoed: {m}"
    );
    assert!(datasets(&s).await.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn allowed_private_downloads_are_bounded_and_stored_without_credentials() {
    let s = start(
        false,
        &[
            ("LORALOOP_IMPORTS__ALLOW_PRIVATE_ADDRESSES", "true"),
            ("LORALOOP_SERVER__MAX_UPLOAD_MB", "1"),
        ],
    )
    .await;
    let addr = serve_once(ok_response(&zorblax_jsonl(5))).await;
    let (got, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"dataset_url": format!("http://me:hunter2@{addr}/remote.jsonl?sig=abc123"), "epochs": 1}),
        )
        .await;
    assert_eq!(got, 200, "{job}");
    let stored = datasets(&s).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "remote");
    assert_eq!(stored[0].1, 5);
    assert_eq!(stored[0].2, format!("http://{addr}/remote.jsonl"));
    let all = s.get_json("/api/v1/datasets").await.to_string() + &job.to_string();
    assert!(!all.contains("hunter2") && !all.contains("abc123"), "{all}");

    // Over the size limit: by the declared length, and by the bytes when none is declared.
    let declared = serve_once(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5000000\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    let (got, resp) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"dataset_url": format!("http://{declared}/big.jsonl")}),
        )
        .await;
    assert_eq!(got, 413, "{resp}");
    let mut endless = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    endless.extend(zorblax_jsonl(20_000).into_bytes());
    let streamed = serve_once(endless).await;
    let (got, resp) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"dataset_url": format!("http://{streamed}/big.jsonl")}),
        )
        .await;
    assert_eq!(got, 413, "{resp}");
    assert_eq!(datasets(&s).await.len(), 1);
    s.stop().await;
}
