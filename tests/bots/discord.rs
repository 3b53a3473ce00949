//! The Discord bot (serenity's real client) against a fake Discord gateway and REST API
//! on 127.0.0.1 (`common/fake_discord.rs`): direct messages with streamed edits, a mention
//! in a server that starts a thread, the thread as one conversation, replies to the bot,
//! 👍/👎 reactions added and removed, every slash command, the allowlists, the rate limit,
//! a 429 from REST, and a gateway disconnect with RESUME that answers each message once.

use crate::support::until;

use crate::support::fake_discord::{APP_ID, BOT_ID, FakeDiscord};
use serde_json::Value;
use std::time::{Duration, Instant};

const TOKEN: &str = "discord-secret-test-token";
const GUILD: u64 = 5000;
const CHANNEL: u64 = 6001;

/// The fake, and the server with the bot connected to it (READY received).
async fn start(extra: &[(&str, &str)]) -> (FakeDiscord, crate::support::TestServer) {
    start_with_model(extra, loraloop_model::testing::TinySpec::default()).await
}

async fn start_with_model(
    extra: &[(&str, &str)],
    spec: loraloop_model::testing::TinySpec,
) -> (FakeDiscord, crate::support::TestServer) {
    crate::support::capture_logs();
    let fake = FakeDiscord::start(TOKEN).await;
    let mut env = vec![
        ("DISCORD_BOT_TOKEN", TOKEN),
        ("LORALOOP_DISCORD__API_URL", fake.api_url.as_str()),
    ];
    env.extend_from_slice(extra);
    let s = crate::support::start_with_model(false, &env, spec).await;
    until(20, "the bot to connect", || fake.is_live()).await;
    (fake, s)
}

fn dm(user: u64) -> u64 {
    FakeDiscord::dm_channel(user)
}

/// The interaction response to an interaction.
fn response(fake: &FakeDiscord, interaction: u64) -> Option<Value> {
    fake.interaction_responses()
        .into_iter()
        .find(|(id, _)| *id == interaction)
        .map(|(_, b)| b)
}

/// The edit of an interaction's deferred response.
fn edit(fake: &FakeDiscord, interaction: u64) -> Option<Value> {
    fake.interaction_edits()
        .into_iter()
        .find(|(id, _)| *id == interaction)
        .map(|(_, b)| b)
}

/// Whether the database file (or its write-ahead log) holds `text`.
fn db_file_contains(s: &crate::support::TestServer, text: &str) -> bool {
    let db = &s.server.state.config.database_path;
    ["", "-wal"].iter().any(|suffix| {
        std::fs::read(format!("{}{suffix}", db.display()))
            .is_ok_and(|bytes| bytes.windows(text.len()).any(|w| w == text.as_bytes()))
    })
}

async fn count(s: &crate::support::TestServer, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .fetch_one(s.server.state.db.pool())
        .await
        .unwrap();
    n
}

fn shown(reply: &str) -> String {
    if reply.trim().is_empty() {
        "…".to_string()
    } else {
        reply.trim().to_string()
    }
}

#[tokio::test]
async fn direct_messages_stream_by_edits_and_reactions_rate_the_reply() {
    // Long, and with a repetition penalty so the model says more than newlines, from a
    // random model large enough that the reply takes a few seconds even when replies are
    // decoded together (edits at most one a second).
    let (fake, s) = start_with_model(
        &[
            ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "900"),
            ("LORALOOP_GENERATION__REPETITION_PENALTY", "2"),
        ],
        crate::support::SLOW_MODEL,
    )
    .await;
    // IDENTIFY: the token and the intents (guild messages, DMs, message content, reactions).
    let identify = fake.identifies()[0].clone();
    assert_eq!(identify["token"], "[the right token]");
    let intents = identify["intents"].as_u64().unwrap();
    for bit in [9, 12, 15, 10, 13] {
        assert!(intents & (1 << bit) != 0, "intent bit {bit} in {intents:b}");
    }
    // Slash commands, registered globally.
    until(10, "the commands", || {
        !fake
            .calls_to("PUT", &format!("/applications/{APP_ID}/commands"))
            .is_empty()
    })
    .await;
    let names: Vec<String> = fake.calls_to("PUT", "/commands")[0]
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["reset", "forget", "help", "status"]);

    let users = [1001u64, 1002, 1003];
    let mut asked = Vec::new();
    for u in users {
        asked.push((u, fake.dm(u, "What is the capital of Zorblax?")));
    }
    until(60, "three replies", || {
        users.iter().all(|&u| fake.replies(dm(u)).len() == 1)
    })
    .await;
    let db = s.server.state.db.pool();
    for (u, mid) in asked {
        assert!(
            !fake
                .calls_to("POST", &format!("/channels/{}/typing", dm(u)))
                .is_empty(),
            "typing shown to {u}"
        );
        let sent = fake.replies(dm(u)).remove(0);
        assert_eq!(fake.texts(dm(u)).len(), 1, "one message for {u}");
        let (content, pid): (String, String) = sqlx::query_as(
            "select a.content, a.platform_message_id from messages a join messages q on q.conversation_id = a.conversation_id
             where q.platform_message_id = ? and q.role = 'user' and a.role = 'assistant'",
        )
        .bind(mid.to_string())
        .fetch_one(db)
        .await
        .unwrap();
        assert_eq!(
            sent.text(),
            shown(&content),
            "the stored reply is what {u} sees"
        );
        assert_eq!(pid, sent.id.to_string());
        assert_eq!(sent.reactions, ["👍", "👎"]);
        // Streamed: created with the first words, then edited; never more than one edit a
        // second before the final one.
        let versions = &sent.versions;
        eprintln!(
            "{u}: {} versions over {:?}, {} chars",
            versions.len(),
            versions.last().unwrap().0 - versions[0].0,
            sent.text().chars().count()
        );
        // Streamed: at least one version between the first words and the final text (the
        // first send and the final edit exist for every reply).
        assert!(
            versions.len() >= 3,
            "created, edited while generating, then final: {versions:?}"
        );
        let (first, last) = (&versions[0].1, &versions[versions.len() - 1].1);
        assert!(
            versions[1..versions.len() - 1]
                .iter()
                .any(|(_, v)| v != first && v != last),
            "an intermediate version: {versions:?}"
        );
        assert!(
            sent.text().starts_with(versions[0].1.trim_end()),
            "the first version is the start of the reply"
        );
        for w in versions[..versions.len() - 1].windows(2) {
            assert!(
                w[1].0 - w[0].0 >= Duration::from_millis(950),
                "edits throttled"
            );
        }
        // No pings: the bot's messages mention nobody.
        let create = fake
            .calls_to("POST", &format!("/channels/{}/messages", dm(u)))
            .remove(0);
        assert_eq!(
            create.body["allowed_mentions"]["parse"],
            serde_json::json!([])
        );
    }
    let longest = fake.sent().iter().map(|m| m.versions.len()).max().unwrap();
    eprintln!("most versions of one reply: {longest}");
    // Handled: the stored copy of each message (its payload) is gone.
    wait_rows(
        db,
        "select count(*) from inbound_updates where status = 'done'",
        3,
    )
    .await;
    assert_eq!(
        count(
            &s,
            "select count(*) from inbound_updates where payload is not null"
        )
        .await,
        0
    );
    // Discord tells the bot of its own 👍/👎 on each reply (the fake does too): no ratings.
    until(10, "the bot's own reaction events", || {
        fake.calls_to("PUT", "/reactions/").len() >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&s, "select count(*) from feedback").await, 0);
    assert_eq!(
        count(
            &s,
            &format!("select count(*) from platform_users where platform_user_id = '{BOT_ID}'")
        )
        .await,
        0
    );

    // 👍, then 👎 instead: one rating, the last. Removing 👍 (no longer the rating) keeps
    // 👎; removing 👎 removes it.
    let reply = fake.replies(dm(1001)).remove(0);
    let rating = || async {
        sqlx::query_as::<_, (String, Option<i64>)>("select rater, rating from feedback")
            .fetch_all(db)
            .await
            .unwrap()
    };
    fake.react(1001, None, dm(1001), reply.id, "👍", true);
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = rating().await;
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, vec![("discord:1001".to_string(), Some(1))]);
    fake.react(1001, None, dm(1001), reply.id, "👎", true);
    wait_rows(db, "select count(*) from feedback where rating = -1", 1).await;
    fake.react(1001, None, dm(1001), reply.id, "👍", false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rating().await, vec![("discord:1001".to_string(), Some(-1))]);
    fake.react(1001, None, dm(1001), reply.id, "👎", false);
    wait_rows(db, "select count(*) from feedback", 0).await;
    // Another emoji, or a reaction on a user's own message, is no rating.
    fake.react(1002, None, dm(1002), reply.id, "🎉", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&s, "select count(*) from feedback").await, 0);
    s.stop().await;
    until(10, "the gateway connection to close", || fake.all_closed()).await;
}

