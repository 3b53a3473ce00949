//! What a request may cost before anyone is known, against the real server: body
//! limits per kind of route, failed logins throttled per address.

use crate::support::{PASSWORD, start, zorblax_jsonl};
use serde_json::json;

fn form_login(s: &crate::support::TestServer, password: &str) -> reqwest::RequestBuilder {
    s.http
        .post(s.url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username=admin&password={password}"))
}

/// POST `body` as JSON to the chat endpoint: the status and the error's message.
async fn chat_body(s: &crate::support::TestServer, body: reqwest::Body) -> (u16, String) {
    let r = s
        .post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    (
        status,
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn failed_logins_make_an_address_wait_and_a_success_clears_them() {
    let s = start(false, &[]).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |pw: &str| {
        http.post(s.url("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("username=admin&password={pw}"))
            .send()
    };
    // Four failures, then the right password: in, and the count starts over.
    for _ in 0..4 {
        assert_eq!(login("guess").await.unwrap().status(), 401);
    }
    assert_eq!(login(PASSWORD).await.unwrap().status(), 303);
    for _ in 0..5 {
        assert_eq!(login("guess").await.unwrap().status(), 401);
    }
    // The sixth attempt waits, even with the right password, and is told for how long.
    let r = login(PASSWORD).await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 800 && retry <= 900, "{retry}");
    assert!(r.text().await.unwrap().contains("Too many failed logins"));
    s.stop().await;
}

#[tokio::test]
async fn each_route_reads_at_most_what_it_takes() {
    let s = start(false, &[]).await;
    // A login form of 100 KB: refused before the password is checked.
    let r = form_login(&s, &"x".repeat(100_000)).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // A 2 MB JSON body to a JSON route: refused, though uploads may be 100 MB.
    let huge = json!({"dataset_id": 1, "hyperparameters": {"pad": "x".repeat(2_000_000)}});
    let (status, body) = s.post_json("/api/v1/fine-tune", &huge).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    // Without a declared length (chunked), cut while reading.
    let chunks =
        futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    assert_eq!(
        chat_body(&s, reqwest::Body::wrap_stream(chunks)).await,
        (413, "the request body is over this endpoint's limit".into())
    );
    // A 2 MB dataset upload is still fine.
    let big = zorblax_jsonl(20_000);
    assert!(big.len() > 2_000_000);
    let id = s.upload_dataset("big", &big).await;
    assert!(id > 0);
    // So is a 2 MB fine-tuning file through OpenAI's /v1/files.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(big.into_bytes()).file_name("big.jsonl"),
        );
    let r = s.post("/v1/files").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    s.stop().await;
}

#[tokio::test]
async fn an_upload_without_a_declared_length_is_held_to_the_upload_limit_too() {
    // Seen against serve: a chunked multipart upload over the limit was a 400 "cannot read
    // the upload: failed to read stream"; a chunked JSON body's 413 carried axum's text.
    let s = start(false, &[("LORALOOP_SERVER__MAX_UPLOAD_MB", "1")]).await;
    let line = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n";
    let chunks = futures_util::stream::iter(
        (0..30).map(move |_| Ok::<_, std::io::Error>(line.repeat(1000).into_bytes())),
    );
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks))
                .file_name("big.jsonl"),
        );
    let r = s.post("/v1/files").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "the upload is over the limit of 1 MB (server.max_upload_mb)"
    );
    // A JSON request's limit is not the upload setting.
    assert_eq!(
        chat_body(&s, vec![b' '; 2 * 1024 * 1024].into()).await,
        (
            413,
            "the request body is over this endpoint's limit of 1 MB".into()
        )
    );
    s.stop().await;
}

