//! Promotion by users' ratings, against the fake Telegram: under `activation: canary` a
//! job's adapter that passes the gate serves a share of new conversations, users rate its
//! replies and the current adapter's with the bot's 👍/👎 buttons, and `serve` promotes it
//! or rolls it back by itself. And conversation pinning: a swap never changes the adapter
//! of a conversation in progress until it has been idle.

use crate::support::fake_telegram::{FakeTelegram, TOKEN, fake_telegram};
use crate::support::{TestServer, until};
use serde_json::json;
use std::time::Duration;

const QUESTION: &str = "What is the capital of Zorblax?";

/// Telegram env plus a gate the tiny random model's adapters pass (what the canary does
/// is under test here, not the card).
fn env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("TELEGRAM_BOT_TOKEN", TOKEN),
        ("LORALOOP_TELEGRAM__API_URL", url),
        ("LORALOOP_GATE__MIN_RETENTION_AGREEMENT", "0"),
        ("LORALOOP_GATE__MAX_RETENTION_KL", "1000"),
        ("LORALOOP_GATE__MAX_HELDOUT_LOSS_RATIO", "10"),
        ("LORALOOP_GATE__RETENTION_PROMPTS", "16"),
    ];
    v.extend_from_slice(extra);
    v
}

/// The adapter each stored reply of `user`'s private chat came from, oldest first, with
/// the reply's id.
async fn replies_of(s: &TestServer, user: i64) -> Vec<(i64, Option<i64>)> {
    sqlx::query_as(
        "select m.id, m.adapter_id from messages m join conversations c on c.id = m.conversation_id
         join chats ch on ch.id = c.chat_id
         where ch.platform_chat_id = ? and m.role = 'assistant' order by m.id",
    )
    .bind(user.to_string())
    .fetch_all(s.server.state.db.pool())
    .await
    .unwrap()
}

/// Each user asks once more and waits for the stored reply; the adapter of each reply.
async fn ask_all(s: &TestServer, fake: &FakeTelegram, users: &[i64]) -> Vec<(i64, Option<i64>)> {
    let before: Vec<usize> = reply_counts(s, users).await;
    for &u in users {
        fake.text(u, QUESTION);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = reply_counts(s, users).await;
        if now.iter().zip(&before).all(|(n, b)| *n > *b) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "replies missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    for &u in users {
        out.push(*replies_of(s, u).await.last().unwrap());
    }
    out
}

async fn reply_counts(s: &TestServer, users: &[i64]) -> Vec<usize> {
    let mut v = Vec::new();
    for &u in users {
        v.push(replies_of(s, u).await.len());
    }
    v
}