/// A message stored but not answered when the process died is answered after the
/// restart (on READY), from its stored reply when there is one (not generated again), in
/// the message the reply was already in, and a reply over 2,000 characters arrives in
/// parts. (The tiny test model's context is too
/// short to generate 2,000 characters, so the stored reply is made long by hand.)
#[tokio::test]
async fn after_a_restart_a_pending_message_gets_its_stored_reply_split_at_2000() {
    let (fake, first) = start(&[]).await;
    let asked = fake.dm(1101, "Tell me everything.");
    until(30, "the reply", || fake.replies(dm(1101)).len() == 1).await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    let db = server.state.db.clone();
    // The database is rewritten only once the first run has stopped: the reply's reactions
    // (what `replies` counts) are added before its worker marks the message done, so a
    // rewrite while it runs can be overwritten by that 'done' (and nothing is pending
    // after the restart). Stopping waits for the worker.
    server.stop().await.unwrap();
    assert_eq!(
        update_status(&db, asked).await,
        "done",
        "the first run finished the message"
    );
    // As if the process had died after storing the reply and before sending it.
    let long = format!("{}\n{}", "Zorblax ".repeat(200), "Blorp City. ".repeat(120));
    sqlx::query(
        "update messages set content = ?, platform_message_id = null where role = 'assistant'",
    )
    .bind(&long)
    .execute(db.pool())
    .await
    .unwrap();
    set_pending(&db, &fake, asked).await;
    let before = fake.sent().len();
    let first_message = fake.sent()[before - 1].id;
    let server = crate::support::start_config(config).await;
    // The reply's message (recorded when it was sent) takes the first part; the second
    // part is a new message: the reply is not repeated.
    until(30, "the second part", || fake.sent().len() == before + 1).await;
    let db = &server.state.db;
    wait_rows(
        db.pool(),
        "select count(*) from inbound_updates where status = 'done'",
        1,
    )
    .await;
    let first = fake.sent_message(first_message).unwrap();
    let parts = [
        first.text().to_string(),
        fake.sent()[before].text().to_string(),
    ];
    assert!(parts.iter().all(|t| t.chars().count() <= 2000));
    assert_eq!(parts.concat(), long.trim());
    assert_eq!(
        first.reactions.len(),
        2,
        "the reactions are on the first part"
    );
    let (replies, pid): (i64, Option<String>) = sqlx::query_as(
        "select count(*), max(platform_message_id) from messages where role = 'assistant'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(replies, 1, "not generated again");
    assert_eq!(pid, Some(first_message.to_string()));
    let (pending,): (i64,) =
        sqlx::query_as("select count(*) from inbound_updates where status != 'done'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(pending, 0);
    server.stop().await.unwrap();
    drop(dir);
}

/// Mark a handled message pending again, with the payload it had before it was handled (as
/// if the process had died while handling it).
/// The `inbound_updates` status of a dispatched message.
async fn update_status(db: &loraloop_core::storage::Db, message: u64) -> String {
    let (status,): (String,) =
        sqlx::query_as("select status from inbound_updates where update_key = ?")
            .bind(message.to_string())
            .fetch_one(db.pool())
            .await
            .unwrap();
    status
}

async fn set_pending(db: &loraloop_core::storage::Db, fake: &FakeDiscord, message: u64) {
    let payload = fake.dispatched_message(message).expect("dispatched");
    sqlx::query("update inbound_updates set status = 'pending', payload = ? where update_key = ?")
        .bind(payload.to_string())
        .bind(message.to_string())
        .execute(db.pool())
        .await
        .unwrap();
}

async fn wait_rows(db: &sqlx::SqlitePool, sql: &str, want: i64) {
    for _ in 0..500 {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(db).await.unwrap();
        if n == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sql} never gave {want}");
}

#[tokio::test]
async fn a_mention_in_a_server_starts_a_thread_that_is_one_conversation() {
    let (fake, s) = start(&[]).await;
    let db = s.server.state.db.pool();
    // Chatter without a mention: ignored, not even stored.
    fake.guild_message(GUILD, CHANNEL, 2001, "just chatting", false, None);
    // A mention: a thread on that message, the reply in it.
    let asked = fake.guild_message(GUILD, CHANNEL, 2001, "what is Zorblax?", true, None);
    until(30, "the thread and the reply", || {
        fake.threads()
            .first()
            .is_some_and(|(t, _)| fake.replies(*t).len() == 1)
    })
    .await;
    let (thread, parent) = fake.threads()[0];
    assert_eq!(parent, CHANNEL);
    assert_eq!(thread, asked, "a thread on a message has the message's id");
    let create = fake.calls_to("POST", "/threads").remove(0);
    assert!(create.path.contains(&format!("/messages/{asked}/threads")));
    assert_eq!(create.body["name"], "what is Zorblax?");
    assert!(
        fake.texts(CHANNEL).is_empty(),
        "nothing in the channel itself"
    );
    // In the thread no mention is needed; it is the same conversation.
    fake.guild_message(GUILD, thread, 2002, "and its capital?", false, None);
    until(30, "the second reply in the thread", || {
        fake.replies(thread).len() == 2
    })
    .await;
    let convs: Vec<(i64, Option<String>, i64)> = sqlx::query_as(
        "select c.id, c.platform_thread_id, count(m.id) from conversations c join messages m on m.conversation_id = c.id
         where m.role = 'user' group by c.id",
    )
    .fetch_all(db)
    .await
    .unwrap();
    assert_eq!(convs.len(), 1, "{convs:?}");
    assert_eq!(convs[0].1.as_deref(), Some(thread.to_string().as_str()));
    assert_eq!(convs[0].2, 2);
    // System messages in the thread (someone added to it, a pin) are nobody talking.
    fake.system_message(GUILD, thread, 2002, 1);
    fake.system_message(GUILD, thread, 2002, 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.texts(thread).len(), 2, "{:?}", fake.texts(thread));
    let (stored,): (String,) =
        sqlx::query_as("select content from messages where role = 'user' order by id limit 1")
            .fetch_one(db)
            .await
            .unwrap();
    assert_eq!(
        stored, "what is Zorblax?",
        "the mention is not in the prompt"
    );
    assert_eq!(
        count(&s, "select count(*) from inbound_updates").await,
        2,
        "only messages to the bot are stored"
    );

    // Where the bot cannot start a thread it answers in the channel; a reply to that
    // answer is answered too, in the channel's conversation.
    fake.fail_next("POST", "/threads", 403);
    fake.guild_message(GUILD, CHANNEL, 2003, "hello there", true, None);
    until(30, "the reply in the channel", || {
        fake.replies(CHANNEL).len() == 1
    })
    .await;
    let answer = fake.replies(CHANNEL)[0].id;
    fake.guild_message(GUILD, CHANNEL, 2003, "tell me more", false, Some(answer));
    until(30, "the answer to the reply", || {
        fake.replies(CHANNEL).len() == 2
    })
    .await;
    assert_eq!(fake.threads().len(), 1, "no thread for a reply");
    // Reactions in a server rate too.
    fake.react(2003, Some(GUILD), CHANNEL, answer, "👍", true);
    wait_rows(
        db,
        "select count(*) from feedback where rater = 'discord:2003' and rating = 1",
        1,
    )
    .await;
    s.stop().await;
}

/// A follow-up written in a new thread before the bot even has Discord's answer to its
/// "start thread" request is answered, after the first reply (one conversation, in order);
/// mentions in one channel are answered in parallel, each in its own thread.
#[tokio::test]
async fn a_quick_follow_up_in_a_new_thread_waits_for_the_first_reply() {
    let (fake, s) = start(&[]).await;
    let db = s.server.state.db.pool();
    // A slow Discord: the first reply takes a while to send, the follow-up comes meanwhile.
    fake.set_rest_delay(Some(Duration::from_millis(400)));
    fake.follow_up_on_next_thread(2101, "and one more thing");
    let asked = fake.guild_message(GUILD, CHANNEL, 2101, "first question", true, None);
    until(30, "two replies in the thread", || {
        fake.replies(asked).len() == 2
    })
    .await;
    fake.set_rest_delay(None);
    let follow_up = fake.follow_ups()[0];
    let replies = fake.replies(asked);
    // The follow-up's turn (its "typing") starts after the first reply is complete (its
    // rating reactions added).
    let first_done = fake
        .calls_to("PUT", &format!("/messages/{}/reactions/", replies[0].id))
        .last()
        .unwrap()
        .at;
    let typing = fake.calls_to("POST", &format!("/channels/{asked}/typing"));
    assert_eq!(typing.len(), 2);
    assert!(
        typing[1].at >= first_done,
        "the follow-up is answered after the first reply is complete"
    );
    let stored: Vec<(String, Option<String>)> = sqlx::query_as(
        "select m.platform_message_id, c.platform_thread_id from messages m
         join conversations c on c.id = m.conversation_id where m.role = 'user' order by m.id",
    )
    .fetch_all(db)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            (asked.to_string(), Some(asked.to_string())),
            (follow_up.to_string(), Some(asked.to_string()))
        ]
    );
    assert!(fake.texts(CHANNEL).is_empty());

    // Two mentions at once in one channel: two threads, neither waits for the other's reply
    // (both threads are started before the first reply is complete).
    let before = fake.calls_to("POST", "/threads").len();
    let a = fake.guild_message(GUILD, CHANNEL, 2102, "question a", true, None);
    let b = fake.guild_message(GUILD, CHANNEL, 2103, "question b", true, None);
    until(30, "both replies", || {
        fake.replies(a).len() == 1 && fake.replies(b).len() == 1
    })
    .await;
    let starts: Vec<Instant> = fake.calls_to("POST", "/threads")[before..]
        .iter()
        .map(|c| c.at)
        .collect();
    assert_eq!(starts.len(), 2);
    let first_reply_done = [a, b]
        .iter()
        .map(|t| fake.replies(*t)[0].versions.last().unwrap().0)
        .min()
        .unwrap();
    assert!(
        starts.iter().all(|t| *t < first_reply_done),
        "both threads started before either reply was complete"
    );
    s.stop().await;
}