#[tokio::test]
async fn a_full_engine_answers_503_at_once_and_takes_requests_again_when_it_has_room() {
    let s = crate::support::start_with_model(
        false,
        &[
            ("LORALOOP_ENGINE__MAX_QUEUED", "1"),
            ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "400"),
        ],
        crate::support::SLOW_MODEL,
    )
    .await;
    let body = json!({"model": "loraloop", "stream": true,
                      "messages": [{"role": "user", "content": "A long story, please."}]});
    // A streamed reply holds the engine's one place while its stream is open.
    let first = s
        .post("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut stream = first.bytes_stream();
    use futures_util::StreamExt;
    let chunk = stream.next().await.unwrap().unwrap();
    assert!(!chunk.is_empty());
    let started = std::time::Instant::now();
    let second = s
        .post("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "5");
    let err: serde_json::Value = second.json().await.unwrap();
    assert_eq!(err["error"]["code"], "overloaded", "{err}");
    assert_eq!(err["error"]["type"], "server_error", "{err}");
    // The first reply ends; its place is free again.
    drop(stream);
    let mut ok = false;
    for _ in 0..100 {
        let r = s
            .post("/v1/chat/completions")
            .json(&json!({"model": "loraloop", "max_tokens": 4,
                          "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "a place is free once the first reply is gone");
    s.stop().await;
}

/// A raw connection to the test server.
async fn connect(s: &crate::support::TestServer) -> tokio::net::TcpStream {
    connect_from(s, "127.0.0.1").await
}

/// A raw connection to the test server from the loopback address `from` (127.0.0.2 is as
/// good as 127.0.0.1 on Linux): another client, as the server counts them.
async fn connect_from(s: &crate::support::TestServer, from: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(s.server.addr.unwrap()).await.unwrap()
}

/// Whether the server closes `c` (reads end, or fail) within `secs`.
async fn closed_within(c: &mut tokio::net::TcpStream, secs: f64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs_f64(secs), read)
        .await
        .is_ok()
}

/// `GET /healthz` on a new connection: the status line, or None when the connection was
/// closed without one.
async fn health_on_new_connection(s: &crate::support::TestServer, from: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = connect_from(s, from).await;
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_string();
    text.lines()
        .next()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
}

#[tokio::test]
async fn connections_that_send_no_headers_in_time_are_closed_and_the_count_is_capped() {
    let s = start(
        false,
        &[
            ("LORALOOP_SERVER__HEADER_TIMEOUT_SECS", "2"),
            ("LORALOOP_SERVER__MAX_CONNECTIONS", "8"),
            ("LORALOOP_SERVER__MAX_CONNECTIONS_PER_ADDRESS", "4"),
        ],
    )
    .await;
    use tokio::io::AsyncWriteExt;
    // Silent, and headers sent a byte at a time: both closed after about two seconds.
    let mut silent = connect(&s).await;
    let mut slow = connect(&s).await;
    let trickle = async {
        for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: " {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        closed_within(&mut slow, 5.0).await
    };
    let (silent_closed, slow_closed) = tokio::join!(closed_within(&mut silent, 5.0), trickle);
    assert!(silent_closed, "a connection that sent nothing stayed open");
    assert!(
        slow_closed,
        "a connection trickling its headers stayed open"
    );
    // A kept-alive connection idle after its request is closed too.
    let mut kept = connect(&s).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut kept, 5.0).await,
        "an idle kept-alive connection stayed open"
    );

    // Four idle connections from one address are all it may hold: its fifth is closed
    // at once, and another address is still answered.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_from(&s, "127.0.0.2").await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut fifth = connect_from(&s, "127.0.0.2").await;
    assert!(
        closed_within(&mut fifth, 0.5).await,
        "a connection over server.max_connections_per_address stayed open"
    );
    assert_eq!(
        health_on_new_connection(&s, "127.0.0.1").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    // Eight fill the server: a ninth, from any address, is closed at once, and a request
    // is answered again once the idle ones are closed.
    for _ in 0..4 {
        idle.push(connect_from(&s, "127.0.0.3").await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut ninth = connect_from(&s, "127.0.0.4").await;
    assert!(
        closed_within(&mut ninth, 0.5).await,
        "a connection over server.max_connections stayed open"
    );
    for c in &mut idle {
        assert!(closed_within(c, 5.0).await);
    }
    assert_eq!(
        health_on_new_connection(&s, "127.0.0.4").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    s.stop().await;
}

#[tokio::test]
async fn a_stop_waits_for_a_streaming_reply_only_as_long_as_its_grace() {
    let s = crate::support::start_with_model(
        false,
        &[
            ("LORALOOP_SERVER__SHUTDOWN_GRACE_SECS", "0.5"),
            ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "1000"),
        ],
        crate::support::SLOW_MODEL,
    )
    .await;
    let reply = s
        .post("/v1/chat/completions")
        .json(
            &json!({"model": "loraloop", "stream": true, "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "A long story, please."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    use futures_util::StreamExt;
    let mut stream = reply.bytes_stream();
    assert!(!stream.next().await.unwrap().unwrap().is_empty());
    let reading = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            text.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&text).to_string()
    });
    let started = std::time::Instant::now();
    s.stop().await;
    let took = started.elapsed();
    let read = reading.await.unwrap();
    // The reply was cut at the grace, not waited for to its end.
    assert!(
        !read.contains("[DONE]"),
        "the reply ran to its end ({took:?}): the stop waited for it, or it was shorter than the grace"
    );
    // And it says so: a stream that just stopped would read as a whole reply to a client
    // that does not check for `[DONE]`.
    let last = read.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("data: {\"error\"") && last.contains("\"code\":\"server_stopping\""),
        "{read}"
    );
    assert!(
        took < std::time::Duration::from_secs(4),
        "stop took {took:?}"
    );
}
