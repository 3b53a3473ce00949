//! The Telegram bot against a fake Telegram Bot API server (axum on 127.0.0.1, written
//! here): several users at once, streamed replies, ratings, commands, groups, non-text
//! messages, the allowlist, the rate limit, 429 and 5xx answers, and a kill in the middle
//! of a burst with exactly-once accounting after the restart.

use crate::support::fake_telegram::{
    FakeTelegram, TOKEN, bot_messages, fake_telegram, rated_replies,
};
use crate::support::until;
use serde_json::json;
use std::time::Duration;

fn env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("TELEGRAM_BOT_TOKEN", TOKEN),
        ("LORALOOP_TELEGRAM__API_URL", url),
    ];
    v.extend_from_slice(extra);
    v
}

#[tokio::test]
async fn users_chat_rate_and_use_every_command() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(false, &env(&url, &[])).await;
    until(10, "setMyCommands", || {
        !fake.calls("setmycommands").is_empty()
    })
    .await;
    let commands: Vec<&str> = vec!["start", "reset", "forget", "help"];
    let set = fake.calls("setmycommands");
    let names: Vec<String> = set[0]["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, commands);

    // Three users at once.
    for u in [1001, 1002, 1003] {
        fake.text(u, "What is the capital of Zorblax?");
    }
    until(30, "three replies", || {
        [1001, 1002, 1003]
            .iter()
            .all(|&u| rated_replies(&fake, u) == 1)
    })
    .await;
    for u in [1001i64, 1002, 1003] {
        assert!(
            fake.calls("sendchataction")
                .iter()
                .any(|p| p["chat_id"] == u && p["action"] == "typing")
        );
        let texts = fake.final_texts(u);
        assert_eq!(texts.len(), 1, "one reply message for {u}: {texts:?}");
    }
    let db = &s.server.state.db;
    // The bot records a reply's Telegram id once Telegram has answered the send, so just
    // after the fake saw the last reply its id may not be stored yet: wait for it.
    let stored = || async {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "select m.role, m.content, m.platform_message_id from messages m order by m.id",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        rows
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut rows = stored().await;
    while rows.len() < 6 || rows.iter().any(|r| r.2.is_none()) {
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        rows = stored().await;
    }
    assert_eq!(rows.iter().filter(|r| r.0 == "user").count(), 3);
    assert_eq!(rows.iter().filter(|r| r.0 == "assistant").count(), 3);
    assert!(
        rows.iter().all(|r| r.2.is_some()),
        "every stored message has its Telegram id: {rows:?}"
    );
    // The stored reply is the text the user saw last.
    let (reply, pid): (String, String) = sqlx::query_as(
        "select m.content, m.platform_message_id from messages m join conversations c on c.id = m.conversation_id
         join chats ch on ch.id = c.chat_id where ch.platform_chat_id = '1001' and m.role = 'assistant'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let shown = fake.final_texts(1001)[0].clone();
    assert_eq!(
        shown,
        if reply.trim().is_empty() {
            "…".to_string()
        } else {
            reply.trim().to_string()
        }
    );
    assert!(pid.parse::<i64>().is_ok());

    // 👍 then 👎 on the same reply: one rating, the last one, and a toast each time.
    let data = fake
        .calls("editmessagetext")
        .iter()
        .chain(fake.calls("sendmessage").iter())
        .chain(fake.calls("editmessagereplymarkup").iter())
        .find(|p| p["chat_id"] == 1001 && p["reply_markup"].is_object())
        .map(|p| {
            p["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .unwrap();
    for (i, d) in [data.clone(), data.replace(":1", ":-1")].iter().enumerate() {
        fake.press(&format!("cq{i}"), 1001, 1001, d);
    }
    until(10, "two toasts", || {
        fake.calls("answercallbackquery").len() == 2
    })
    .await;
    let toasts: Vec<String> = fake
        .calls("answercallbackquery")
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        toasts[0].contains("👍") && toasts[1].contains("👎"),
        "{toasts:?}"
    );
    let ratings: Vec<(String, i64)> = sqlx::query_as("select rater, rating from feedback")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(ratings, vec![("telegram:1001".to_string(), -1)]);
    // A modified client's forged buttons: a rating of 5, and user 1009 rating 1001's
    // reply from their own chat. Both refused; the rating stays as it was.
    let reply_id = data.split(':').nth(1).unwrap().to_string();
    fake.press("forged-1", 1001, 1001, &format!("rate:{reply_id}:5"));
    fake.press("forged-2", 1009, 1009, &format!("rate:{reply_id}:1"));
    until(10, "two more toasts", || {
        fake.calls("answercallbackquery").len() == 4
    })
    .await;
    let toasts: Vec<String> = fake.calls("answercallbackquery")[2..]
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_string())
        .collect();
    assert!(toasts.iter().all(|t| t == "Unknown button."), "{toasts:?}");
    let ratings: Vec<(String, i64)> = sqlx::query_as("select rater, rating from feedback")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(ratings, vec![("telegram:1001".to_string(), -1)]);

    // Commands.
    fake.text(1002, "/start");
    until(10, "the greeting", || {
        fake.final_texts(1002).iter().any(|t| t.contains("/forget"))
    })
    .await;
    let (before,): (i64,) = sqlx::query_as("select count(distinct id) from conversations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    fake.text(1002, "/reset");
    until(10, "the reset notice", || {
        fake.final_texts(1002)
            .iter()
            .any(|t| t.contains("new conversation"))
    })
    .await;
    fake.text(1002, "Hello again");
    until(30, "the reply in the new conversation", || {
        rated_replies(&fake, 1002) == 2
    })
    .await;
    let (after,): (i64,) = sqlx::query_as("select count(distinct id) from conversations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(after, before + 1);
    fake.text(1003, "/help");
    until(10, "help", || {
        fake.final_texts(1003).iter().any(|t| t.contains("/reset"))
    })
    .await;
    fake.text(1003, "/forget");
    until(10, "the forget confirmation", || {
        fake.calls("sendmessage").iter().any(|p| {
            p["chat_id"] == 1003
                && p["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "forget:1003"
        })
    })
    .await;
    // Someone else cannot confirm it.
    fake.push("callback_query", json!({"id": "f0", "from": FakeTelegram::user(1001), "chat_instance": "x", "data": "forget:1003"}));
    fake.push("callback_query", json!({"id": "f1", "from": FakeTelegram::user(1003), "chat_instance": "x", "data": "forget:1003"}));
    until(10, "the forget toasts", || {
        fake.calls("answercallbackquery").len() == 6
    })
    .await;
    let (left,): (i64,) = sqlx::query_as("select count(*) from messages m join platform_users u on u.id = m.user_id where u.platform_user_id = '1003'").fetch_one(db.pool()).await.unwrap();
    assert_eq!(left, 0);
    let (excluded,): (i64,) = sqlx::query_as(
        "select excluded_from_training from platform_users where platform_user_id = '1003'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(excluded, 1);
    let (kept,): (i64,) = sqlx::query_as("select count(*) from messages m join platform_users u on u.id = m.user_id where u.platform_user_id = '1001'").fetch_one(db.pool()).await.unwrap();
    assert_eq!(kept, 1, "another user's messages stay");

    // A sticker: a polite reply, nothing stored.
    let mid = fake.new_message_id();
    fake.push("message", json!({"message_id": mid, "date": 1, "chat": {"id": 1001, "type": "private", "first_name": "U"}, "from": FakeTelegram::user(1001),
                                "sticker": {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1, "height": 1, "is_animated": false, "is_video": false}}));
    until(10, "the non-text notice", || {
        fake.final_texts(1001)
            .iter()
            .any(|t| t.contains("only understand text"))
    })
    .await;

    // Groups: only a mention or a reply to the bot gets an answer.
    let group = -5001;
    let m1 = fake.new_message_id();
    fake.push("message", json!({"message_id": m1, "date": 1, "chat": {"id": group, "type": "group", "title": "G"}, "from": FakeTelegram::user(1001), "text": "just chatting"}));
    let other_bot = fake.new_message_id();
    fake.push("message", json!({"message_id": other_bot, "date": 1, "chat": {"id": group, "type": "group", "title": "G"}, "from": FakeTelegram::user(1001), "text": "@loraloop_bot2 not you"}));
    let m2 = fake.new_message_id();
    fake.push("message", json!({"message_id": m2, "date": 1, "chat": {"id": group, "type": "group", "title": "G"}, "from": FakeTelegram::user(1001), "text": "@loraloop_bot what is Zorblax?"}));
    until(30, "the group reply", || rated_replies(&fake, group) == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rated_replies(&fake, group),
        1,
        "the messages without a mention of this bot got no reply"
    );
    let (stored,): (String,) =
        sqlx::query_as("select content from messages where role = 'user' order by id desc limit 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        stored, "what is Zorblax?",
        "the mention is not part of the prompt"
    );
    // Telegram matches usernames in any case.
    let m3 = fake.new_message_id();
    fake.push("message", json!({"message_id": m3, "date": 1, "chat": {"id": group, "type": "group", "title": "G"}, "from": FakeTelegram::user(1001), "text": "And Quux, @LoraLoop_Bot?"}));
    until(30, "the reply to a mention in other case", || {
        rated_replies(&fake, group) == 2
    })
    .await;
    let (stored,): (String,) =
        sqlx::query_as("select content from messages where role = 'user' order by id desc limit 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(stored, "And Quux, ?");

    // Every update handled, none pending; the token never reached the database.
    let pending = || async {
        let (n,): (i64,) =
            sqlx::query_as("select count(*) from inbound_updates where status = 'pending'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pending().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for no pending updates"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leaks,): (i64,) = sqlx::query_as(
        "select count(*) from inbound_updates where payload like '%secret-test-token%'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(leaks, 0);
    s.stop().await;
}

#[tokio::test]
async fn allowlist_rate_limit_and_transient_errors() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(
        false,
        &env(
            &url,
            &[
                (
                    "LORALOOP_TELEGRAM__ALLOWED_USER_IDS",
                    "[2001, 2002, 2003, 2004]",
                ),
                ("LORALOOP_TELEGRAM__RATE_LIMIT_PER_MINUTE", "2"),
            ],
        ),
    )
    .await;
    // Not on the list: a refusal, nothing stored.
    fake.text(2999, "hello");
    until(10, "the refusal", || {
        fake.final_texts(2999).iter().any(|t| t.contains("private"))
    })
    .await;
    // A flood: two answered, one notice, the rest dropped quietly.
    for i in 0..6 {
        fake.text(2001, &format!("message {i}"));
    }
    until(60, "two replies and one notice", || {
        rated_replies(&fake, 2001) == 2
            && fake
                .final_texts(2001)
                .iter()
                .filter(|t| t.contains("faster than I can answer"))
                .count()
                == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.final_texts(2001)
            .iter()
            .filter(|t| t.contains("faster than I can answer"))
            .count(),
        1
    );
    assert_eq!(rated_replies(&fake, 2001), 2);
    // 429 with retry_after, then a burst of 5xx answers hitting three users' replies at
    // once: every reply still arrives, once. (teloxide itself waits 10 s after a 5xx
    // before it reports it; the three waits overlap.)
    fake.inject("sendmessage", 429, json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}}));
    for status in [502, 503, 500] {
        fake.inject(
            "sendmessage",
            status,
            json!({"ok": false, "error_code": status, "description": "Server error"}),
        );
    }
    for u in [2002, 2003, 2004] {
        fake.text(u, "hello there");
    }
    until(90, "the replies after the errors", || {
        [2002, 2003, 2004]
            .iter()
            .all(|&u| rated_replies(&fake, u) == 1)
    })
    .await;
    assert_eq!(fake.calls("sendmessage:refused").len(), 4);
    for u in [2002, 2003, 2004] {
        assert_eq!(fake.final_texts(u).len(), 1, "one reply message for {u}");
    }
    let db = &s.server.state.db;
    let (users,): (i64,) =
        sqlx::query_as("select count(*) from platform_users where platform_user_id = '2999'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(users, 0, "a refused user is not stored");
    s.stop().await;
}

/// Start the server with the bot on its own runtime, so the test can kill every task of
/// it at once (the runtime is dropped: each task stops at its next await, as if the
/// process had died) and keep the database.
fn start_on_own_runtime(config: loraloop_core::Config) -> tokio::runtime::Runtime {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(loraloop::serve::start(
                config,
                loraloop::serve::ServeOptions {
                    bind: Some("127.0.0.1:0".parse().unwrap()),
                    worker: false,
                    ..Default::default()
                },
            ))
            .unwrap();
        // The handle lives in the runtime until the runtime is killed.
        rt.spawn(async move {
            std::future::pending::<()>().await;
            drop(server);
        });
        rt
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_a_burst_loses_nothing_and_answers_each_message_once() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let first = crate::support::start(
        false,
        &env(&url, &[("LORALOOP_GENERATION__MAX_NEW_TOKENS", "40")]),
    )
    .await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    server.stop().await.unwrap();
    let users: Vec<i64> = (3001..3041).collect();
    let mut sent = Vec::new();
    for &u in &users {
        sent.push((u, fake.text(u, "Tell me a long story about Zorblax.")));
    }
    // Run until some replies went out and the next calls hang, then kill everything.
    fake.0.lock().unwrap().hang_after = Some(10);
    let rt = start_on_own_runtime(config.clone());
    until(60, "calls left hanging", || {
        fake.0.lock().unwrap().hung >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    rt.shutdown_background();
    fake.0.lock().unwrap().hang_after = None;
    let answered_before = {
        let db = loraloop_core::Db::open(&config.database_path)
            .await
            .unwrap();
        let (done,): (i64,) =
            sqlx::query_as("select count(*) from inbound_updates where status = 'done'")
                .fetch_one(db.pool())
                .await
                .unwrap();
        done as usize
    };
    assert!(
        answered_before < users.len(),
        "the kill came after every update was done; the test proves nothing"
    );
    // Restart on the same database: the rest is answered.
    let server = crate::support::start_config(config).await;
    until(120, "every user answered", || {
        users.iter().all(|&u| rated_replies(&fake, u) >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = &server.state.db;
    let mut duplicates = 0;
    let mut finished_in_place = 0;
    for &(u, mid) in &sent {
        let (stored,): (i64,) = sqlx::query_as("select count(*) from messages where role = 'user' and platform_message_id = ? and user_id = (select id from platform_users where platform_user_id = ?)")
            .bind(mid.to_string())
            .bind(u.to_string())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(stored, 1, "user {u}'s message is stored exactly once");
        // A reply started before the kill is finished in the same message: a second bot
        // message only where the first send reached Telegram and its answer never came
        // back (the bot cannot know that message exists; Telegram has no idempotency key).
        let (messages, unheard) = bot_messages(&fake, u);
        assert!(
            messages >= 1 && messages - 1 <= unheard,
            "user {u} got {messages} bot messages ({unheard} sent unheard)"
        );
        duplicates += messages - 1;
        finished_in_place += usize::from(
            fake.calls("editmessagetext")
                .iter()
                .any(|p| p["chat_id"].as_i64() == Some(u) && p["_hung"] == false)
                && messages == 1,
        );
    }
    let (pending,): (i64,) =
        sqlx::query_as("select count(*) from inbound_updates where status != 'done'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(pending, 0);
    eprintln!(
        "kill after {answered_before} of {} updates were done; after the restart every message was answered, {duplicates} duplicate(s) (each from a send whose answer was lost), {finished_in_place} finished in place",
        users.len()
    );
    // The bot token reached no log line (everything at debug level, HTTP clients included).
    let logs = crate::support::logs();
    assert!(
        logs.contains("telegram: polling as @loraloop_bot"),
        "the logs were captured"
    );
    assert!(
        !logs.contains("secret-test-token"),
        "the bot token is in the logs"
    );
    server.stop().await.unwrap();
    drop(dir);
}

/// The case: a reply was streaming (its message on Telegram, partly written) when
/// the process died. After the restart that message is finished, not a second one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_off_by_a_kill_is_finished_in_the_same_message() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let first = crate::support::start_with_model(
        false,
        &env(
            &url,
            &[
                ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "600"),
                ("LORALOOP_GENERATION__REPETITION_PENALTY", "2"),
            ],
        ),
        crate::support::SLOW_MODEL,
    )
    .await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    server.stop().await.unwrap();
    // The first words go out and are answered; every edit after them hangs: the reply is
    // half-streamed when the process dies.
    fake.0.lock().unwrap().hang_after = Some(1);
    fake.text(9301, "Tell me a long story.");
    let rt = start_on_own_runtime(config.clone());
    until(60, "an edit left hanging", || {
        fake.0.lock().unwrap().hung >= 1
    })
    .await;
    rt.shutdown_background();
    let (messages, unheard) = bot_messages(&fake, 9301);
    assert_eq!(
        (messages, unheard),
        (1, 0),
        "one message, started and answered"
    );
    assert_eq!(
        rated_replies(&fake, 9301),
        0,
        "not finished before the kill"
    );
    fake.0.lock().unwrap().hang_after = None;

    let server = crate::support::start_config(config).await;
    until(120, "the reply finished", || {
        rated_replies(&fake, 9301) == 1
    })
    .await;
    assert_eq!(
        bot_messages(&fake, 9301),
        (1, 0),
        "the half-streamed message was finished, no second one sent"
    );
    let texts = fake.final_texts(9301);
    assert_eq!(texts.len(), 1);
    let (reply,): (String,) =
        sqlx::query_as("select content from messages where role = 'assistant'")
            .fetch_one(server.state.db.pool())
            .await
            .unwrap();
    let shown = if reply.trim().is_empty() {
        "…"
    } else {
        reply.trim()
    };
    assert_eq!(texts[0], shown, "its text is the stored reply");
    server.stop().await.unwrap();
    drop(dir);
}

#[tokio::test]
async fn webhook_mode_checks_the_secret_token_on_every_request() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(
        false,
        &env(
            &url,
            &[(
                "LORALOOP_TELEGRAM__WEBHOOK_URL",
                "https://bot.example.org/hooks/telegram",
            )],
        ),
    )
    .await;
    until(10, "setWebhook", || !fake.calls("setwebhook").is_empty()).await;
    let set = fake.calls("setwebhook");
    assert_eq!(set[0]["url"], "https://bot.example.org/hooks/telegram");
    let secret = set[0]["secret_token"].as_str().unwrap().to_string();
    assert!(secret.len() >= 32, "a long random secret: {secret}");
    assert!(
        fake.calls("getupdates").is_empty() && fake.calls("deletewebhook").is_empty(),
        "no polling in webhook mode"
    );
    let update = |id: i64, mid: i64| {
        json!({"update_id": id, "message": {"message_id": mid, "date": 1, "chat": {"id": 6001, "type": "private", "first_name": "U"},
               "from": FakeTelegram::user(6001), "text": "Hello over the webhook"}})
    };
    let hook = s.url("/hooks/telegram");
    let post = |secret: Option<&str>, body: serde_json::Value| {
        let mut r = s.http.post(&hook).json(&body);
        if let Some(t) = secret {
            r = r.header("X-Telegram-Bot-Api-Secret-Token", t);
        }
        r.send()
    };
    // No token, a wrong one: refused, nothing stored.
    assert_eq!(post(None, update(900, 1)).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("wrong"), update(900, 1)).await.unwrap().status(),
        401
    );
    let db = &s.server.state.db;
    let (n,): (i64,) = sqlx::query_as("select count(*) from inbound_updates")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    // The right one: stored, answered; Telegram delivering it again changes nothing.
    assert_eq!(
        post(Some(&secret), update(900, 1)).await.unwrap().status(),
        200
    );
    until(30, "the reply", || rated_replies(&fake, 6001) == 1).await;
    assert_eq!(
        post(Some(&secret), update(900, 1)).await.unwrap().status(),
        200
    );
    // Not an update at all.
    assert_eq!(
        post(Some(&secret), json!({"hello": 1}))
            .await
            .unwrap()
            .status(),
        400
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rated_replies(&fake, 6001), 1);
    let (users,): (i64,) = sqlx::query_as("select count(*) from messages where role = 'user'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(users, 1);
    // The webhook route needs no API key or session, and only answers POST.
    assert_eq!(s.http.get(&hook).send().await.unwrap().status(), 405);
    // A stranger announcing 900 KB and sending none of it is answered at once from the
    // headers: the body is read only after the secret matched.
    let mut sock = tokio::net::TcpStream::connect(s.server.addr.unwrap())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(
        b"POST /hooks/telegram HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 900000\r\nx-telegram-bot-api-secret-token: wrong\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    s.stop().await;
}

#[tokio::test]
async fn a_user_who_blocked_the_bot_is_recorded_and_not_retried() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    let s = crate::support::start(false, &env(&url, &[])).await;
    fake.inject(
        "sendmessage",
        403,
        json!({"ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}),
    );
    fake.text(7001, "are you there?");
    let db = s.server.state.db.clone();
    let failed = || async {
        let r: Option<(String, Option<String>)> =
            sqlx::query_as("select status, error from inbound_updates limit 1")
                .fetch_optional(db.pool())
                .await
                .unwrap();
        r
    };
    let mut row = None;
    for _ in 0..500 {
        row = failed().await;
        if row.as_ref().is_some_and(|r| r.0 != "pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, error) = row.expect("the update was stored");
    assert_eq!(status, "failed");
    assert!(
        error.as_deref().unwrap_or("").contains("blocked"),
        "{error:?}"
    );
    // One attempt, no retry, now or later (a failed update is not pending).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.calls("sendmessage:refused").len(), 1);
    assert_eq!(fake.calls("sendmessage").len(), 0);
    // The next message from that user (who unblocked the bot) is answered normally.
    fake.text(7001, "hello again");
    until(30, "the reply after unblocking", || {
        rated_replies(&fake, 7001) == 1
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_bot_alone_follows_the_adapter_activated_by_serve() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // `loraloop serve` without the bot, with the training worker.
    let serve = crate::support::start(true, &[]).await;
    let ds = serve
        .upload_dataset("zorblax", &crate::support::zorblax_jsonl(16))
        .await;
    let (_, adapter_id, adapter_name) = crate::support::train_adapter(&serve, ds, 1).await;
    // `loraloop bot telegram` on the same database and model.
    let mut config = serve.server.state.config.clone();
    config.secrets.telegram_bot_token = Some(TOKEN.to_string().into());
    config.raw.telegram.api_url = url.clone();
    let bot = loraloop::serve::start(
        config,
        loraloop::serve::ServeOptions {
            only_bot: Some(loraloop::serve::BotKind::Telegram),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(bot.addr.is_none(), "a polling bot alone serves no HTTP");
    fake.text(8001, "What is the capital of Zorblax?");
    until(30, "the first reply", || rated_replies(&fake, 8001) == 1).await;
    let (status, _) = serve
        .post_json(
            &format!("/api/v1/adapters/{adapter_id}/activate"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    // The bot notices within its 2-second check.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    fake.text(8001, "What is the capital of Zorblax?");
    until(30, "the second reply", || rated_replies(&fake, 8001) == 2).await;
    let names: Vec<(Option<String>,)> =
        sqlx::query_as("select adapter_name from messages where role = 'assistant' order by id")
            .fetch_all(serve.server.state.db.pool())
            .await
            .unwrap();
    assert_eq!(names, vec![(None,), (Some(adapter_name),)]);
    bot.stop().await.unwrap();
    serve.stop().await;
}

#[tokio::test]
async fn a_stop_lets_the_reply_in_progress_finish() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // Long replies with words (the repetition penalty), so a reply takes a while.
    let s = crate::support::start(
        false,
        &env(
            &url,
            &[
                ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "400"),
                ("LORALOOP_GENERATION__REPETITION_PENALTY", "2"),
            ],
        ),
    )
    .await;
    fake.text(9101, "Tell me everything about Zorblax.");
    until(30, "the first streamed words", || {
        !fake.final_texts(9101).is_empty()
    })
    .await;
    assert_eq!(rated_replies(&fake, 9101), 0, "stopped while streaming");
    let db = s.server.state.db.clone();
    s.stop().await;
    assert_eq!(rated_replies(&fake, 9101), 1, "the reply was finished");
    let (status,): (String,) = sqlx::query_as("select status from inbound_updates")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "done");
}

#[tokio::test]
async fn a_long_reply_streams_by_edits_at_most_once_a_second() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // Long replies with words (the repetition penalty) from a model large enough that
    // generating one takes seconds even with the four decoded together.
    let s = crate::support::start_with_model(
        false,
        &env(
            &url,
            &[
                ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "900"),
                ("LORALOOP_GENERATION__REPETITION_PENALTY", "2"),
            ],
        ),
        crate::support::SLOW_MODEL,
    )
    .await;
    // Four users at once, each reply edited on the way.
    let users = [9201i64, 9202, 9203, 9204];
    for u in users {
        fake.text(u, "Tell me a long story.");
    }
    until(120, "the final replies", || {
        users.iter().all(|&u| rated_replies(&fake, u) == 1)
    })
    .await;
    let mut edited = 0;
    for u in users {
        // The reply's message: sent once with the first words, then edited.
        let versions: Vec<(std::time::Instant, String, bool)> = {
            let f = fake.0.lock().unwrap();
            f.calls
                .iter()
                .zip(&f.call_times)
                .filter(|((m, p), _)| {
                    p["chat_id"] == u && (m == "sendmessage" || m == "editmessagetext")
                })
                .map(|((_, p), at)| {
                    (
                        *at,
                        p["text"].as_str().unwrap_or("").to_string(),
                        p["reply_markup"].is_object(),
                    )
                })
                .collect()
        };
        assert!(
            versions.len() >= 2,
            "the first words while generating, then the final text: {} versions",
            versions.len()
        );
        // Streamed: at least one version between the first words and the final text, and
        // one that differs from both (the first send and the final edit exist for every
        // reply; the Discord test asserts the same).
        assert!(
            versions.len() >= 3,
            "the first words, an edit while generating, then the final text: {} versions over {:?}",
            versions.len(),
            versions.last().unwrap().0 - versions[0].0
        );
        let (first, final_text) = (&versions[0].1, &versions[versions.len() - 1].1);
        assert!(
            versions[1..versions.len() - 1]
                .iter()
                .any(|v| &v.1 != first && &v.1 != final_text),
            "an intermediate version for {u}"
        );
        edited += 1;
        let (last, streamed) = versions.split_last().unwrap();
        assert!(last.2, "the final version carries the rating buttons");
        assert!(streamed.iter().all(|v| !v.2), "no buttons while streaming");
        // Each streamed version extends the one before; the final text extends them all.
        for pair in versions.windows(2) {
            assert!(
                pair[1].1.starts_with(pair[0].1.trim_end()),
                "{:?} then {:?}",
                pair[0].1,
                pair[1].1
            );
        }
        // Throttled: at most one edit a second while streaming (slack for timers).
        for pair in streamed.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= Duration::from_millis(950), "edits {gap:?} apart");
        }
    }
    assert_eq!(
        edited,
        users.len(),
        "every reply was edited while streaming"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_bot_that_fails_is_restarted_with_backoff_and_healthz_says_so() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // Telegram refuses the token twice (as during an outage of its auth), then accepts it.
    let refusal = json!({"ok": false, "error_code": 401, "description": "Unauthorized"});
    fake.inject("getme", 401, refusal.clone());
    fake.inject("getme", 401, refusal);
    let s = crate::support::start(false, &env(&url, &[])).await;
    let health = || async {
        let r = s.http.get(s.url("/healthz")).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().await.unwrap())
    };
    let mut degraded = None;
    for _ in 0..100 {
        let (status, h) = health().await;
        if h["parts"]["telegram"]["state"] == "restarting" {
            degraded = Some((status, h));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, h) = degraded.expect("the failure shows on /healthz");
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded");
    assert!(
        h["parts"]["telegram"]["last_error"]
            .as_str()
            .unwrap()
            .contains("getMe"),
        "{h}"
    );
    // Restarted after 1 s and 2 s, then running, and it answers.
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, h) = health().await;
        if status == 200 && h["parts"]["telegram"]["state"] == "running" {
            last = h;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["parts"]["telegram"]["restarts"], 2, "{last}");
    fake.text(7001, "Are you back?");
    until(30, "the reply", || rated_replies(&fake, 7001) == 1).await;
    s.stop().await;
}

/// Telegram unreachable for longer than a call's own retries: the reply is not lost but
/// tried again after a wait, and delivered once Telegram is back.
#[tokio::test]
async fn a_reply_that_fails_during_an_outage_is_tried_again_after_it() {
    crate::support::capture_logs();
    let (fake, url) = fake_telegram().await;
    // Every send answers 429 for as many calls as one send retries (8): the outage
    // outlasts the call's retries.
    let busy = json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 0",
                      "parameters": {"retry_after": 0}});
    for _ in 0..8 {
        fake.inject("sendmessage", 429, busy.clone());
    }
    let s = crate::support::start(false, &env(&url, &[])).await;
    fake.text(9401, "Hello after the outage?");
    let db = s.server.state.db.clone();
    let status = || async {
        let row: Option<(String, i64, Option<String>)> =
            sqlx::query_as("select status, attempts, error from inbound_updates")
                .fetch_optional(db.pool())
                .await
                .unwrap();
        row
    };
    let mut postponed = None;
    for _ in 0..200 {
        if let Some(r) = status().await
            && r.1 == 1
        {
            postponed = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (state, _, error) = postponed.expect("the failed reply is postponed");
    assert_eq!(state, "pending", "not failed: tried again later");
    let error = error.unwrap();
    assert!(
        error.to_lowercase().contains("retry"),
        "the error is kept: {error}"
    );
    assert_eq!(rated_replies(&fake, 9401), 0);
    // Telegram is back: the reply arrives on the next try (5 s later), once.
    until(30, "the reply after the outage", || {
        rated_replies(&fake, 9401) == 1
    })
    .await;
    // The reply is shown, then the update is marked done: wait for the mark.
    let mut row = status().await.unwrap();
    for _ in 0..200 {
        if row.0 == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        row = status().await.unwrap();
    }
    assert_eq!((row.0.as_str(), row.1), ("done", 1));
    assert_eq!(bot_messages(&fake, 9401).0, 1);
    let (users,): (i64,) = sqlx::query_as("select count(*) from messages where role = 'user'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(users, 1, "the user's message is stored once");
    s.stop().await;
}
