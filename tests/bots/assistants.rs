//! Several assistants on one server: routes send Telegram chats and bots to them, each
//! answers with its own system prompt, generation settings and active adapter; its jobs
//! train adapters for it; the OpenAI endpoint's `model` names it.

use crate::support::fake_telegram::{BOT_ID, fake_telegram, fake_telegram_for, rated_replies};
use crate::support::until;
use serde_json::json;

/// (assistant name, adapter name, prompt tokens, completion tokens) of each reply in a
/// Telegram chat, oldest first.
async fn replies_in(db: &loraloop_core::Db, chat: i64) -> Vec<(String, Option<String>, i64, i64)> {
    sqlx::query_as(
        "select a.name, m.adapter_name, m.prompt_tokens, m.completion_tokens
         from messages m join conversations c on c.id = m.conversation_id
         join assistants a on a.id = c.assistant_id
         join chats ch on ch.id = c.chat_id
         where ch.platform = 'telegram' and ch.platform_chat_id = ? and m.role = 'assistant'
         order by m.id",
    )
    .bind(chat.to_string())
    .fetch_all(db.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn routes_send_chats_to_assistants_that_answer_in_their_own_way() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(
        true,
        &[
            ("TELEGRAM_BOT_TOKEN", crate::support::fake_telegram::TOKEN),
            ("LORALOOP_TELEGRAM__API_URL", &url),
        ],
    )
    .await;
    let long_prompt = "You are the support desk of the Zorblax tourist office. Answer in one short sentence, name the office, and never talk about anything but travel to Zorblax and its capital.";
    let (status, support) = s
        .post_json(
            "/api/v1/assistants",
            &json!({
                "name": "support",
                "system_prompt": long_prompt,
                "generation": {"max_new_tokens": 3, "temperature": 0},
                "activation": "gate",
                "routes": [{"platform": "telegram", "scope": "chat", "key": 7002}],
            }),
        )
        .await;
    assert_eq!(status, 201, "{support}");
    assert_eq!(support["routes"][0]["key"], "7002");
    assert_eq!(support["effective_generation"]["max_new_tokens"], 3);
    assert_eq!(support["activation"], "gate");
    // Bad input is refused with the field named, and changes nothing.
    for (body, param) in [
        (json!({"name": "two words"}), "assistant name"),
        (
            json!({"name": "x", "generation": {"temperature": 9}}),
            "generation.temperature",
        ),
        (
            json!({"name": "x", "activation": "sometimes"}),
            "activation",
        ),
        (
            json!({"name": "x", "routes": [{"platform": "telegram", "scope": "guild", "key": 1}]}),
            "routes.0",
        ),
        (json!({"name": "base"}), "name"),
        (json!({"name": "active"}), "name"),
        // The served model's name: the OpenAI endpoint reads it as the base model.
        (json!({"name": "tiny"}), "name"),
    ] {
        let (status, e) = s.post_json("/api/v1/assistants", &body).await;
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    let (_, x) = s
        .post_json(
            "/api/v1/assistants",
            &json!({"name": "x", "system_prompt": ""}),
        )
        .await;
    assert_eq!(x["name"], "x", "a name refused above is free: {x}");
    // A taken name is a conflict with what exists, not an invalid value.
    let (status, e) = s
        .post_json("/api/v1/assistants", &json!({"name": "x"}))
        .await;
    assert_eq!(status, 409, "{e}");
    assert_eq!(
        e["error"]["message"],
        "an assistant named \"x\" already exists"
    );

    // A job for `support` trains an adapter for it; its gate policy activates it for
    // `support` only (the default assistant's policy is manual in the tests' config).
    let ds = s
        .upload_dataset("zorblax", &crate::support::zorblax_jsonl(16))
        .await;
    let (status, job) = s
        .post_json(
            "/api/v1/fine-tune",
            &json!({
                "dataset_id": ds, "assistant": "support", "epochs": 2,
                "hyperparameters": {"learning_rate": 0.02, "batch_size": 4, "lora_r": 4, "sequence_len": 64}
            }),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["assistant"], "support");
    let done = s.wait_job(job["id"].as_i64().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let adapter = done["fine_tuned_adapter"].as_str().unwrap().to_string();
    let adapter_id = done["fine_tuned_adapter_id"].as_i64().unwrap();
    let passed = done["report_card"]["verdict"]["pass"].as_bool().unwrap();
    if !passed {
        // The random model's card may not pass: then the operator activates it.
        let (status, a) = s
            .post_json(
                &format!("/api/v1/adapters/{adapter_id}/activate?assistant=support"),
                &json!({}),
            )
            .await;
        assert_eq!(status, 200, "{a}");
    }
    let support = s.get_json("/api/v1/assistants/support").await;
    assert_eq!(support["active_adapter"], adapter.as_str(), "{support}");
    // Support's adapter is not the default assistant's to activate (no list of its showed it).
    let (status, e) = s
        .post_json(
            &format!("/api/v1/adapters/{adapter_id}/activate?assistant=loraloop"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 409, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("assistant \"support\""),
        "{e}"
    );
    let default = s.get_json("/api/v1/assistants/loraloop").await;
    assert_eq!(default["active_adapter"], json!(null), "{default}");
    assert_eq!(default["default"], true);
    let listed = s.get_json("/api/v1/adapters?assistant=support").await;
    let row = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == adapter_id)
        .unwrap()
        .clone();
    assert_eq!(
        (row["active"].as_bool(), row["assistant_id"].clone()),
        (Some(true), support["id"].clone())
    );

    // The bot's own id routes to `sales`; chat 7002's route is more specific.
    let (status, sales) = s
        .post_json(
            "/api/v1/assistants",
            &json!({"name": "sales", "system_prompt": "Sell.", "routes": [{"platform": "telegram", "scope": "bot", "key": BOT_ID}]}),
        )
        .await;
    assert_eq!(status, 201, "{sales}");
    // Chat 7002 is support's: taking it needs "move", and a refused change changes nothing.
    let chat_7002 = json!({"platform": "telegram", "scope": "chat", "key": 7002});
    let (status, e) = s
        .post_json("/api/v1/assistants/sales/routes", &chat_7002)
        .await;
    assert_eq!(status, 409, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("assistant \"support\""), "{e}");
    let r = s
        .http
        .patch(s.url("/api/v1/assistants/sales"))
        .bearer_auth(crate::support::KEY)
        .json(&json!({"system_prompt": "Changed.", "routes": [chat_7002]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (409, Some("routes.0")),
        "{e}"
    );
    let unchanged = s.get_json("/api/v1/assistants/sales").await;
    assert_eq!(unchanged["system_prompt"], "Sell.", "{unchanged}");
    let same_text = "What is the capital of Zorblax?";
    for chat in [7001, 7002] {
        fake.text(chat, same_text);
    }
    until(30, "two replies", || {
        rated_replies(&fake, 7001) == 1 && rated_replies(&fake, 7002) == 1
    })
    .await;
    let db = &s.server.state.db;
    let sales_reply = replies_in(db, 7001).await;
    let support_reply = replies_in(db, 7002).await;
    assert_eq!(sales_reply.len(), 1);
    assert_eq!(support_reply.len(), 1);
    assert_eq!(
        sales_reply[0].0, "sales",
        "the bot's route: {sales_reply:?}"
    );
    assert_eq!(sales_reply[0].1, None, "sales has no adapter");
    assert_eq!(support_reply[0].0, "support", "the chat's route wins");
    assert_eq!(support_reply[0].1.as_deref(), Some(adapter.as_str()));
    assert!(
        support_reply[0].3 <= 3,
        "support's max_new_tokens: {support_reply:?}"
    );
    // The same message with support's long system prompt is the longer prompt.
    assert!(
        support_reply[0].2 > sales_reply[0].2 + 20,
        "support's system prompt is in its prompt: {support_reply:?} vs {sales_reply:?}"
    );

    // Without the bot route, chat 7001 goes back to the default assistant: a new
    // conversation, with the default's settings.
    let route = sales["routes"][0]["id"].as_i64().unwrap();
    assert_eq!(
        s.delete(&format!("/api/v1/assistants/sales/routes/{route}"))
            .await,
        204
    );
    fake.text(7001, same_text);
    until(30, "the third reply", || rated_replies(&fake, 7001) == 2).await;
    let after = replies_in(db, 7001).await;
    assert_eq!(after[1].0, "loraloop", "{after:?}");
    // Asked to, sales takes chat 7002 from support.
    let (status, moved) = s
        .post_json(
            "/api/v1/assistants/sales/routes",
            &json!({"platform": "telegram", "scope": "chat", "key": 7002, "move": true}),
        )
        .await;
    assert_eq!(status, 201, "{moved}");
    let support_now = s.get_json("/api/v1/assistants/support").await;
    assert_eq!(support_now["routes"], json!([]), "{support_now}");

    // The OpenAI endpoint: `model` names an assistant (its prompt, settings, adapter).
    let models = s.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(&ids[..4], ["loraloop", "support", "x", "sales"], "{ids:?}");
    let ask = |model: &'static str| {
        let s = &s;
        async move {
            s.post_json(
                "/v1/chat/completions",
                &json!({"model": model, "messages": [{"role": "user", "content": same_text}]}),
            )
            .await
        }
    };
    let (status, via_support) = ask("support").await;
    assert_eq!(status, 200, "{via_support}");
    assert!(
        via_support["system_fingerprint"]
            .as_str()
            .unwrap()
            .contains(&adapter),
        "{via_support}"
    );
    assert!(via_support["usage"]["completion_tokens"].as_i64().unwrap() <= 3);
    let (_, via_sales) = ask("sales").await;
    assert_eq!(via_sales["system_fingerprint"], "base", "{via_sales}");
    assert!(
        via_support["usage"]["prompt_tokens"].as_i64().unwrap()
            > via_sales["usage"]["prompt_tokens"].as_i64().unwrap() + 20
    );

    // An assistant with conversations cannot be deleted; one without can; the default
    // never.
    let del = |name: &'static str| {
        let s = &s;
        async move { s.delete(&format!("/api/v1/assistants/{name}")).await }
    };
    assert_eq!(del("support").await, 409);
    assert_eq!(del("loraloop").await, 409);
    assert_eq!(del("x").await, 204);
    assert_eq!(del("x").await, 404);
    s.stop().await;
}

/// A `loraloop bot telegram` process for the bot with `token`, on `serve`'s database.
async fn telegram_bot(
    serve: &crate::support::TestServer,
    token: &str,
    api: &str,
) -> loraloop::serve::RunningServer {
    let mut config = serve.server.state.config.clone();
    config.secrets.telegram_bot_token = Some(token.to_string().into());
    config.raw.telegram.api_url = api.to_string();
    loraloop::serve::start(
        config,
        loraloop::serve::ServeOptions {
            only_bot: Some(loraloop::serve::BotKind::Telegram),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn two_telegram_bots_on_one_database_each_answer_as_their_assistant() {
    crate::support::capture_logs();
    let (fake_a, url_a) = fake_telegram_for("111:token-a", 111).await;
    let (fake_b, url_b) = fake_telegram_for("222:token-b", 222).await;
    let serve = crate::support::start(false, &[]).await;
    let (status, helper) = serve
        .post_json(
            "/api/v1/assistants",
            &json!({"name": "helper", "routes": [{"platform": "telegram", "scope": "bot", "key": "222"}]}),
        )
        .await;
    assert_eq!(status, 201, "{helper}");
    let a = telegram_bot(&serve, "111:token-a", &url_a).await;
    let b = telegram_bot(&serve, "222:token-b", &url_b).await;
    // The same user writes to both bots: one private chat id on Telegram, and each fake
    // numbers its updates from the same start.
    for round in 1..=2 {
        fake_a.text(9001, "Hello, bot A");
        fake_b.text(9001, "Hello, bot B");
        until(30, "both bots' replies", || {
            rated_replies(&fake_a, 9001) == round && rated_replies(&fake_b, 9001) == round
        })
        .await;
    }
    let db = &serve.server.state.db;
    let replies = replies_in(db, 9001).await;
    let mut by: Vec<&str> = replies.iter().map(|r| r.0.as_str()).collect();
    by.sort();
    assert_eq!(
        by,
        ["helper", "helper", "loraloop", "loraloop"],
        "{replies:?}"
    );
    let conversations: Vec<(String, i64)> = sqlx::query_as(
        "select a.name, count(m.id) from conversations c join assistants a on a.id = c.assistant_id
         join messages m on m.conversation_id = c.id group by c.id order by a.name",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        conversations,
        [("helper".to_string(), 4), ("loraloop".to_string(), 4)],
        "one conversation per bot, each with both turns"
    );
    // An update is marked done just after its reply is sent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let keys = loop {
        let keys: Vec<(String, String)> = sqlx::query_as(
            "select update_key, status from inbound_updates where platform = 'telegram' order by update_key",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        if keys.iter().all(|(_, s)| s == "done") || std::time::Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        keys.len(),
        4,
        "no update is mistaken for the other bot's: {keys:?}"
    );
    assert!(
        keys.iter()
            .all(|(k, s)| (k.starts_with("111:") || k.starts_with("222:")) && s == "done"),
        "{keys:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    serve.stop().await;
}
