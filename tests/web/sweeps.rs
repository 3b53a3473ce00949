//! A sweep through the API: two trials as ordinary jobs, trained by the worker, ranked by
//! their report cards when the last ends, the best put through the activation policy.

use crate::support::{start, zorblax_jsonl};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn a_sweep_runs_its_trials_ranks_them_and_decides_the_best() {
    let s = start(true, &[]).await;
    s.upload_dataset("zorblax", &zorblax_jsonl(16)).await;
    let spec = json!({
        "dataset": "zorblax",
        "hyperparameters": {"batch_size": 4, "lora_r": 4, "sequence_len": 64, "seed": 1, "val_set_size": 0.25},
        "parameters": {"learning_rate": [0.02, 0.0001], "epochs": [2]},
        "activate_best": true,
    });
    let (status, sweep) = s.post_json("/api/v1/sweeps", &spec).await;
    assert_eq!(status, 200, "{sweep}");
    assert_eq!(sweep["trials"].as_array().unwrap().len(), 2);
    assert_eq!(sweep["status"], "running");
    let id = sweep["id"].as_i64().unwrap();
    let mut done = Value::Null;
    for _ in 0..1200 {
        done = s.get_json(&format!("/api/v1/sweeps/{id}")).await;
        if done["status"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "finished", "{done}");
    let trials = done["trials"].as_array().unwrap();
    assert!(trials.iter().all(|t| t["status"] == "succeeded"), "{done}");
    let by_rank = |r: i64| trials.iter().find(|t| t["rank"] == r).unwrap();
    let (first, second) = (by_rank(1), by_rank(2));
    assert_eq!(done["best_job_id"], first["job_id"]);
    assert_eq!(done["best_adapter"], first["adapter"]);
    // The ranking follows the cards: passing first, then the lower held-out loss.
    let pass = |t: &Value| t["standing"]["passes"].as_bool().unwrap();
    let loss = |t: &Value| t["standing"]["heldout_loss"].as_f64().unwrap();
    assert!(pass(first) >= pass(second), "{done}");
    if pass(first) == pass(second) {
        assert!(loss(first) <= loss(second), "{done}");
    }
    // No trial was decided alone; the sweep decided the best (activation is manual here).
    for t in trials {
        let events = s
            .get_json(&format!(
                "/api/v1/fine-tune/{}/events?limit=1000",
                t["job_id"]
            ))
            .await
            .to_string();
        assert!(
            events.contains(&format!("is a trial of sweep {id}")),
            "{events}"
        );
    }
    let decision = done["decision"].as_str().unwrap();
    assert!(
        decision.starts_with(&format!("best of 2 trials: job {}", first["job_id"])),
        "{decision}"
    );
    assert!(decision.contains("activation is manual"), "{decision}");

    // Refused before anything is created: a grid past the limit, an unknown dataset.
    let many: Vec<i64> = (1..=9).collect();
    let (status, body) = s
        .post_json(
            "/api/v1/sweeps",
            &json!({"dataset": "zorblax", "parameters": {"lora_r": many, "seed": many}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = s
        .post_json(
            "/api/v1/sweeps",
            &json!({"dataset": "nope", "parameters": {"lora_r": [4]}}),
        )
        .await;
    assert_eq!(status, 404);
    let list = s.get_json("/api/v1/sweeps").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    s.stop().await;
}

/// `loraloop sweep --config` against the server: it starts the sweep, follows it and
/// prints the ranked table; a bad sweep is refused with the server's reason.
#[tokio::test]
async fn the_sweep_command_runs_a_sweep_on_the_server_and_prints_the_ranking() {
    let s = start(true, &[]).await;
    s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = "dataset: zorblax\nsearch: random\ntrials: 2\nseed: 3\nhyperparameters: {batch_size: 4, sequence_len: 64, epochs: 1}\nparameters:\n  lora_r: [2, 4, 8]\n";
    // `epochs` is not a hyperparameter name (it is a parameter or the job's field): refused.
    std::fs::write(dir.path().join("bad.yaml"), yaml).unwrap();
    std::fs::write(
        dir.path().join("sweep.yaml"),
        yaml.replace(", epochs: 1", ", num_epochs: 1"),
    )
    .unwrap();
    let base = s.base.clone();
    let run = move |file: &'static str| {
        let (base, dir) = (base.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"))
                .current_dir(&dir)
                .env("LORALOOP_API_KEY", crate::support::KEY)
                .args(["sweep", "--config", file, "--server", &base])
                .output()
                .unwrap()
        })
    };
    let bad = run("bad.yaml").await.unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(r#"unknown hyperparameter "epochs""#), "{err}");
    let out = run("sweep.yaml").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("| rank | job | settings |"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(stdout.contains("best of 2 trials"), "{stdout}");
    s.stop().await;
}

/// The console's Sweeps page starts a sweep from its YAML and shows its trials; a sweep
/// that does not parse is shown again with the reason and nothing is created.
#[tokio::test]
async fn the_console_starts_a_sweep_from_yaml_and_lists_its_trials() {
    let s = start(false, &[]).await;
    s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let home = http
        .post(s.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", crate::support::PASSWORD),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = home
        .split(r#"<meta name="csrf-token" content=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the dashboard carries the CSRF token")
        .to_string();
    let post = |yaml: &str| {
        http.post(s.url("/sweeps"))
            .form(&[("_csrf", csrf.as_str()), ("yaml", yaml)])
            .send()
    };
    let bad = post("dataset: zorblax\nparameters: {lora_r: []}\n")
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let page = bad.text().await.unwrap();
    assert!(page.contains("parameters.lora_r has no values"), "{page}");
    assert!(page.contains("lora_r: []"), "the YAML is kept: {page}");
    assert!(!page.contains(r#"id="sweep-list""#), "nothing was created");

    let r = post("dataset: zorblax\nparameters:\n  lora_r: [2, 4]\n")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.url().path().starts_with("/sweeps/"), "{}", r.url());
    let page = r.text().await.unwrap();
    assert_eq!(page.matches("<tr data-job=").count(), 2, "{page}");
    assert!(page.contains(r#"data-status="running""#), "{page}");
    let list = http
        .get(s.url("/sweeps"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains("sweep on zorblax v1"), "{list}");
    s.stop().await;
}

/// A sweep whose trials all end without a worker running them (cancelled while queued)
/// is still closed: an idle worker (`loraloop worker` on the same database) ranks it.
#[tokio::test]
async fn an_idle_worker_closes_a_sweep_whose_trials_were_all_cancelled() {
    let s = start(false, &[]).await;
    s.upload_dataset("zorblax", &zorblax_jsonl(8)).await;
    let (status, sweep) = s
        .post_json(
            "/api/v1/sweeps",
            &json!({"dataset": "zorblax", "parameters": {"lora_r": [2, 4]}}),
        )
        .await;
    assert_eq!(status, 200, "{sweep}");
    let id = sweep["id"].as_i64().unwrap();
    for t in sweep["trials"].as_array().unwrap() {
        let (status, job) = s
            .post_json(
                &format!("/api/v1/fine-tune/{}/cancel", t["job_id"]),
                &json!({}),
            )
            .await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["status"], "cancelled");
    }
    assert_eq!(
        s.get_json(&format!("/api/v1/sweeps/{id}")).await["status"],
        "running"
    );
    let dir = s.dir.path();
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_loraloop"))
        .current_dir(dir)
        .env("LORALOOP_DATA_DIR", dir.join("data"))
        .env("LORALOOP_MODELS_DIR", dir.join("models"))
        .env("LORALOOP_MODEL", "tiny")
        .args(["worker", "--poll-secs", "0.1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut done = Value::Null;
    for _ in 0..300 {
        done = s.get_json(&format!("/api/v1/sweeps/{id}")).await;
        if done["status"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(
        done["decision"],
        "no trial made an adapter with a report card"
    );
    s.stop().await;
}