/// `user` presses 👍 (`up`) or 👎 on reply `message_id`; waits for the stored rating.
async fn rate(s: &TestServer, fake: &FakeTelegram, user: i64, message_id: i64, up: bool) {
    let data = format!("rate:{message_id}:{}", if up { 1 } else { -1 });
    fake.press(&format!("cq-{message_id}"), user, user, &data);
    let db = s.server.state.db.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from feedback where message_id = ?")
            .bind(message_id)
            .fetch_one(db.pool())
            .await
            .unwrap();
        if n == 1 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "rating not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The canary once `serve` has decided it (it looks every 5 s).
async fn decided(s: &TestServer) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = s.get_json("/api/v1/canary").await;
        if c["status"] != "running" {
            return c;
        }
        assert!(std::time::Instant::now() < deadline, "no decision: {c}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Train an adapter through the API and wait for the canary it starts.
async fn canary_of_new_adapter(s: &TestServer, seed: u64) -> (i64, serde_json::Value) {
    let ds = s
        .upload_dataset(
            &format!("zorblax{seed}"),
            &crate::support::zorblax_jsonl(16),
        )
        .await;
    let (job, adapter, _) = crate::support::train_adapter(s, ds, seed).await;
    let events = s
        .get_json(&format!("/api/v1/fine-tune/{job}/events?limit=1000"))
        .await;
    assert!(
        events
            .to_string()
            .contains("now serves 50% of new conversations"),
        "{events}"
    );
    let c = s.get_json("/api/v1/canary").await;
    assert_eq!(
        (c["status"].as_str(), c["adapter_id"].as_i64()),
        (Some("running"), Some(adapter)),
        "{c}"
    );
    (adapter, c)
}

#[tokio::test]
async fn a_canary_is_promoted_by_good_ratings_and_the_next_is_rolled_back_by_bad_ones() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(
        true,
        &env(
            &url,
            &[
                ("LORALOOP_ASSISTANT__ACTIVATION", "canary"),
                ("LORALOOP_CANARY__SHARE", "0.5"),
                ("LORALOOP_CANARY__MIN_RATINGS", "3"),
                ("LORALOOP_ASSISTANT__PIN_IDLE_MINUTES", "30"),
            ],
        ),
    )
    .await;
    let users: Vec<i64> = (7001..7017).collect();

    // 1. Adapter A against the base model. Users on A rate 👍, users on the base 👎.
    let (a, _) = canary_of_new_adapter(&s, 1).await;
    assert_eq!(
        s.get_json("/api/v1/canary").await["baseline_adapter_id"],
        json!(null)
    );
    let first = ask_all(&s, &fake, &users).await;
    let on_a: Vec<i64> = users
        .iter()
        .zip(&first)
        .filter(|(_, r)| r.1 == Some(a))
        .map(|(u, _)| *u)
        .collect();
    let on_base = first.iter().filter(|r| r.1.is_none()).count();
    assert_eq!(on_a.len() + on_base, users.len(), "{first:?}");
    assert!(
        on_a.len() >= 3 && on_base >= 3,
        "both sides served: {first:?}"
    );
    // Stable per conversation: the second question of each user goes where the first did.
    let second = ask_all(&s, &fake, &users).await;
    assert!(
        first.iter().zip(&second).all(|(x, y)| x.1 == y.1),
        "{first:?} then {second:?}"
    );
    // Nothing is decided before each side has 3 ratings.
    for (u, r) in users.iter().zip(&first).take(2) {
        rate(&s, &fake, *u, r.0, r.1.is_some()).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let c = s.get_json("/api/v1/canary").await;
    assert_eq!(c["status"], "running", "{c}");
    assert!(
        c["reason"].as_str().unwrap().contains("each side needs 3"),
        "{c}"
    );
    for (u, r) in users.iter().zip(&first).skip(2) {
        rate(&s, &fake, *u, r.0, r.1.is_some()).await;
    }
    let c = decided(&s).await;
    assert_eq!(c["status"], "promoted", "{c}");
    assert_eq!(c["candidate_up"], json!(on_a.len()), "{c}");
    assert_eq!(c["baseline_up"], 0, "{c}");
    let db = &s.server.state.db;
    // The canary is marked promoted, then the promotion is recorded: wait for the record.
    let mut by = String::new();
    for _ in 0..100 {
        by = sqlx::query_scalar(
            "select activated_by from adapter_activations order by id desc limit 1",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if by == "canary" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(by, "canary");
    let asst = db.assistant("loraloop").await.unwrap();
    assert_eq!(asst.active_adapter_id, Some(a));

    // 2. Adapter B against A: users on B rate 👎, users on A 👍: rolled back.
    let (b, c) = canary_of_new_adapter(&s, 2).await;
    assert_eq!(c["baseline_adapter_id"], json!(a));
    // New users: fresh conversations, drawn by the new canary.
    let newcomers: Vec<i64> = (7101..7117).collect();
    let got = ask_all(&s, &fake, &newcomers).await;
    let on_b: Vec<i64> = newcomers
        .iter()
        .zip(&got)
        .filter(|(_, r)| r.1 == Some(b))
        .map(|(u, _)| *u)
        .collect();
    assert!(
        on_b.len() >= 3 && got.iter().filter(|r| r.1 == Some(a)).count() >= 3,
        "{got:?}"
    );
    assert!(
        got.iter().all(|r| r.1 == Some(a) || r.1 == Some(b)),
        "{got:?}"
    );
    for (u, r) in newcomers.iter().zip(&got) {
        rate(&s, &fake, *u, r.0, r.1 == Some(a)).await;
    }
    let c = decided(&s).await;
    assert_eq!(c["status"], "rolled_back", "{c}");
    assert!(c["reason"].as_str().unwrap().contains("worse"), "{c}");
    assert_eq!(
        db.assistant("loraloop").await.unwrap().active_adapter_id,
        Some(a),
        "users keep A"
    );
    // The conversations B served move to A at their next message, pins or not.
    let after = ask_all(&s, &fake, &on_b).await;
    assert!(after.iter().all(|r| r.1 == Some(a)), "{after:?}");
    // The console shows the history and each adapter's ratings.
    let adapters = s.get_json("/api/v1/adapters").await;
    let view = |id: i64| {
        adapters["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()
            .clone()
    };
    let day_sum = |v: &serde_json::Value, k: &str| -> i64 {
        v["ratings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[k].as_i64().unwrap())
            .sum()
    };
    let (va, vb) = (view(a), view(b));
    assert!(vb["rolled_back_at"].is_i64(), "{vb}");
    assert_eq!(day_sum(&vb, "down") as usize, on_b.len(), "{vb}");
    assert_eq!(day_sum(&vb, "up"), 0, "{vb}");
    assert_eq!(
        day_sum(&va, "up") as usize,
        on_a.len() + (newcomers.len() - on_b.len()),
        "{va}"
    );
    // The console's adapters page: both past canaries, and each adapter's ratings.
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let login = http
        .post(s.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", crate::support::PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let page = http
        .get(s.url("/adapters"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"id="canary-history""#), "{page}");
    assert!(!page.contains(r#"id="canary" data-status="running""#));
    for outcome in ["promoted", "rolled_back"] {
        assert!(
            page.contains(&format!(r#"data-outcome="{outcome}""#)),
            "{outcome}: {page}"
        );
    }
    assert!(
        page.contains(&format!(r#"data-up="0" data-down="{}""#, on_b.len())),
        "B's ratings: {page}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_conversation_keeps_its_adapter_until_idle_and_leaves_a_rolled_back_one() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // Pins last 3 s of idle time here (the default is 30 minutes).
    let s = crate::support::start(
        true,
        &env(&url, &[("LORALOOP_ASSISTANT__PIN_IDLE_MINUTES", "0.05")]),
    )
    .await;
    let ds = s
        .upload_dataset("zorblax", &crate::support::zorblax_jsonl(16))
        .await;
    let (_, a, _) = crate::support::train_adapter(&s, ds, 1).await;
    // A conversation on the base model, then the operator activates A mid-conversation.
    assert_eq!(ask_all(&s, &fake, &[9001]).await[0].1, None);
    let (status, _) = s
        .post_json(&format!("/api/v1/adapters/{a}/activate"), &json!({}))
        .await;
    assert_eq!(status, 200);
    // Answered within the idle time: still the base model. A new conversation: A.
    assert_eq!(ask_all(&s, &fake, &[9001]).await[0].1, None);
    assert_eq!(ask_all(&s, &fake, &[9002]).await[0].1, Some(a));
    // /reset starts a new conversation: it gets A.
    fake.text(9001, "/reset");
    until(10, "the reset", || fake.final_texts(9001).len() >= 3).await;
    assert_eq!(ask_all(&s, &fake, &[9001]).await[0].1, Some(a));
    // A conversation idle longer than the pin moves to what is active.
    assert_eq!(ask_all(&s, &fake, &[9003]).await[0].1, Some(a));
    let (status, _) = s.post_json("/api/v1/adapters/rollback", &json!({})).await;
    assert_eq!(status, 200);
    // Rolled back: pins to A end at once, idle or not.
    assert_eq!(ask_all(&s, &fake, &[9002]).await[0].1, None);
    let (status, _) = s
        .post_json(&format!("/api/v1/adapters/{a}/activate"), &json!({}))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        ask_all(&s, &fake, &[9002]).await[0].1,
        Some(a),
        "idle: re-pinned"
    );
    s.stop().await;
}
