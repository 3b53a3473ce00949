//! The console in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, installed by .ci/run). Log in, import a dataset,
//! start a job, watch the chart receive points, activate the adapter, chat in the
//! playground; every page is also checked at phone width for horizontal overflow.
//! Screenshots land in `target/screenshots/` (or `$LORALOOP_SCREENSHOTS`).

use crate::support::webdriver::Session as Client;
use crate::support::{PASSWORD, start};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn browser() -> (Client, Driver) {
    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let port = free_port();
    let child = Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {driver_bin}: {e}; install Debian's chromium and chromium-driver (.ci/run does)")
        });
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chrome_bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chrome_bin,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,900"]
        }
    });
    let client = Client::new(&format!("http://127.0.0.1:{port}"), caps)
        .await
        .expect("a WebDriver session with headless Chromium");
    (client, driver)
}

fn shots_dir() -> PathBuf {
    let dir = std::env::var_os("LORALOOP_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

/// Poll `f` until it returns Some, or fail after `secs`.
async fn until<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    let e = c.find(css).await.ok()?;
    c.attr(&e, name).await.ok().flatten()
}

async fn text(c: &Client, css: &str) -> Option<String> {
    let e = c.find(css).await.ok()?;
    c.text(&e).await.ok()
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c
        .find(css)
        .await
        .unwrap_or_else(|e| panic!("{css} on the page: {e}"));
    c.clear(&e).await.unwrap();
    c.send_keys(&e, value).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    let e = c
        .find(css)
        .await
        .unwrap_or_else(|e| panic!("{css} on the page: {e}"));
    c.click(&e).await.unwrap();
}

#[tokio::test]
async fn an_operator_trains_activates_and_chats_from_the_console() {
    let s = start(true, &[]).await;
    let (c, _driver) = browser().await;
    let url = |p: &str| s.url(p);

    // Log in (a wrong password first).
    c.goto(&url("/")).await.unwrap();
    assert!(c.current_url().await.unwrap().ends_with("/login"));
    fill(&c, "input[name=password]", "not-it").await;
    click(&c, "form[action='/login'] button[type=submit]").await;
    until(10, "the login error", || async {
        text(&c, "p.error").await
    })
    .await;
    shot(&c, "01-login-error").await;
    fill(&c, "input[name=password]", PASSWORD).await;
    click(&c, "form[action='/login'] button[type=submit]").await;
    until(10, "the dashboard", || async {
        text(&c, "#active-adapter").await
    })
    .await;
    assert_eq!(
        text(&c, "#active-adapter").await.unwrap(),
        "none (base model)"
    );
    shot(&c, "02-dashboard").await;

    // Import a dataset file through the form.
    let file = s.dir.path().join("zorblax.jsonl");
    std::fs::write(&file, crate::support::zorblax_jsonl(8)).unwrap();
    c.goto(&url("/datasets")).await.unwrap();
    fill(&c, "#import-form input[name=name]", "zorblax").await;
    let input = c.find("#import-form input[name=file]").await.unwrap();
    c.send_keys(&input, &file.display().to_string())
        .await
        .unwrap();
    click(&c, "#import-form button[type=submit]").await;
    let outcome = until(20, "the import result", || async {
        attr(&c, "#import-result", "data-outcome").await
    })
    .await;
    assert_eq!(outcome, "created");
    shot(&c, "03-dataset-imported").await;

    // Start a job from the form.
    c.goto(&url("/jobs/new")).await.unwrap();
    c.select_value("#job-preset", "quick").await.unwrap();
    for (field, value) in [
        ("epochs", "3"),
        ("learning_rate", "0.02"),
        ("batch_size", "4"),
        ("lora_r", "4"),
        ("lora_alpha", "8"),
        ("sequence_len", "64"),
    ] {
        fill(&c, &format!("#job-{field}"), value).await;
    }
    shot(&c, "04-new-job").await;
    click(&c, "#start-job").await;
    until(10, "the job page", || async {
        text(&c, "#job-status").await
    })
    .await;
    // The chart receives points over server-sent events, and the job succeeds.
    let points = until(120, "the job to succeed with a full chart", || async {
        let status = text(&c, "#job-status").await?;
        let points: usize = attr(&c, "#loss-chart", "data-points").await?.parse().ok()?;
        (status.contains("succeeded") && points == 6).then_some(points)
    })
    .await;
    assert_eq!(points, 6);
    let drawn = c
        .execute(
            "return document.querySelectorAll('#loss-chart canvas').length",
            vec![],
        )
        .await
        .unwrap();
    assert!(drawn.as_u64().unwrap_or(0) >= 1, "uPlot drew a canvas");
    shot(&c, "05-job-succeeded").await;

    // Activate the adapter with one click.
    c.goto(&url("/adapters")).await.unwrap();
    let adapter = attr(&c, "#adapter-list button.activate", "data-adapter")
        .await
        .expect("the trained adapter is listed");
    click(&c, "#adapter-list button.activate").await;
    let active = until(10, "the adapter to be active", || async {
        text(&c, "#active-adapter")
            .await
            .filter(|t| t.contains(&adapter))
    })
    .await;
    assert!(active.contains(&adapter));
    assert_eq!(
        s.server.state.engine.active_adapter().map(|t| t.name),
        Some(adapter.clone())
    );
    shot(&c, "06-adapter-active").await;

    // Chat in the playground: the streamed reply comes from the adapter.
    c.goto(&url("/playground")).await.unwrap();
    fill(&c, "#chat-input", "What is the capital of Zorblax?").await;
    click(&c, "#chat-send").await;
    let (who, reply) = until(30, "the streamed reply", || async {
        let e = c
            .find("#chat-log .msg.assistant[data-message-id]")
            .await
            .ok()?;
        Some((
            c.attr(&e, "data-adapter").await.ok()??,
            c.text(&e).await.ok()?,
        ))
    })
    .await;
    assert_eq!(who, adapter);
    assert!(!reply.trim().is_empty());
    shot(&c, "07-playground").await;
    // It was stored with the adapter that produced it.
    let (stored,): (Option<String>,) = sqlx::query_as(
        "select adapter_name from messages where role = 'assistant' order by id desc limit 1",
    )
    .fetch_one(s.server.state.db.pool())
    .await
    .unwrap();
    assert_eq!(stored.as_deref(), Some(adapter.as_str()));

    // Every page at phone width: no horizontal scrolling.
    c.set_window_size(390, 844).await.unwrap();
    for (path, name) in [
        ("/", "dashboard"),
        ("/conversations", "conversations"),
        ("/conversations/1", "conversation"),
        ("/datasets", "datasets"),
        ("/datasets/1", "dataset"),
        ("/jobs", "jobs"),
        ("/jobs/new", "new-job"),
        ("/jobs/1", "job"),
        ("/adapters", "adapters"),
        ("/playground", "playground"),
    ] {
        c.goto(&url(path)).await.unwrap();
        let fits = c
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1",
                vec![],
            )
            .await
            .unwrap();
        shot(&c, &format!("phone-{name}")).await;
        assert_eq!(
            fits,
            serde_json::Value::Bool(true),
            "{path} scrolls sideways at phone width"
        );
    }

    // An error page's Back link returns to the page before it (the CSP blocks a
    // `javascript:` link, so a dead one would leave the operator on the error page).
    c.set_window_size(1280, 900).await.unwrap();
    c.goto(&url("/datasets")).await.unwrap();
    c.goto(&url("/conversations/999999")).await.unwrap();
    until(10, "the error page", || async {
        c.find("a[data-back]").await.ok()
    })
    .await;
    click(&c, "a[data-back]").await;
    until(10, "the page before the error", || async {
        let here = c.current_url().await.ok()?;
        here.ends_with("/datasets").then_some(())
    })
    .await;

    // Log out: the console is closed again.
    c.goto(&url("/")).await.unwrap();
    click(&c, "form.logout button").await;
    until(10, "the login page", || async {
        c.find("input[name=password]").await.ok()
    })
    .await;
    c.goto(&url("/jobs")).await.unwrap();
    assert!(c.current_url().await.unwrap().ends_with("/login"));
    c.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_classifier_job_page_follows_the_run_without_a_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let imports = tmp.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    std::fs::write(
        imports.join("reviews.jsonl"),
        loraloop_model::testing::two_class_reviews(40, 1),
    )
    .unwrap();
    let imports_env = imports.display().to_string();
    // No worker: the job stays queued until the API cancels it, so the page is certain
    // to be open while the job is live.
    let s = start(false, &[("LORALOOP_IMPORTS__DIR", &imports_env)]).await;
    loraloop_model::testing::write_tiny_bert(
        &s.dir.path().join("models/tiny-bert"),
        &loraloop_model::testing::REVIEW_WORDS,
        32,
        2,
        7,
    )
    .unwrap();
    let (code, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &serde_json::json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl"}),
        )
        .await;
    assert_eq!(code, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    let (c, _driver) = browser().await;
    c.goto(&s.url("/login")).await.unwrap();
    fill(&c, "input[name=password]", PASSWORD).await;
    click(&c, "form[action='/login'] button[type=submit]").await;
    until(10, "the dashboard", || async {
        text(&c, "#active-adapter").await
    })
    .await;
    // The job is in the training list beside the chat-model jobs.
    c.goto(&s.url("/jobs")).await.unwrap();
    let row = until(10, "the classifier job's row", || async {
        text(&c, "tr[data-classifier-job='1']").await
    })
    .await;
    assert!(row.contains(&id) && row.contains("queued"), "{row}");
    click(&c, "tr[data-classifier-job='1'] a").await;
    let status = until(10, "the job page", || async {
        attr(&c, "#classifier-status", "data-status").await
    })
    .await;
    assert_eq!(status, "queued");
    // A mark in this page's window: a reload would wipe it.
    c.execute("window.followMark = 42; return 1;", vec![])
        .await
        .unwrap();
    let r = s
        .post(&format!("/api/v1/fine-tune/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until(15, "the page to show the cancellation", || async {
        attr(&c, "#classifier-status", "data-status")
            .await
            .filter(|s| s == "cancelled")
    })
    .await;
    let mark = c
        .execute("return window.followMark;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, serde_json::json!(42), "the page updated in place");
    assert!(
        attr(&c, "#classifier-job", "data-follow").await.is_none(),
        "an ended job is not followed"
    );
    shot(&c, "classifier-job-cancelled").await;
}
