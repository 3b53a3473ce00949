//! Feedback to data everywhere: users rate replies with the fake Telegram's buttons, an
//! operator corrects one, and `POST /api/v1/datasets/build` and `loraloop data build` turn
//! them into SFT, DPO and KTO rows with the same filters.

use crate::support::fake_telegram::{TOKEN, fake_telegram, rated_replies};
use crate::support::until;
use serde_json::{Value, json};

#[tokio::test]
async fn rated_telegram_replies_become_sft_dpo_and_kto_rows_by_api_and_cli() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(
        true,
        &[
            ("TELEGRAM_BOT_TOKEN", TOKEN),
            ("LORALOOP_TELEGRAM__API_URL", url.as_str()),
        ],
    )
    .await;
    // The random tiny model's replies are blank (nothing to train on): an adapter taught
    // one answer gives the users words.
    let ds = s
        .upload_dataset("zorblax", &crate::support::zorblax_jsonl(16))
        .await;
    let (_, adapter, _) = crate::support::train_adapter(&s, ds, 1).await;
    let (status, _) = s
        .post_json(&format!("/api/v1/adapters/{adapter}/activate"), &json!({}))
        .await;
    assert_eq!(status, 200);
    // Three users ask; 5001 rates 👍, 5002 rates 👎, 5003 does not rate.
    for u in [5001, 5002, 5003] {
        fake.text(u, &format!("What is the capital of Zorblax? ({u})"));
    }
    until(30, "three replies", || {
        [5001, 5002, 5003]
            .iter()
            .all(|&u| rated_replies(&fake, u) == 1)
    })
    .await;
    let db = s.server.state.db.clone();
    let reply_of = |user: i64| {
        let db = db.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let row: Option<(i64, String)> = sqlx::query_as(
                    "select m.id, m.content from messages m join conversations c on c.id = m.conversation_id
                     join chats ch on ch.id = c.chat_id where ch.platform_chat_id = ? and m.role = 'assistant'",
                )
                .bind(user.to_string())
                .fetch_optional(db.pool())
                .await
                .unwrap();
                if let Some(r) = row {
                    return r;
                }
                assert!(std::time::Instant::now() < deadline, "no stored reply");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let (r1, text1) = reply_of(5001).await;
    let (r2, text2) = reply_of(5002).await;
    assert!(
        !text1.trim().is_empty() && !text2.trim().is_empty(),
        "{text1:?} {text2:?}"
    );
    for (user, id, rating) in [(5001, r1, 1), (5002, r2, -1)] {
        fake.press(
            &format!("cq{user}"),
            user,
            user,
            &format!("rate:{id}:{rating}"),
        );
    }
    until(10, "two toasts", || {
        fake.calls("answercallbackquery").len() == 2
    })
    .await;
    // The operator corrects the 👎 reply.
    db.set_operator_correction(r2, Some("A better answer."))
        .await
        .unwrap();

    let build = |body: Value| {
        let s = &s;
        async move { s.post_json("/api/v1/datasets/build", &body).await }
    };
    // KTO: the 👍 reply desirable; the 👎 one undesirable and its correction desirable.
    let (status, kto) = build(json!({"kind": "kto", "platform": "telegram"})).await;
    assert_eq!(status, 200, "{kto}");
    let mut got: Vec<(String, bool, String)> = kto["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["completion"][0]["content"].as_str().unwrap().to_string(),
                r["label"].as_bool().unwrap(),
                r["prompt"].as_array().unwrap().last().unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (
            text1.clone(),
            true,
            "What is the capital of Zorblax? (5001)".to_string(),
        ),
        (
            text2.clone(),
            false,
            "What is the capital of Zorblax? (5002)".to_string(),
        ),
        (
            "A better answer.".to_string(),
            true,
            "What is the capital of Zorblax? (5002)".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(got, want, "{kto}");
    // DPO: the correction over the original.
    let (status, dpo) = build(json!({"kind": "dpo"})).await;
    assert_eq!(status, 200, "{dpo}");
    assert_eq!(dpo["rows"], 1);
    assert_eq!(
        dpo["data"][0]["preferred_output"][0]["content"],
        "A better answer."
    );
    assert_eq!(dpo["data"][0]["non_preferred_output"][0]["content"], text2);
    // SFT from the 👍-rated conversations only, stored as a dataset.
    let (status, sft) = build(json!({"name": "liked", "rating": "up", "only_upvoted": true})).await;
    assert_eq!(status, 200, "{sft}");
    assert_eq!(
        (sft["rows"].as_i64(), sft["created"].as_bool()),
        (Some(1), Some(true)),
        "{sft}"
    );
    assert_eq!(sft["dataset"]["name"], "liked");
    // Bad input names what is wrong; nothing matching is an error, not an empty dataset.
    for (body, field) in [
        (json!({"kind": "ppo"}), "body"),
        (json!({"adapter": "nope"}), "adapter"),
        (json!({"rating": "meh"}), "rating"),
        (json!({"from": "2026-02-01", "to": "2026-01-01"}), "from"),
        (json!({"platform": "discord"}), "filters"),
        (json!({"colour": "red"}), "body"),
    ] {
        let (status, e) = build(body.clone()).await;
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["param"], field, "{body}: {e}");
    }

    // Stored with a name, preference rows are a dataset a job trains by its kind: the API
    // job on the KTO rows trains KTO with no method given, and the DPO pair trains DPO.
    let (status, stored) =
        build(json!({"kind": "kto", "name": "rated", "platform": "telegram"})).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(
        (stored["dataset"]["kind"].as_str(), stored["rows"].as_i64()),
        (Some("kto"), Some(3)),
        "{stored}"
    );
    let kto_id = stored["dataset"]["id"].as_i64().unwrap();
    // Each row remembers its conversation (5001's and 5002's).
    assert_eq!(db.dataset_conversations(kto_id).await.unwrap().len(), 2);
    let (status, stored) = build(json!({"kind": "dpo", "name": "corrected"})).await;
    assert_eq!(status, 200, "{stored}");
    let dpo_id = stored["dataset"]["id"].as_i64().unwrap();
    let hp = json!({"learning_rate": 0.01, "batch_size": 4, "lora_r": 4, "rl_beta": 0.5});
    // Asking for another objective than the dataset holds names the dataset.
    let (status, e) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({"dataset_id": kto_id, "method": "dpo", "hyperparameters": hp}),
        )
        .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (422, Some("dataset_id")),
        "{e}"
    );
    for (dataset, method, rl) in [(kto_id, None, "kto"), (dpo_id, Some("dpo"), "dpo")] {
        let mut body = json!({"dataset_id": dataset, "epochs": 8, "hyperparameters": hp});
        if let Some(m) = method {
            body["method"] = json!(m);
        }
        let (status, job) = s.post_json("/api/v1/fine-tune", &body).await;
        assert_eq!(status, 200, "{job}");
        assert_eq!(job["hyperparameters"]["rl"], rl, "{job}");
        let done = s.wait_job(job["id"].as_i64().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(done["report_card"]["retention"].is_object(), "{done}");
        // The card's rated replies are 👍 replies the job did not train on: 5001's is in
        // the KTO rows, not in the DPO pair.
        let rated = &done["report_card"]["rated"];
        match rl {
            "kto" => assert!(rated.is_null(), "{done}"),
            _ => assert_eq!(rated["examples"], 1, "{done}"),
        }
        let events = s
            .get_json(&format!("/api/v1/fine-tune/{}/events", job["id"]))
            .await;
        let text = events.to_string();
        assert!(
            text.contains(&format!("{rl}: training on")),
            "{rl} trained: {text}"
        );
    }

    // The CLI on the same database writes the same KTO rows, and the DPO pair.
    let cli = || {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("loraloop"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LORALOOP_DATA_DIR", s.dir.path().join("data"))
            .env("LORALOOP_MODELS_DIR", s.dir.path().join("models"))
            .env("LORALOOP_MODEL", "tiny")
            // A share of the retention probe keeps the debug-build card quick.
            .env("LORALOOP_GATE__RETENTION_PROMPTS", "16")
            .current_dir(s.dir.path());
        cmd
    };
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = s.dir.path().join("kto.jsonl");
    run(cli()
        .args([
            "data",
            "build",
            "--kind",
            "kto",
            "--platform",
            "telegram",
            "--output",
        ])
        .arg(&out));
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, kto["data"].as_array().unwrap().clone());
    let dpo_file = s.dir.path().join("dpo.jsonl");
    run(cli()
        .args(["data", "build", "--kind", "dpo", "-o"])
        .arg(&dpo_file));

    // Both train a LoRA adapter from those rows, and the report card follows. The loss
    // falls: the run learned the preferences (at this learning rate on the tiny model).
    for (rl, file) in [("kto", &out), ("dpo", &dpo_file)] {
        let printed = run(cli()
            .args([
                "fine-tune",
                "--rl",
                rl,
                "--rl-beta",
                "0.5",
                "--epochs",
                "8",
                "--learning-rate",
                "0.01",
                "--batch-size",
                "4",
                "--lora-r",
                "4",
                "--model",
            ])
            .arg(s.dir.path().join("models/tiny"))
            .arg("--data-path")
            .arg(file)
            .arg("--output-dir")
            .arg(s.dir.path().join(rl)));
        assert!(printed.contains("report card"), "{printed}");
        let dir = s.dir.path().join(rl);
        assert!(dir.join("adapter_model.safetensors").is_file());
        let card: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report_card.json")).unwrap())
                .unwrap();
        assert_eq!(card["retention"]["prompts"], 16, "{card}");
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
                .unwrap();
        let losses: Vec<f64> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["loss"].as_f64().unwrap())
            .collect();
        assert!(losses.len() >= 2, "{state}");
        assert!(
            losses.last().unwrap() < &(losses[0] * 0.9),
            "{rl}: the loss fell from {} to {}: {losses:?}",
            losses[0],
            losses.last().unwrap()
        );
    }
    s.stop().await;
}
