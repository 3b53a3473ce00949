//! Classifier fine-tunes over the API: `POST /api/v1/fine-tune` with a tiny random BERT
//! folder in the models directory and a generated two-class file in `imports.dir` queues a
//! classifier job that the server's worker trains; its events carry the losses and each
//! epoch's held-out metrics; `POST /api/v1/predict` serves the best checkpoint. Names that
//! reach outside their folders, unknown settings and missing data are refused.

use crate::support::start;
use loraloop_model::testing::{REVIEW_WORDS, two_class_reviews, write_tiny_bert};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_classifier_job_from_the_api_trains_reports_metrics_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let imports = tmp.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    std::fs::write(imports.join("reviews.jsonl"), two_class_reviews(240, 1)).unwrap();
    let imports_env = imports.display().to_string();
    let s = start(true, &[("LORALOOP_IMPORTS__DIR", &imports_env)]).await;
    write_tiny_bert(
        &s.dir.path().join("models/tiny-bert"),
        &REVIEW_WORDS,
        32,
        2,
        7,
    )
    .unwrap();

    let r = s
        .post("/api/v1/fine-tune")
        .json(&json!({
            "model_id": "tiny-bert",
            "data_path": "reviews.jsonl",
            "epochs": 20,
            "hyperparameters": {"batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.1},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["object"], "classifier_job", "{job}");
    assert_eq!(job["task"], "text-classification");
    let id = job["id"].as_str().unwrap().to_string();

    let started = Instant::now();
    let job = loop {
        let j: Value = s.get_json(&format!("/api/v1/fine-tune/{id}")).await;
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap()) {
            break j;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "still {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        job["best_checkpoint"]
            .as_str()
            .unwrap()
            .contains("checkpoint-")
    );

    let same: Value = s.get_json(&format!("/api/v1/classifier-jobs/{id}")).await;
    assert_eq!(same, job);
    let events: Value = s.get_json(&format!("/api/v1/fine-tune/{id}/events")).await;
    let events = events["data"].as_array().unwrap();
    let of = |t: &str| events.iter().filter(|e| e["type"] == t).collect::<Vec<_>>();
    let steps = of("step");
    assert_eq!(steps.len() as i64, job["total_steps"].as_i64().unwrap());
    let first_loss = steps[0]["data"]["loss"].as_f64().unwrap();
    let last_loss = steps.last().unwrap()["data"]["loss"].as_f64().unwrap();
    assert!(
        last_loss < first_loss,
        "the loss falls: {first_loss} -> {last_loss}"
    );
    let evals = of("evaluated");
    assert_eq!(evals.len(), 20, "one held-out evaluation per epoch");
    let last = &evals.last().unwrap()["data"]["metrics"];
    assert!(last["accuracy"].as_f64().unwrap() >= 0.9, "{last}");
    assert_eq!(last["per_class"].as_array().unwrap().len(), 2);
    assert!(!of("best").is_empty());
    assert_eq!(of("state").last().unwrap()["data"]["state"], "succeeded");

    let r = s
        .post("/api/v1/predict")
        .json(&json!({"model": id, "inputs": ["the film was superb and lovely", "a dull and dreadful plot"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["data"][0]["label"], "positive", "{p}");
    assert_eq!(p["data"][1]["label"], "negative", "{p}");
    let total: f64 = p["data"][0]["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-4);
}

#[tokio::test]
async fn classifier_requests_that_reach_outside_their_folders_or_lack_data_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let imports = tmp.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    std::fs::write(imports.join("reviews.jsonl"), two_class_reviews(20, 1)).unwrap();
    std::fs::write(imports.join("chat.jsonl"), "{\"messages\": []}\n").unwrap();
    // A link in the folder to a file outside it stays outside.
    let outside = tmp.path().join("outside.jsonl");
    std::fs::write(&outside, two_class_reviews(20, 1)).unwrap();
    std::os::unix::fs::symlink(&outside, imports.join("link.jsonl")).unwrap();
    let imports_env = imports.display().to_string();
    let s = start(false, &[("LORALOOP_IMPORTS__DIR", &imports_env)]).await;
    write_tiny_bert(
        &s.dir.path().join("models/tiny-bert"),
        &REVIEW_WORDS,
        32,
        2,
        7,
    )
    .unwrap();
    let cases = [
        (
            json!({"model_id": "../models/tiny-bert", "data_path": "reviews.jsonl", "task": "text-classification"}),
            "model_id",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "../../etc/passwd"}),
            "data_path",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "/etc/passwd"}),
            "data_path",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "missing.jsonl"}),
            "data_path",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "link.jsonl"}),
            "data_path",
        ),
        (json!({"model_id": "tiny-bert"}), "data_path"),
        (
            json!({"model_id": "tiny-bert", "data_path": "chat.jsonl"}),
            "data_path",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl", "hyperparameters": {"rl": "dpo"}}),
            "hyperparameters.rl",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl", "hyperparameters": {"metric_for_best_model": "vibes"}}),
            "hyperparameters.metric_for_best_model",
        ),
        (
            json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl", "task": "image-classification"}),
            "task",
        ),
        (
            json!({"model_id": "tiny", "data_path": "reviews.jsonl"}),
            "data_path",
        ),
    ];
    for (body, param) in cases {
        let r = s
            .post("/api/v1/fine-tune")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let r = s
        .post("/api/v1/predict")
        .json(&json!({"model": "clsjob-99", "inputs": ["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let jobs: Value = s.get_json("/api/v1/classifier-jobs").await;
    assert_eq!(
        jobs["data"].as_array().unwrap().len(),
        0,
        "nothing was queued"
    );

    // The id POST /api/v1/fine-tune answers works on the same job endpoints (this server
    // has no worker, so the job stays queued until it is cancelled).
    let job: Value = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl"}),
        )
        .await
        .1;
    let id = job["id"].as_str().unwrap();
    let got: Value = s.get_json(&format!("/api/v1/fine-tune/{id}")).await;
    assert_eq!(got, job);
    let r = s
        .post(&format!("/api/v1/fine-tune/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let r = s
        .post(&format!("/api/v1/fine-tune/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        409,
        "a job that has ended is not cancelled twice"
    );
    let events: Value = s.get_json(&format!("/api/v1/fine-tune/{id}/events")).await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "state" && e["data"]["state"] == "cancelled"),
        "{events}"
    );
    // The classifier list pages as the other lists do: newest first, `after` a job number.
    for _ in 0..2 {
        let r = s
            .post("/api/v1/fine-tune")
            .json(&json!({"model_id": "tiny-bert", "data_path": "reviews.jsonl"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let first: Value = s.get_json("/api/v1/classifier-jobs?limit=2").await;
    assert_eq!(ids(&first), ["clsjob-3", "clsjob-2"], "{first}");
    assert_eq!(first["has_more"], true, "{first}");
    let rest: Value = s.get_json("/api/v1/classifier-jobs?limit=2&after=2").await;
    assert_eq!(ids(&rest), [id], "{rest}");
    assert_eq!(rest["has_more"], false, "{rest}");
    let r = s
        .get("/api/v1/classifier-jobs?limit=0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    for missing in ["clsjob-99", "clsjob-x", "x"] {
        let r = s
            .get(&format!("/api/v1/fine-tune/{missing}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{missing}");
    }
}

#[tokio::test]
async fn the_console_starts_a_classifier_fine_tune_and_shows_its_loss_chart_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let imports = tmp.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    std::fs::write(imports.join("reviews.jsonl"), two_class_reviews(120, 3)).unwrap();
    let imports_env = imports.display().to_string();
    let s = start(true, &[("LORALOOP_IMPORTS__DIR", &imports_env)]).await;
    write_tiny_bert(
        &s.dir.path().join("models/tiny-bert"),
        &REVIEW_WORDS,
        32,
        2,
        7,
    )
    .unwrap();
    let (client, csrf) = s.console_login().await;

    let page = client
        .get(s.url("/classifiers"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<option value="tiny-bert""#),
        "the encoder folder is offered: {page}"
    );
    // A bad field comes back on the form with the reason, nothing queued.
    let bad = client
        .post(s.url("/classifiers"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "_csrf={csrf}&model_id=tiny-bert&data_path=missing.jsonl&method=full&epochs=3"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert!(
        bad.text()
            .await
            .unwrap()
            .contains("missing.jsonl is not in imports.dir")
    );

    let r = client
        .post(s.url("/classifiers"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "_csrf={csrf}&model_id=tiny-bert&data_path=reviews.jsonl&method=full&epochs=3&batch_size=16&learning_rate=0.002&metric_for_best_model=macro_f1&image_size=224"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, "/classifiers/1");
    let started = Instant::now();
    let page = loop {
        let page = client
            .get(s.url(&location))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if page.contains(r#"data-status="succeeded""#) {
            break page;
        }
        assert!(!page.contains(r#"data-status="failed""#), "{page}");
        assert!(started.elapsed() < Duration::from_secs(300), "{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The chart has a point per step (120 examples, 12 held out: 108 / 16 -> 7 a epoch).
    assert!(
        page.contains(r#"id="classifier-loss-chart" data-points="21""#),
        "{page}"
    );
    assert_eq!(
        page.matches("<circle").count(),
        3,
        "one held-out loss per epoch"
    );
    assert_eq!(page.matches("data-epoch=").count(), 3);
    assert!(page.contains("(best)"));
    assert!(page.contains(r#"id="classifier-confusion""#));
    let list = client
        .get(s.url("/classifiers"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        list.contains(r#"<a href="/classifiers/1">clsjob-1</a>"#),
        "{list}"
    );
}
