//! Conversations that arrive whole, turn after turn: `/v1/chat/completions` (each request
//! carries the history) and `loraloop chat`. Stored like the bots' so they feed the
//! learning loop: one chat and one user per caller (the API's `user` field, else the API
//! key; the CLI's session), and a request that continues the caller's open conversation
//! (its earlier messages are exactly what is stored there) is appended to it, anything
//! else starts a new conversation holding the earlier messages it brought.

use crate::domain::Role;
use crate::error::Result;
use crate::storage::{Db, NewMessage, Platform};
use loraloop_model::template::TemplateMessage;

/// One message of a whole-conversation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Said {
    pub role: Role,
    pub text: String,
}

/// The user and assistant messages of a prompt, to store (system messages are the
/// assistant's business, not the conversation's).
pub fn said_of(messages: &[TemplateMessage]) -> Vec<Said> {
    messages
        .iter()
        .filter_map(|m| {
            let role = match m.role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                _ => return None,
            };
            Some(Said {
                role,
                text: m.content.clone(),
            })
        })
        .collect()
}

/// Where a recorded turn's reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub conversation_id: i64,
    pub user_message_id: i64,
}

/// Store the last message of `messages` (a user message) in `caller`'s conversation with
/// the assistant, continuing the open one when `messages` continues it. None when there
/// is nothing to store (the last message is not the user's, or it is empty). System
/// messages are not stored: a conversation's system prompt is its assistant's.
pub async fn record_turn(
    db: &Db,
    platform: Platform,
    caller: &str,
    assistant_id: i64,
    messages: &[Said],
) -> Result<Option<Recorded>> {
    let said: Vec<&Said> = messages.iter().filter(|m| m.role != Role::System).collect();
    let Some((last, earlier)) = said.split_last() else {
        return Ok(None);
    };
    if last.role != Role::User || last.text.trim().is_empty() {
        return Ok(None);
    }
    // What is stored is read, compared and appended to as one: two requests of a caller
    // at once (a client sending branches of one history in parallel) each continued the
    // same conversation, and it held both turns, interleaved.
    let _one_at_a_time = caller_lock(platform, caller).lock().await;
    let user = db
        .upsert_platform_user(platform, caller, Some(caller), None)
        .await?;
    let chat = db
        .upsert_chat(platform, caller, "private", Some(caller))
        .await?;
    let open = db
        .current_conversation(assistant_id, chat, None, Some(user.id))
        .await?;
    let stored = db.recent_messages(open.id, i64::MAX).await?;
    let continues = stored.len() == earlier.len()
        && stored
            .iter()
            .zip(earlier)
            .all(|(s, m)| s.role == m.role.as_str() && s.content == m.text);
    let conversation_id = if continues {
        open.id
    } else {
        let empty = stored.is_empty();
        if !empty {
            db.close_conversations(chat, None, Some(assistant_id))
                .await?;
        }
        let conv = if empty {
            open
        } else {
            db.current_conversation(assistant_id, chat, None, Some(user.id))
                .await?
        };
        for m in earlier {
            db.insert_message(&message(conv.id, m, Some(user.id)))
                .await?;
        }
        conv.id
    };
    let user_message = db
        .insert_message(&message(conversation_id, last, Some(user.id)))
        .await?;
    Ok(Some(Recorded {
        conversation_id,
        user_message_id: user_message.id,
    }))
}

/// Locks for recording turns, a caller always on the same one: a fixed set (striped by
/// the caller's hash), so callers never grow a map. Within one process, which is where
/// a caller's requests arrive (the API in `serve`, a `loraloop chat` session).
fn caller_lock(platform: Platform, caller: &str) -> &'static tokio::sync::Mutex<()> {
    use std::hash::{Hash, Hasher};
    static LOCKS: [tokio::sync::Mutex<()>; 64] = [const { tokio::sync::Mutex::const_new(()) }; 64];
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (platform.as_str(), caller).hash(&mut h);
    &LOCKS[(h.finish() % LOCKS.len() as u64) as usize]
}