/// The process dies while answering a mention in a thread: after the restart the message
/// is answered once, in its thread (the thread exists; Discord refuses a second one on the
/// message with code 160004), in the message the reply had started, with the user's
/// message stored once.
#[tokio::test]
async fn a_restart_mid_thread_answers_once_in_the_thread() {
    let (fake, first) = start(&[]).await;
    // Died after starting the thread, before anything was stored: (a). Died while
    // generating, the thread's conversation and the user's message stored: (b).
    let a = fake.guild_message(GUILD, CHANNEL, 2201, "question a", true, None);
    until(30, "the reply to a", || fake.replies(a).len() == 1).await;
    let b = fake.guild_message(GUILD, CHANNEL, 2202, "question b", true, None);
    until(30, "the reply to b", || fake.replies(b).len() == 1).await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    let db = server.state.db.clone();
    wait_rows(
        db.pool(),
        "select count(*) from inbound_updates where status = 'done'",
        2,
    )
    .await;
    for sql in [
        "delete from messages where conversation_id in (select id from conversations where platform_thread_id = ?1)",
        "delete from conversations where platform_thread_id = ?1",
    ] {
        sqlx::query(sql)
            .bind(a.to_string())
            .execute(db.pool())
            .await
            .unwrap();
    }
    sqlx::query(
        "delete from messages where role = 'assistant' and conversation_id in
           (select id from conversations where platform_thread_id = ?)",
    )
    .bind(b.to_string())
    .execute(db.pool())
    .await
    .unwrap();
    set_pending(&db, &fake, a).await;
    set_pending(&db, &fake, b).await;
    server.stop().await.unwrap();
    let threads_before = fake.calls_to("POST", "/threads").len();

    let sent_before = fake.sent().len();
    let server = crate::support::start_config(config).await;
    let db = &server.state.db;
    wait_rows(
        db.pool(),
        "select count(*) from inbound_updates where status = 'done'",
        2,
    )
    .await;
    // Each reply is finished in the message it had started: no second message.
    assert_eq!(fake.sent().len(), sent_before, "no new message");
    assert!(fake.texts(CHANNEL).is_empty(), "{:?}", fake.texts(CHANNEL));
    let again: Vec<(String, u16)> = fake.calls_to("POST", "/threads")[threads_before..]
        .iter()
        .map(|c| (c.path.clone(), c.status))
        .collect();
    assert_eq!(
        again,
        [(format!("/channels/{CHANNEL}/messages/{a}/threads"), 400)],
        "(a) tried once and was told the thread exists; (b) knew its thread"
    );
    for t in [a, b] {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "select m.role, m.platform_message_id from messages m join conversations c on c.id = m.conversation_id
             where c.platform_thread_id = ? order by m.id",
        )
        .bind(t.to_string())
        .fetch_all(db.pool())
        .await
        .unwrap();
        let replies = fake.replies(t);
        assert_eq!(replies.len(), 1, "thread {t}");
        let sent = replies[0].id.to_string();
        let (stored,): (String,) = sqlx::query_as(
            "select m.content from messages m join conversations c on c.id = m.conversation_id
             where c.platform_thread_id = ? and m.role = 'assistant'",
        )
        .bind(t.to_string())
        .fetch_one(db.pool())
        .await
        .unwrap();
        // (An empty reply is shown as "…": platforms refuse empty messages.)
        let shown = if stored.trim().is_empty() {
            "…"
        } else {
            stored.trim()
        };
        assert_eq!(replies[0].text(), shown, "the message shows the new reply");
        assert_eq!(
            rows,
            [
                ("user".to_string(), Some(t.to_string())),
                ("assistant".to_string(), Some(sent))
            ],
            "thread {t}"
        );
    }
    assert_eq!(
        count_in(db.pool(), "select count(*) from conversations").await,
        2
    );
    server.stop().await.unwrap();
    drop(dir);
}

