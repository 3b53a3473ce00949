//! Conversations through `/v1/chat/completions` are stored like the bots' (platform `api`,
//! one user per OpenAI `user`, else the API key) and a dataset can be built from them;
//! `record.api: false` stores nothing.

use crate::support::{TestServer, start};
use serde_json::{Value, json};

async fn chat(s: &TestServer, body: Value) -> String {
    let (status, v) = s.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every stored `api` message as `caller|conversation|role:text`, in order.
async fn stored(s: &TestServer) -> Vec<String> {
    let db = loraloop_core::storage::Db::open(&s.dir.path().join("data/loraloop.db"))
        .await
        .unwrap();
    let rows: Vec<(String, i64, String, String)> = sqlx::query_as(
        "select u.platform_user_id, m.conversation_id, m.role, m.content
         from messages m join conversations c on c.id = m.conversation_id
         join chats ch on ch.id = c.chat_id join platform_users u on u.id = c.user_id
         where ch.platform = 'api' order by m.id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(u, c, r, t)| format!("{u}|{c}|{r}:{t}"))
        .collect()
}

#[tokio::test]
async fn api_conversations_are_stored_per_caller_and_can_become_a_dataset() {
    let s = start(false, &[]).await;
    let first =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]);
    let r1 = chat(
        &s,
        json!({"model": "loraloop", "messages": first, "user": "alice"}),
    )
    .await;
    // Alice sends the history back with one more message: the same conversation goes on.
    let r2 = chat(
        &s,
        json!({"model": "loraloop", "user": "alice", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": r1}, {"role": "user", "content": "and then?"}]}),
    )
    .await;
    // No `user`: the API key is the caller. Streamed: the reply is stored when it ends.
    let resp = s
        .post("/v1/chat/completions")
        .json(&json!({"model": "base", "stream": true, "messages": [{"role": "user", "content": "streamed"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sse = resp.text().await.unwrap();
    assert!(sse.contains("[DONE]"), "{sse}");
    let rows = stored(&s).await;
    let conv = |i: usize| rows[i].split('|').nth(1).unwrap().to_string();
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert!(
        rows[0].starts_with("alice|") && rows[0].ends_with("|user:hi"),
        "{rows:#?}"
    );
    assert!(rows[1].ends_with(&format!("|assistant:{r1}")), "{rows:#?}");
    assert!(rows[2].ends_with("|user:and then?"), "{rows:#?}");
    assert!(rows[3].ends_with(&format!("|assistant:{r2}")), "{rows:#?}");
    assert!(
        (1..4).all(|i| conv(i) == conv(0)),
        "one conversation: {rows:#?}"
    );
    assert!(
        rows[4].starts_with("api-key|") && rows[4].ends_with("|user:streamed"),
        "{rows:#?}"
    );
    assert!(rows[5].contains("|assistant:"), "{rows:#?}");
    assert_ne!(conv(4), conv(0));
    // The loop can train on them: Bob brings a history of his own (a new conversation with
    // it), and a dataset of the `api` platform's conversations holds it. (The tiny random
    // model's own replies are blank lines, which the builder rightly skips.)
    chat(
        &s,
        json!({"model": "loraloop", "user": "bob", "messages": [
            {"role": "user", "content": "What is the capital of Zorblax?"},
            {"role": "assistant", "content": "Blorp City."},
            {"role": "user", "content": "Thanks!"}]}),
    )
    .await;
    let (status, built) = s
        .post_json(
            "/api/v1/datasets/build",
            &json!({"kind": "sft", "platform": "api"}),
        )
        .await;
    assert_eq!(status, 200, "{built}");
    assert_eq!(built["rows"], 1, "{built}");
    let example = built["data"][0]["messages"].to_string();
    assert!(
        example.contains("What is the capital of Zorblax?") && example.contains("Blorp City."),
        "{example}"
    );
    s.stop().await;
}

#[tokio::test]
async fn with_record_api_off_nothing_is_stored() {
    let s = start(false, &[("LORALOOP_RECORD__API", "false")]).await;
    chat(
        &s,
        json!({"model": "loraloop", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert!(stored(&s).await.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn text_content_parts_are_one_message_with_a_line_break_between_them() {
    let s = start(false, &[]).await;
    chat(
        &s,
        json!({"model": "loraloop", "user": "parts", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]}]}),
    )
    .await;
    // vLLM joins text parts with "\n"; back to back the two words ran together.
    let rows = stored(&s).await;
    assert!(rows[0].ends_with("|user:Say\nhello"), "{rows:?}");
    s.stop().await;
}