fn message(conversation_id: i64, m: &Said, user_id: Option<i64>) -> NewMessage<'_> {
    NewMessage {
        conversation_id,
        role: m.role,
        content: &m.text,
        user_id: (m.role == Role::User).then_some(user_id).flatten(),
        platform_message_id: None,
        adapter_id: None,
        adapter_name: None,
        prompt_tokens: None,
        completion_tokens: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(role: Role, text: &str) -> Said {
        Said {
            role,
            text: text.into(),
        }
    }

    async fn texts(db: &Db, conversation: i64) -> Vec<String> {
        db.recent_messages(conversation, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|m| format!("{}:{}", m.role, m.content))
            .collect()
    }

    /// A fresh database with one assistant: (its folder, the database, the assistant's id).
    async fn db_with_assistant() -> (tempfile::TempDir, Db, i64) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let generation = serde_json::json!({});
        let a = db
            .create_assistant(
                "helper",
                "m",
                &crate::storage::AssistantSettings {
                    system_prompt: "",
                    generation: &generation,
                    activation: None,
                },
            )
            .await
            .unwrap()
            .id;
        (dir, db, a)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn continuations_sent_at_once_each_get_a_conversation_that_holds_only_their_own_turn() {
        let (_dir, db, a) = db_with_assistant().await;
        for round in 0..5 {
            let caller = format!("caller-{round}");
            let history = vec![said(Role::User, "hi"), said(Role::Assistant, "hello")];
            let tasks: Vec<_> = (0..6)
                .map(|i| {
                    let (db, caller) = (db.clone(), caller.clone());
                    let mut messages = history.clone();
                    messages.push(said(Role::User, &format!("branch {i}")));
                    tokio::spawn(async move {
                        record_turn(&db, Platform::Api, &caller, a, &messages)
                            .await
                            .unwrap()
                            .unwrap()
                    })
                })
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                let r = t.await.unwrap();
                // Each branch's conversation is the history and that branch alone.
                assert_eq!(
                    texts(&db, r.conversation_id).await,
                    ["user:hi", "assistant:hello", &format!("user:branch {i}")],
                    "round {round}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_continued_conversation_is_appended_and_a_new_one_starts_fresh() {
        let (_dir, db, a) = db_with_assistant().await;
        let first = vec![said(Role::System, "be brief"), said(Role::User, "hi")];
        let r1 = record_turn(&db, Platform::Api, "key", a, &first)
            .await
            .unwrap()
            .unwrap();
        db.insert_message(&NewMessage {
            conversation_id: r1.conversation_id,
            role: Role::Assistant,
            content: "hello",
            user_id: None,
            platform_message_id: None,
            adapter_id: None,
            adapter_name: None,
            prompt_tokens: None,
            completion_tokens: None,
        })
        .await
        .unwrap();
        // The client sends the history back with one more message: the same conversation.
        let second = vec![
            said(Role::System, "be brief"),
            said(Role::User, "hi"),
            said(Role::Assistant, "hello"),
            said(Role::User, "how are you?"),
        ];
        let r2 = record_turn(&db, Platform::Api, "key", a, &second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r2.conversation_id, r1.conversation_id);
        assert_eq!(
            texts(&db, r1.conversation_id).await,
            ["user:hi", "assistant:hello", "user:how are you?"]
        );
        // Another history: a new conversation with what it brought.
        let other = vec![
            said(Role::User, "q1"),
            said(Role::Assistant, "a1"),
            said(Role::User, "q2"),
        ];
        let r3 = record_turn(&db, Platform::Api, "key", a, &other)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(r3.conversation_id, r1.conversation_id);
        assert_eq!(
            texts(&db, r3.conversation_id).await,
            ["user:q1", "assistant:a1", "user:q2"]
        );
        // Another caller never joins this one's conversation.
        let r4 = record_turn(&db, Platform::Api, "someone-else", a, &other[..1])
            .await
            .unwrap()
            .unwrap();
        assert_ne!(r4.conversation_id, r3.conversation_id);
        // Nothing to store: an assistant prefill, an empty message.
        assert_eq!(
            record_turn(&db, Platform::Api, "key", a, &other[..2])
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            record_turn(&db, Platform::Api, "key", a, &[said(Role::User, "  ")])
                .await
                .unwrap(),
            None
        );
    }
}