async fn count_in(db: &sqlx::SqlitePool, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(db).await.unwrap();
    n
}

#[tokio::test]
async fn slash_commands_help_reset_forget_and_status_for_admins() {
    let (fake, s) = start(&[
        ("LORALOOP_DISCORD__ADMIN_ROLE", "ops"),
        ("LORALOOP_DISCORD__DEV_GUILD_ID", "5000"),
    ])
    .await;
    // Development: registered in the one server.
    until(10, "the guild commands", || {
        !fake
            .calls_to(
                "PUT",
                &format!("/applications/{APP_ID}/guilds/{GUILD}/commands"),
            )
            .is_empty()
    })
    .await;
    assert!(
        fake.calls_to("PUT", &format!("/applications/{APP_ID}/commands"))
            .is_empty()
    );
    fake.set_roles(GUILD, &[(70, "members"), (71, "ops")]);
    let db = s.server.state.db.pool();
    let ephemeral = |v: &Value| v["type"] == 4 && v["data"]["flags"].as_u64() == Some(64);

    let help = fake.command(3001, None, dm(3001), "help", &[]);
    until(10, "/help", || response(&fake, help).is_some()).await;
    let r = response(&fake, help).unwrap();
    assert!(ephemeral(&r), "{r}");
    assert!(r["data"]["content"].as_str().unwrap().contains("/forget"));

    // /reset: the next message starts a new conversation.
    fake.dm(3001, "hello qzxvw first");
    until(30, "a reply", || fake.replies(dm(3001)).len() == 1).await;
    let reset = fake.command(3001, None, dm(3001), "reset", &[]);
    until(10, "/reset", || response(&fake, reset).is_some()).await;
    assert!(
        response(&fake, reset).unwrap()["data"]["content"]
            .as_str()
            .unwrap()
            .contains("new conversation")
    );
    fake.dm(3001, "hello qzxvw again");
    until(30, "the second reply", || fake.replies(dm(3001)).len() == 2).await;
    assert_eq!(count(&s, "select count(*) from conversations").await, 2);

    // /forget asks (ephemeral, with a button); only that user's press deletes.
    fake.dm(3002, "remember me");
    until(30, "3002's reply", || fake.replies(dm(3002)).len() == 1).await;
    let forget = fake.command(3001, None, dm(3001), "forget", &[]);
    until(10, "/forget", || response(&fake, forget).is_some()).await;
    let r = response(&fake, forget).unwrap();
    assert!(ephemeral(&r), "{r}");
    let button = r["data"]["components"][0]["components"][0].clone();
    assert_eq!(button["custom_id"], "forget:3001");
    assert_eq!(button["style"], 4, "a danger button");
    let other = fake.button(3002, None, dm(3002), "forget:3001");
    until(10, "the refusal", || response(&fake, other).is_some()).await;
    assert!(
        response(&fake, other).unwrap()["data"]["content"]
            .as_str()
            .unwrap()
            .contains("Only that user")
    );
    assert_eq!(
        count(&s, "select count(*) from messages m join platform_users u on u.id = m.user_id where u.platform_user_id = '3001'").await,
        2
    );
    let press = fake.button(3001, None, dm(3001), "forget:3001");
    // Acknowledged at once (Discord waits 3 s), then the question is replaced by the
    // outcome.
    until(10, "the confirmation", || edit(&fake, press).is_some()).await;
    let r = response(&fake, press).unwrap();
    assert_eq!(r["type"], 6, "a deferred update of the question: {r}");
    let done = edit(&fake, press).unwrap();
    assert!(
        done["content"]
            .as_str()
            .unwrap()
            .contains("Done: 4 message(s)"),
        "{done}"
    );
    assert_eq!(done["components"], serde_json::json!([]), "the button goes");
    assert_eq!(
        count(&s, "select count(*) from messages m join conversations c on c.id = m.conversation_id join platform_users u on u.id = c.user_id where u.platform_user_id = '3001'").await,
        0
    );
    assert_eq!(
        count(&s, "select count(*) from platform_users where platform_user_id = '3001' and excluded_from_training = 1").await,
        1
    );
    assert_eq!(
        count(&s, "select count(*) from messages m join platform_users u on u.id = m.user_id where u.platform_user_id = '3002'").await,
        1,
        "another user's messages stay"
    );
    // Nothing of 3001's text is left anywhere in the database file: not in a table (the
    // handled messages' payloads are dropped), not in free pages (secure_delete). (A
    // payload is dropped when its message is marked done, after the reply's reactions.)
    wait_rows(
        db,
        "select count(*) from inbound_updates where status != 'done'",
        0,
    )
    .await;
    let (busy, _, _): (i64, i64, i64) = sqlx::query_as("pragma wal_checkpoint(TRUNCATE)")
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!(busy, 0, "the checkpoint completed");
    assert!(db_file_contains(&s, "remember me"), "the file is read");
    assert!(!db_file_contains(&s, "qzxvw"), "3001's text is gone");

    // /status: members with the admin role only; not in DMs. Deferred first: the roles
    // come after Discord's 3 s (it refuses a first answer later than that).
    fake.set_roles_delay(Some(Duration::from_millis(3500)));
    let denied = fake.command(3003, Some(GUILD), CHANNEL, "status", &[70]);
    let allowed = fake.command(3004, Some(GUILD), CHANNEL, "status", &[70, 71]);
    let in_dm = fake.command(3004, None, dm(3004), "status", &[]);
    until(20, "three /status answers", || {
        [denied, allowed, in_dm]
            .iter()
            .all(|i| edit(&fake, *i).is_some())
    })
    .await;
    for i in [denied, allowed, in_dm] {
        let r = response(&fake, i).unwrap();
        assert!(
            r["type"] == 5 && r["data"]["flags"].as_u64() == Some(64),
            "an ephemeral deferred answer: {r}"
        );
    }
    let text = |i| {
        edit(&fake, i).unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(text(denied).starts_with("Not allowed"), "{}", text(denied));
    assert!(text(in_dm).starts_with("Not allowed"), "{}", text(in_dm));
    let status = text(allowed);
    assert!(
        status.contains("Active adapter: none (base model)"),
        "{status}"
    );
    assert!(status.contains("Training: no job running"), "{status}");
    s.stop().await;
}

#[tokio::test]
async fn allowlists_rate_limit_and_a_429_from_rest() {
    let (fake, s) = start(&[
        ("LORALOOP_DISCORD__ALLOWED_GUILD_IDS", "[5000]"),
        ("LORALOOP_DISCORD__ALLOWED_CHANNEL_IDS", "[6001]"),
        ("LORALOOP_DISCORD__RATE_LIMIT_PER_MINUTE", "2"),
    ])
    .await;
    // Another channel of the server, another server: a notice, no thread, nothing stored.
    fake.guild_message(GUILD, 6002, 4001, "hello", true, None);
    fake.guild_message(5001, 6003, 4001, "hello", true, None);
    until(20, "two notices", || {
        fake.texts(6002).len() == 1 && fake.texts(6003).len() == 1
    })
    .await;
    assert!(fake.texts(6002)[0].contains("does not answer in this channel"));
    // More mentions there: no second notice within the hour.
    fake.guild_message(GUILD, 6002, 4001, "hello?", true, None);
    fake.guild_message(GUILD, 6002, 4009, "anyone?", true, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.texts(6002).len(), 1);
    assert!(fake.threads().is_empty());
    assert_eq!(
        count(&s, "select count(*) from messages").await,
        0,
        "nothing stored"
    );
    assert_eq!(
        count(&s, "select count(*) from inbound_updates").await,
        0,
        "not even the message"
    );
    // A flood: two answered, one notice, the rest dropped quietly.
    for i in 0..5 {
        fake.dm(4002, &format!("message {i}"));
    }
    until(60, "two replies and a notice", || {
        fake.replies(dm(4002)).len() == 2
            && fake
                .texts(dm(4002))
                .iter()
                .filter(|t| t.contains("faster than I can answer"))
                .count()
                == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.replies(dm(4002)).len(), 2);
    assert_eq!(fake.texts(dm(4002)).len(), 3);
    // A 429 (and a 500) on sending: retried, the reply arrives once.
    fake.fail_next("POST", &format!("/channels/{}/messages", dm(4003)), 429);
    fake.fail_next("POST", &format!("/channels/{}/messages", dm(4003)), 500);
    fake.dm(4003, "hello there");
    until(60, "the reply after the errors", || {
        fake.replies(dm(4003)).len() == 1
    })
    .await;
    let refused: Vec<u16> = fake
        .calls_to("POST", &format!("/channels/{}/messages", dm(4003)))
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(refused, [429, 500, 200]);
    assert_eq!(fake.texts(dm(4003)).len(), 1);
    let calls = fake.calls_to("POST", &format!("/channels/{}/messages", dm(4003)));
    assert!(
        calls[1].at - calls[0].at >= Duration::from_secs(1),
        "a 429 waits at least a second"
    );
    // A 500 after Discord created the message: the retry carries the same nonce and
    // Discord returns that message instead of a copy.
    fake.fail_next_after_effect("POST", &format!("/channels/{}/messages", dm(4005)), 500);
    fake.dm(4005, "hello there");
    until(60, "the reply after the error", || {
        fake.replies(dm(4005)).len() == 1
    })
    .await;
    let statuses: Vec<u16> = fake
        .calls_to("POST", &format!("/channels/{}/messages", dm(4005)))
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, [500, 200]);
    assert_eq!(fake.texts(dm(4005)).len(), 1, "{:?}", fake.texts(dm(4005)));
    s.stop().await;

    // DMs switched off: a notice, nothing stored; /help and /forget still work there
    // (anyone can always have their data deleted).
    let (fake, s) = start(&[
        ("LORALOOP_DISCORD__DIRECT_MESSAGES", "false"),
        ("LORALOOP_DISCORD__ADMIN_ROLE", "71"),
    ])
    .await;
    fake.dm(4004, "hello");
    until(20, "the DM notice", || fake.texts(dm(4004)).len() == 1).await;
    assert!(fake.texts(dm(4004))[0].contains("direct messages"));
    assert_eq!(count(&s, "select count(*) from messages").await, 0);
    let help = fake.command(4004, None, dm(4004), "help", &[]);
    let forget = fake.command(4004, None, dm(4004), "forget", &[]);
    let reset = fake.command(4004, None, dm(4004), "reset", &[]);
    until(10, "three answers", || {
        [help, forget, reset]
            .iter()
            .all(|i| response(&fake, *i).is_some())
    })
    .await;
    let content = |i| {
        response(&fake, i).unwrap()["data"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(content(help).contains("/forget"), "{}", content(help));
    assert!(content(forget).contains("Sure?"), "{}", content(forget));
    assert!(
        content(reset).contains("direct messages"),
        "{}",
        content(reset)
    );
    // admin_role as an id: that role, not a role that happens to be named "71".
    fake.set_roles(GUILD, &[(71, "ops"), (80, "71")]);
    let by_id = fake.command(4006, Some(GUILD), CHANNEL, "status", &[71]);
    let by_name = fake.command(4007, Some(GUILD), CHANNEL, "status", &[80]);
    until(10, "two /status answers", || {
        edit(&fake, by_id).is_some() && edit(&fake, by_name).is_some()
    })
    .await;
    let text = |i| {
        edit(&fake, i).unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(text(by_id).contains("Active adapter"), "{}", text(by_id));
    assert!(
        text(by_name).starts_with("Not allowed"),
        "{}",
        text(by_name)
    );
    s.stop().await;
}

/// Stopping lets a reply being generated finish (and be recorded) before the bot is gone.
#[tokio::test]
async fn stop_lets_a_reply_in_progress_finish() {
    let (fake, s) = start(&[
        ("LORALOOP_GENERATION__MAX_NEW_TOKENS", "600"),
        ("LORALOOP_GENERATION__REPETITION_PENALTY", "2"),
    ])
    .await;
    // Too long for the model's context: the user is told, not left without an answer.
    fake.dm(4301, &"a very long message ".repeat(80));
    until(30, "the notice", || !fake.texts(dm(4301)).is_empty()).await;
    assert!(
        fake.texts(dm(4301))[0].contains("/reset starts a new one"),
        "{:?}",
        fake.texts(dm(4301))
    );

    let asked = fake.dm(4302, "Tell me a long story.");
    until(30, "the first words", || !fake.texts(dm(4302)).is_empty()).await;
    assert!(fake.replies(dm(4302)).is_empty(), "still generating");
    let db = s.server.state.db.clone();
    let started = Instant::now();
    s.server.stop().await.unwrap();
    eprintln!("stopped in {:?}", started.elapsed());
    assert_eq!(
        fake.replies(dm(4302)).len(),
        1,
        "the reply was completed before stop returned"
    );
    assert_eq!(update_status(&db, asked).await, "done");
    let calls = fake.calls().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.calls().len(), calls, "nothing after stop");
}

/// A gateway refusal at start (here 4014: the MESSAGE CONTENT intent is not switched on)
/// is logged when it happens, with what to do.
#[tokio::test]
async fn a_gateway_refusal_is_logged_at_once_with_what_to_do() {
    crate::support::capture_logs();
    let fake = FakeDiscord::start(TOKEN).await;
    fake.disallow_message_content();
    let s = crate::support::start(
        false,
        &[
            ("DISCORD_BOT_TOKEN", TOKEN),
            ("LORALOOP_DISCORD__API_URL", fake.api_url.as_str()),
        ],
    )
    .await;
    let logged = || {
        crate::support::logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("enable the MESSAGE CONTENT intent"))
    };
    until(20, "the error in the log", logged).await;
    assert!(!fake.identifies().is_empty());
    // The supervisor keeps trying (with backoff) and /healthz says why it is down.
    let mut h = serde_json::Value::Null;
    for _ in 0..100 {
        let r = s.http.get(s.url("/healthz")).send().await.unwrap();
        let status = r.status();
        h = r.json().await.unwrap();
        if h["parts"]["discord"]["state"] == "restarting" {
            assert_eq!(status, 503);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h["parts"]["discord"]["state"], "restarting", "{h}");
    assert!(
        h["parts"]["discord"]["last_error"]
            .as_str()
            .unwrap()
            .contains("MESSAGE CONTENT"),
        "{h}"
    );
    s.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_disconnect_resumes_and_answers_each_message_once() {
    let (fake, s) = start(&[]).await;
    let first = fake.dm(5001, "before the gap");
    until(30, "the first reply", || fake.replies(dm(5001)).len() == 1).await;
    // Heartbeats are answered, so the connection holds.
    until(10, "a heartbeat", || fake.heartbeats() >= 1).await;

    fake.disconnect();
    // Messages during the gap: Discord keeps them for the session and replays them.
    let mut gap = Vec::new();
    for u in [5002u64, 5003, 5004] {
        gap.push((u, fake.dm(u, "during the gap")));
    }
    // The replay also repeats the message answered before the gap (a redelivery).
    fake.replay_extra_on_resume(1);
    until(30, "the resume", || fake.is_live()).await;
    until(60, "every gap message answered", || {
        gap.iter().all(|(u, _)| fake.replies(dm(*u)).len() == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fake.identifies().len(), 1, "resumed, not identified again");
    let resumes = fake.resumes();
    assert_eq!(resumes.len(), 1);
    assert_eq!(resumes[0]["session_id"], "session-1");
    assert_eq!(resumes[0]["token"], "[the right token]");
    assert!(resumes[0]["seq"].as_u64().unwrap() >= 2);
    assert_eq!(
        fake.replies(dm(5001)).len(),
        1,
        "the redelivered message is not answered again"
    );
    for (u, mid) in &gap {
        assert_eq!(fake.replies(dm(*u)).len(), 1, "{u} answered once");
        assert_eq!(
            count(
                &s,
                &format!("select count(*) from messages where role = 'user' and platform_message_id = '{mid}'")
            )
            .await,
            1
        );
    }
    assert_eq!(
        count(
            &s,
            &format!("select count(*) from inbound_updates where update_key = '{first}'")
        )
        .await,
        1
    );
    // Marked done after the reply's reactions.
    wait_rows(
        s.server.state.db.pool(),
        "select count(*) from inbound_updates where status != 'done'",
        0,
    )
    .await;
    eprintln!("gateway connections: {:?}", fake.gateway_paths());
    assert_token_not_stored(&s);

    // Clean shutdown: the bot closes its gateway connection.
    s.stop().await;
    until(10, "the gateway connection to close", || fake.all_closed()).await;
    assert_token_not_logged();
}

/// The bot token is in no stored row: not in the database file nor its write-ahead log.
fn assert_token_not_stored(s: &crate::support::TestServer) {
    let db = &s.server.state.config.database_path;
    let mut files = 0;
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(bytes) = std::fs::read(&path) {
            files += 1;
            assert!(
                !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                "the bot token is in {path}"
            );
        }
    }
    assert!(files >= 1, "the database was read");
}

/// The bot token is in no log line (debug level, serenity and HTTP clients included).
fn assert_token_not_logged() {
    let logs = crate::support::logs();
    assert!(
        logs.contains("discord: connected as loraloop"),
        "the logs were captured"
    );
    assert!(!logs.contains(TOKEN), "the bot token is in the logs");
}

/// Routes send a Discord channel, a server or the bot's application to an assistant: the
/// most specific one answers (a thread goes by its parent channel).
#[tokio::test]
async fn routes_pick_the_assistant_by_channel_then_server_then_application() {
    let (fake, s) = start(&[]).await;
    for (name, scope, key) in [
        ("in-server", "guild", GUILD),
        ("in-channel", "channel", CHANNEL + 1),
        ("everywhere", "application", APP_ID),
    ] {
        let (status, a) = s
            .post_json(
                "/api/v1/assistants",
                &serde_json::json!({"name": name, "routes": [{"platform": "discord", "scope": scope, "key": key.to_string()}]}),
            )
            .await;
        assert_eq!(status, 201, "{a}");
    }
    fake.dm(3001, "hello in private");
    fake.guild_message(GUILD, CHANNEL, 3002, "hello in the server", true, None);
    fake.guild_message(GUILD, CHANNEL + 1, 3003, "hello in the channel", true, None);
    wait_rows(
        s.server.state.db.pool(),
        "select count(*) from messages where role = 'assistant'",
        3,
    )
    .await;
    let answered: Vec<(String, String)> = sqlx::query_as(
        "select u.content, a.name from messages u join conversations c on c.id = u.conversation_id
         join assistants a on a.id = c.assistant_id where u.role = 'user' order by u.content",
    )
    .fetch_all(s.server.state.db.pool())
    .await
    .unwrap();
    let pairs: Vec<(&str, &str)> = answered
        .iter()
        .map(|(t, a)| (t.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("hello in private", "everywhere"),
            ("hello in the channel", "in-channel"),
            ("hello in the server", "in-server"),
        ]
    );
    // The thread started for the server message keeps its assistant: its parent channel
    // routes nowhere more specific.
    let (thread, _) = *fake
        .threads()
        .iter()
        .find(|(_, parent)| *parent == CHANNEL)
        .unwrap();
    fake.guild_message(GUILD, thread, 3002, "more in the thread", false, None);
    wait_rows(
        s.server.state.db.pool(),
        "select count(*) from messages m join conversations c on c.id = m.conversation_id
         join assistants a on a.id = c.assistant_id where a.name = 'in-server' and m.role = 'assistant'",
        2,
    )
    .await;
    s.stop().await;
}

/// Messages sent while the bot was down never come over the gateway (a new session starts
/// from now): after the restart the bot reads the history of the channels it answered in
/// and answers them, once, in a DM and in its thread on a server.
#[tokio::test]
async fn messages_sent_while_the_bot_was_down_are_answered_after_it_returns() {
    let (fake, first) = start(&[]).await;
    fake.dm(4701, "Hello before the downtime.");
    until(30, "the DM reply", || fake.replies(dm(4701)).len() == 1).await;
    fake.guild_message(GUILD, CHANNEL, 4702, "what is Zorblax?", true, None);
    until(30, "the thread and its reply", || {
        fake.threads()
            .first()
            .is_some_and(|(t, _)| fake.replies(*t).len() == 1)
    })
    .await;
    let thread = fake.threads()[0].0;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    server.stop().await.unwrap();
    until(10, "the gateway connection to close", || fake.all_closed()).await;

    // While it is down: a DM, a message in its thread, and chatter it must not answer.
    let missed_dm = fake.dm(4701, "Are you there?");
    let missed_thread = fake.guild_message(GUILD, thread, 4702, "and its capital?", false, None);
    fake.guild_message(
        GUILD,
        CHANNEL,
        4703,
        "just chatting, no mention",
        false,
        None,
    );

    let server = crate::support::start_config(config).await;
    until(30, "both missed messages answered", || {
        fake.replies(dm(4701)).len() == 2 && fake.replies(thread).len() == 2
    })
    .await;
    let db = &server.state.db;
    // The replies are shown, then the messages are marked done: wait for the marks.
    wait_rows(
        db.pool(),
        &format!(
            "select count(*) from inbound_updates where status = 'done' and update_key in ('{missed_dm}', '{missed_thread}')"
        ),
        2,
    )
    .await;
    // Read from the history, the thread's message is in its server's conversation.
    let (in_thread,): (i64,) = sqlx::query_as(
        "select count(*) from messages m join conversations c on c.id = m.conversation_id
         where m.role = 'user' and c.platform_thread_id = ?",
    )
    .bind(thread.to_string())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        in_thread, 2,
        "both thread messages in the thread's conversation"
    );
    // A second restart reads the same history again and answers nothing twice.
    let config = server.state.config.clone();
    server.stop().await.unwrap();
    let server = crate::support::start_config(config).await;
    until(20, "the bot to connect again", || fake.is_live()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.replies(dm(4701)).len(), 2);
    assert_eq!(fake.replies(thread).len(), 2);
    assert!(
        fake.texts(CHANNEL).is_empty(),
        "the chatter is not answered"
    );
    server.stop().await.unwrap();
    drop(dir);
}

/// The `channel_cursors` row of a channel: where the next start reads its history from.
async fn cursor(db: &sqlx::SqlitePool, channel: u64) -> i64 {
    let (last,): (i64,) =
        sqlx::query_as("select last_message_id from channel_cursors where channel = ?")
            .bind(channel.to_string())
            .fetch_one(db)
            .await
            .unwrap();
    last
}

/// The bot answers a first DM from `user` (so its channel has a cursor), then the server
/// stops: the fake, the config to start it again with, and its folder.
async fn answered_then_stopped(
    user: u64,
) -> (FakeDiscord, loraloop_core::Config, tempfile::TempDir) {
    let (fake, first) = start(&[]).await;
    fake.dm(user, "Hello.");
    until(30, "the first reply", || fake.replies(dm(user)).len() == 1).await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    server.stop().await.unwrap();
    until(10, "the gateway connection to close", || fake.all_closed()).await;
    (fake, config, dir)
}

/// `user` writes again while the message `missed` is still unread: once that is stored,
/// the channel's cursor must still be before `missed`. The new message's id.
async fn write_while_unread(
    fake: &FakeDiscord,
    db: &sqlx::SqlitePool,
    user: u64,
    missed: u64,
) -> u64 {
    let live = fake.dm(user, "Sent after it returned.");
    wait_rows(
        db,
        &format!("select count(*) from inbound_updates where update_key = '{live}'"),
        1,
    )
    .await;
    assert!(
        cursor(db, dm(user)).await < missed as i64,
        "the cursor passed a message that is not stored"
    );
    live
}

/// A message sent while the bot was down is still being read from the history when a
/// newer one comes over the gateway: the newer one is stored, but the cursor (where the next
/// start reads from) does not pass the older one until that is stored too. Before, a kill
/// in between lost the older message for good (the crash campaign's "unanswered 0 + 1").
#[tokio::test]
async fn a_newer_message_does_not_move_the_cursor_past_one_still_to_read() {
    let (fake, config, dir) = answered_then_stopped(4901).await;

    let missed = fake.dm(4901, "Sent while the bot was down.");
    fake.set_history_delay(Some(Duration::from_secs(3)));
    let server = crate::support::start_config(config).await;
    until(20, "the bot to connect again", || fake.is_live()).await;
    let db = server.state.db.pool().clone();
    let live = write_while_unread(&fake, &db, 4901, missed).await;
    let (missed_stored,): (i64,) =
        sqlx::query_as("select count(*) from inbound_updates where update_key = ?")
            .bind(missed.to_string())
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(missed_stored, 0, "the history is still on its way");
    fake.set_history_delay(None);
    until(30, "both messages answered", || {
        fake.replies(dm(4901)).len() == 3
    })
    .await;
    wait_rows(
        &db,
        &format!(
            "select count(*) from channel_cursors where channel = '{}' and last_message_id >= {live}",
            dm(4901)
        ),
        1,
    )
    .await;
    server.stop().await.unwrap();
    drop(dir);
}

/// Discord refuses the first read of a channel's history after the restart (a 403): the
/// newer message that comes over the gateway does not move the cursor past the one missed,
/// and the channel is read again a little later, when both are answered.
#[tokio::test]
async fn a_history_that_cannot_be_read_is_read_again_and_holds_the_cursor_meanwhile() {
    let (fake, config, dir) = answered_then_stopped(4904).await;

    let missed = fake.dm(4904, "Sent while the bot was down.");
    fake.fail_next("GET", &format!("/channels/{}/messages", dm(4904)), 403);
    let server = crate::support::start_config(config).await;
    until(20, "the bot to connect again", || fake.is_live()).await;
    until(10, "the refused history read", || {
        fake.calls_to("GET", &format!("/channels/{}/messages", dm(4904)))
            .iter()
            .any(|c| c.status == 403)
    })
    .await;
    let db = server.state.db.pool().clone();
    write_while_unread(&fake, &db, 4904, missed).await;
    until(40, "both messages answered", || {
        fake.replies(dm(4904)).len() == 3
    })
    .await;
    server.stop().await.unwrap();
    drop(dir);
}

/// What a kill between two stores leaves (gateway events are handled in parallel, the newer
/// message stored first): the newer one stored, the cursor past the older one that is not.
/// The next start reads the history from a minute before the cursor: the older message is
/// answered, the newer one once.
#[tokio::test]
async fn a_message_the_cursor_passed_unstored_is_answered_after_a_restart() {
    let (fake, config, dir) = answered_then_stopped(4902).await;

    let older = fake.dm(4902, "The first of two.");
    let newer = fake.dm(4902, "The second of two.");
    let db = loraloop_core::storage::Db::open(&config.database_path)
        .await
        .unwrap();
    let payload = fake
        .dispatched_message(newer)
        .expect("dispatched")
        .to_string();
    let discord = loraloop_core::storage::Platform::Discord;
    assert!(
        db.store_update(discord, &newer.to_string(), &payload)
            .await
            .unwrap()
    );
    db.advance_cursor(discord, &dm(4902).to_string(), None, newer as i64)
        .await
        .unwrap();
    drop(db);

    let server = crate::support::start_config(config).await;
    until(30, "both messages answered", || {
        fake.replies(dm(4902)).len() == 3
    })
    .await;
    let db = server.state.db.pool().clone();
    wait_rows(
        &db,
        &format!(
            "select count(*) from inbound_updates where status = 'done' and update_key in ('{older}', '{newer}')"
        ),
        2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.replies(dm(4902)).len(), 3, "each answered once");
    server.stop().await.unwrap();
    drop(dir);
}

/// The process stops after Discord created the reply's first message and before the bot
/// heard back, so the message's id is not recorded. After the restart the reply is
/// generated again and its first send carries the same nonce: Discord returns the message
/// it made, and the reply finishes in it. One message in the channel, not two.
#[tokio::test]
async fn a_reply_sent_just_before_the_process_stopped_is_finished_not_repeated() {
    let (fake, first) = start(&[]).await;
    fake.hang_next_after_effect("POST", &format!("/channels/{}/messages", dm(4903)));
    let asked = fake.dm(4903, "Hello.");
    until(30, "the reply's first message created", || {
        !fake.texts(dm(4903)).is_empty()
    })
    .await;
    let config = first.server.state.config.clone();
    let crate::support::TestServer { server, dir, .. } = first;
    // The reply waits on the unanswered send: the stop cuts it off after its deadline.
    server.stop().await.unwrap();
    until(10, "the gateway connection to close", || fake.all_closed()).await;

    let server = crate::support::start_config(config).await;
    let db = server.state.db.pool().clone();
    wait_rows(
        &db,
        &format!(
            "select count(*) from inbound_updates where status = 'done' and update_key = '{asked}'"
        ),
        1,
    )
    .await;
    let sent: Vec<_> = fake
        .sent()
        .into_iter()
        .filter(|m| m.channel == dm(4903))
        .collect();
    assert_eq!(sent.len(), 1, "one message for the reply: {sent:?}");
    let (stored,): (String,) = sqlx::query_as(
        "select content from messages where role = 'assistant' and platform_message_id = ?",
    )
    .bind(sent[0].id.to_string())
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        sent[0].text(),
        shown(&stored),
        "the message holds the whole reply"
    );
    server.stop().await.unwrap();
    drop(dir);
}

/// The database refuses to store a message (every retry fails): it is not lost, the bot
/// reads the channel's history again a little later and answers it then.
#[tokio::test]
async fn a_message_that_could_not_be_stored_is_read_again_and_answered() {
    let (fake, s) = start(&[]).await;
    fake.dm(4801, "Hello.");
    until(30, "the first reply", || fake.replies(dm(4801)).len() == 1).await;
    let db = s.server.state.db.clone();
    // Every store of a Discord message fails, as a broken disk would make it.
    sqlx::query(
        "create trigger refuse_discord before insert on inbound_updates when new.platform = 'discord'
         begin select raise(abort, 'disk I/O error (injected)'); end",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let lost = fake.dm(4801, "Did you get this?");
    until(20, "the failure in the log", || {
        crate::support::logs().contains("cannot store a message")
    })
    .await;
    sqlx::query("drop trigger refuse_discord")
        .execute(db.pool())
        .await
        .unwrap();
    until(
        30,
        "the reply to the message that could not be stored",
        || fake.replies(dm(4801)).len() == 2,
    )
    .await;
    wait_rows(
        db.pool(),
        &format!(
            "select count(*) from inbound_updates where status = 'done' and update_key = '{lost}'"
        ),
        1,
    )
    .await;
    s.stop().await;
}
