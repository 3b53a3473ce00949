//! Platform users, chats, conversations, messages and feedback: what the chat service
//! stores for every turn on every platform.

use super::sql::Found;
use super::{Db, Result, StorageError, sql};
use crate::domain::Role;
use serde::Serialize;

crate::keywords! {
    /// Where a conversation happens.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Platform ("platform") {
        Telegram = "telegram",
        Discord = "discord",
        Web = "web",
        Cli = "cli",
        Api = "api",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PlatformUser {
    pub id: i64,
    pub platform: String,
    pub platform_user_id: String,
    pub username: Option<String>,
    pub display_name: Option<String>,
    pub excluded_from_training: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Conversation {
    pub id: i64,
    pub assistant_id: i64,
    pub chat_id: Option<i64>,
    pub user_id: Option<i64>,
    pub platform_thread_id: Option<String>,
    pub excluded_from_training: bool,
    pub closed_at: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub conversation_id: i64,
    pub role: Role,
    pub content: &'a str,
    pub user_id: Option<i64>,
    pub platform_message_id: Option<&'a str>,
    pub adapter_id: Option<i64>,
    pub adapter_name: Option<&'a str>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StoredMessage {
    pub id: i64,
    pub conversation_id: i64,
    pub role: String,
    pub content: String,
    pub user_id: Option<i64>,
    pub platform_message_id: Option<String>,
    pub adapter_id: Option<i64>,
    pub adapter_name: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Feedback {
    pub id: i64,
    pub message_id: i64,
    pub rater: String,
    pub rating: Option<i64>,
    pub correction: Option<String>,
}

const CONVERSATION_COLUMNS: &str = "id, assistant_id, chat_id, user_id, platform_thread_id, excluded_from_training, closed_at, created_at";
const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, user_id, platform_message_id, adapter_id, adapter_name, prompt_tokens, completion_tokens, created_at";

impl Db {
    /// The user with this platform id, created on first sight; names are refreshed.
    pub async fn upsert_platform_user(
        &self,
        platform: Platform,
        platform_user_id: &str,
        username: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<PlatformUser> {
        sql::one(
            self.pool(),
            "insert into platform_users (platform, platform_user_id, username, display_name)
             values (?, ?, ?, ?)
             on conflict (platform, platform_user_id) do update
               set username = excluded.username, display_name = excluded.display_name
             returning id, platform, platform_user_id, username, display_name, excluded_from_training",
            (platform.as_str(), platform_user_id, username, display_name),
        )
        .await
    }

    /// The chat with this platform id, created on first sight. Returns its row id.
    pub async fn upsert_chat(
        &self,
        platform: Platform,
        platform_chat_id: &str,
        kind: &str,
        title: Option<&str>,
    ) -> Result<i64> {
        let (id,): (i64,) = sql::one(
            self.pool(),
            "insert into chats (platform, platform_chat_id, kind, title) values (?, ?, ?, ?)
             on conflict (platform, platform_chat_id) do update set title = excluded.title
             returning id",
            (platform.as_str(), platform_chat_id, kind, title),
        )
        .await?;
        Ok(id)
    }

    /// The open conversation of a chat (and thread) with the assistant, or a new one. The
    /// same chat may hold one open conversation per assistant (a private chat with two
    /// bots has one chat id on Telegram).
    pub async fn current_conversation(
        &self,
        assistant_id: i64,
        chat_id: i64,
        thread_id: Option<&str>,
        user_id: Option<i64>,
    ) -> Result<Conversation> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let open: Option<Conversation> = sql::optional(
            &mut *tx,
            &format!(
                "select {CONVERSATION_COLUMNS} from conversations
                 where chat_id = ? and platform_thread_id is ? and assistant_id = ? and closed_at is null
                 order by id desc limit 1"
            ),
            (chat_id, thread_id, assistant_id),
        )
        .await?;
        let conv = match open {
            Some(c) => c,
            None => {
                sql::one(
                    &mut *tx,
                    &format!(
                    "insert into conversations (assistant_id, chat_id, platform_thread_id, user_id)
                         values (?, ?, ?, ?) returning {CONVERSATION_COLUMNS}"
                ),
                    (assistant_id, chat_id, thread_id, user_id),
                )
                .await?
            }
        };
        tx.commit().await?;
        Ok(conv)
    }

    /// The open conversation of a platform chat with the assistant, if there is one
    /// (nothing is created: for pages that only show it).
    pub async fn open_conversation(
        &self,
        platform: Platform,
        platform_chat_id: &str,
        assistant_id: i64,
    ) -> Result<Option<i64>> {
        sql::value(
            self.pool(),
            "select c.id from conversations c join chats ch on ch.id = c.chat_id
             where ch.platform = ? and ch.platform_chat_id = ? and c.platform_thread_id is null
               and c.assistant_id = ? and c.closed_at is null
             order by c.id desc limit 1",
            (platform.as_str(), platform_chat_id, assistant_id),
        )
        .await
    }

    /// Whether message `message_id` is in a conversation of the platform chat `chat_key`
    /// (a rating button may only rate a reply in the chat it was pressed in).
    pub async fn message_in_chat(
        &self,
        message_id: i64,
        platform: Platform,
        chat_key: &str,
    ) -> Result<bool> {
        let found: Option<i64> = sql::value(
            self.pool(),
            "select m.id from messages m join conversations c on c.id = m.conversation_id
             join chats ch on ch.id = c.chat_id
             where m.id = ? and ch.platform = ? and ch.platform_chat_id = ?",
            (message_id, platform.as_str(), chat_key),
        )
        .await?;
        Ok(found.is_some())
    }

    /// Close a chat's open conversation (`/reset`) with the assistant (None: with every
    /// assistant): the next message starts a new one.
    pub async fn close_conversations(
        &self,
        chat_id: i64,
        thread_id: Option<&str>,
        assistant_id: Option<i64>,
    ) -> Result<u64> {
        Ok(sql::execute(
            self.pool(),
            "update conversations set closed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             where chat_id = ? and platform_thread_id is ? and closed_at is null
                and (?3 is null or assistant_id = ?3)",
            (chat_id, thread_id, assistant_id),
        )
        .await?
        .rows_affected())
    }

    /// Store a message. A platform message already stored (same conversation, role and
    /// platform id, e.g. a redelivered update) is returned instead of stored twice.
    pub async fn insert_message(&self, m: &NewMessage<'_>) -> Result<StoredMessage> {
        let inserted: Option<StoredMessage> = sql::optional(
            self.pool(),
            &format!(
                "insert into messages (conversation_id, role, content, user_id, platform_message_id,
                                       adapter_id, adapter_name, prompt_tokens, completion_tokens)
                 values (?, ?, ?, ?, ?, ?, ?, ?, ?)
                 on conflict do nothing
                 returning {MESSAGE_COLUMNS}"
            ),
            (
                m.conversation_id,
                m.role.as_str(),
                m.content,
                m.user_id,
                m.platform_message_id,
                m.adapter_id,
                m.adapter_name,
                m.prompt_tokens,
                m.completion_tokens,
            ),
        )
        .await?;
        match inserted {
            Some(msg) => Ok(msg),
            None => Ok(sql::one(
                self.pool(),
                &format!(
                    "select {MESSAGE_COLUMNS} from messages
                     where conversation_id = ? and role = ? and platform_message_id = ?"
                ),
                (m.conversation_id, m.role.as_str(), m.platform_message_id),
            )
            .await?),
        }
    }

    /// Remove a message nothing refers to yet (a user message whose reply was refused).
    pub async fn delete_unanswered_message(&self, message_id: i64) -> Result<()> {
        sql::execute(
            self.pool(),
            "delete from messages where id = ?",
            (message_id,),
        )
        .await?;
        Ok(())
    }

    /// The last `limit` messages of a conversation, oldest first.
    pub async fn recent_messages(
        &self,
        conversation_id: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>> {
        let mut rows: Vec<StoredMessage> = sql::all(
            self.pool(),
            &format!(
                "select {MESSAGE_COLUMNS} from messages where conversation_id = ? order by id desc limit ?"
            ),
            (conversation_id, limit),
        )
        .await?;
        rows.reverse();
        Ok(rows)
    }

    /// The conversation an (assistant) message belongs to; an error naming the problem
    /// when the message does not exist or is not a reply.
    pub async fn reply_conversation(&self, message_id: i64) -> Result<i64> {
        let row: Option<(String, i64)> = sql::optional(
            self.pool(),
            "select role, conversation_id from messages where id = ?",
            (message_id,),
        )
        .await?;
        let (role, conversation) = row.found(|| format!("message {message_id}"))?;
        if role != Role::Assistant.as_str() {
            return Err(StorageError::Invalid {
                what: "feedback".into(),
                message: "only assistant replies can be rated or corrected".into(),
            });
        }
        Ok(conversation)
    }

    /// Record a rating and/or a correction by `rater` on an assistant message; giving
    /// feedback again replaces the earlier one.
    pub async fn set_feedback(
        &self,
        message_id: i64,
        rater: &str,
        user_id: Option<i64>,
        rating: Option<i64>,
        correction: Option<&str>,
    ) -> Result<Feedback> {
        if rating.is_some_and(|r| r != 1 && r != -1) {
            return Err(StorageError::Invalid {
                what: "rating".into(),
                message: "use 1 (thumbs up) or -1 (thumbs down)".into(),
            });
        }
        self.reply_conversation(message_id).await?;
        sql::one(
            self.pool(),
            "insert into feedback (message_id, rater, user_id, rating, correction) values (?, ?, ?, ?, ?)
             on conflict (message_id, rater) do update
               set rating = excluded.rating, correction = excluded.correction,
                   updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             returning id, message_id, rater, rating, correction",
            (message_id, rater, user_id, rating, correction),
        )
        .await
    }

    /// Remove `rater`'s rating of a message only if it is `rating` (a platform reaction
    /// removed: 👍 taken back after 👎 replaced it keeps the 👎). Each statement checks the
    /// rating itself, so a removal handled before or after a concurrent new rating leaves the
    /// right one. A correction in the same row stays. True if a rating was removed.
    pub async fn remove_rating(&self, message_id: i64, rater: &str, rating: i64) -> Result<bool> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let deleted = sql::execute(
            &mut *tx,
            "delete from feedback where message_id = ? and rater = ? and rating = ?
               and correction is null",
            (message_id, rater, rating),
        )
        .await?
        .rows_affected();
        let cleared = sql::execute(
            &mut *tx,
            "update feedback set rating = null, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             where message_id = ? and rater = ? and rating = ?",
            (message_id, rater, rating),
        )
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted + cleared == 1)
    }

    /// Record the platform's id for a stored message (a reply once the platform took it).
    pub async fn set_platform_message_id(
        &self,
        message_id: i64,
        platform_message_id: &str,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update messages set platform_message_id = ? where id = ?",
            (platform_message_id, message_id),
        )
        .await?;
        Ok(())
    }

    /// The assistant reply sent on `platform` as the platform message `platform_message_id`
    /// (the id of its first part).
    pub async fn reply_by_platform_id(
        &self,
        platform: Platform,
        platform_message_id: &str,
    ) -> Result<Option<StoredMessage>> {
        sql::optional(
            self.pool(),
            &format!(
                "select {} from messages m join conversations c on c.id = m.conversation_id
                   join chats ch on ch.id = c.chat_id
                 where ch.platform = ? and m.role = 'assistant' and m.platform_message_id = ?
                 order by m.id desc limit 1",
                Self::qualified(MESSAGE_COLUMNS, "m")
            ),
            (platform.as_str(), platform_message_id),
        )
        .await
    }

    /// The reply already stored for the user's platform message `platform_message_id` in a
    /// conversation (the first assistant message after it, before the next user message):
    /// a replayed update reuses it instead of generating again.
    pub async fn stored_reply_to(
        &self,
        conversation_id: i64,
        platform_message_id: &str,
    ) -> Result<Option<StoredMessage>> {
        sql::optional(
            self.pool(),
            &format!(
                "select {} from messages u join messages a
                   on a.conversation_id = u.conversation_id and a.role = 'assistant' and a.id > u.id
                 where u.conversation_id = ? and u.role = 'user' and u.platform_message_id = ?
                   and not exists (select 1 from messages x where x.conversation_id = u.conversation_id
                                   and x.role = 'user' and x.id > u.id and x.id < a.id)
                 order by a.id limit 1",
                Self::qualified(MESSAGE_COLUMNS, "a")
            ),
            (conversation_id, platform_message_id),
        )
        .await
    }

    /// The row id of a platform user already stored.
    pub async fn platform_user_row(
        &self,
        platform: Platform,
        user_id: &str,
    ) -> Result<Option<i64>> {
        let row: Option<(i64,)> = sql::optional(
            self.pool(),
            "select id from platform_users where platform = ? and platform_user_id = ?",
            (platform.as_str(), user_id),
        )
        .await?;
        Ok(row.map(|(id,)| id))
    }

    /// The row id of a platform chat already stored.
    pub async fn chat_row(&self, platform: Platform, chat_id: &str) -> Result<Option<i64>> {
        let row: Option<(i64,)> = sql::optional(
            self.pool(),
            "select id from chats where platform = ? and platform_chat_id = ?",
            (platform.as_str(), chat_id),
        )
        .await?;
        Ok(row.map(|(id,)| id))
    }

    /// The chat a platform thread belongs to, if any conversation of it was stored (the
    /// Discord bot's threads: it stores a conversation for each thread it starts): the
    /// chat's row id and platform id.
    pub async fn chat_of_thread(
        &self,
        platform: Platform,
        thread_id: &str,
    ) -> Result<Option<(i64, String)>> {
        sql::optional(
            self.pool(),
            "select ch.id, ch.platform_chat_id from conversations c join chats ch on ch.id = c.chat_id
             where ch.platform = ? and c.platform_thread_id = ? order by c.id limit 1",
            (platform.as_str(), thread_id),
        )
        .await
    }

    /// Remember a platform update; false if it was seen before (redelivery).
    pub async fn mark_update_seen(&self, platform: Platform, key: &str) -> Result<bool> {
        let done = sql::execute(
            self.pool(),
            "insert into inbound_updates (platform, update_key) values (?, ?) on conflict do nothing",
            (platform.as_str(), key),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    async fn setup(db: &Db) -> (i64, PlatformUser, i64) {
        let assistant = db
            .ensure_assistant("loraloop", "model.gguf", "Be nice.")
            .await
            .unwrap();
        let user = db
            .upsert_platform_user(Platform::Telegram, "42", Some("ann"), Some("Ann"))
            .await
            .unwrap();
        let chat = db
            .upsert_chat(Platform::Telegram, "42", "private", None)
            .await
            .unwrap();
        (assistant.id, user, chat)
    }

    fn msg<'a>(
        conv: i64,
        role: Role,
        content: &'a str,
        user: Option<i64>,
        pid: Option<&'a str>,
    ) -> NewMessage<'a> {
        NewMessage {
            conversation_id: conv,
            role,
            content,
            user_id: user,
            platform_message_id: pid,
            adapter_id: None,
            adapter_name: None,
            prompt_tokens: None,
            completion_tokens: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_same_platform_user_and_chat_map_to_one_row(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let a = db
            .upsert_platform_user(Platform::Telegram, "42", Some("ann"), None)
            .await
            .unwrap();
        let b = db
            .upsert_platform_user(Platform::Telegram, "42", Some("ann2"), None)
            .await
            .unwrap();
        let c = db
            .upsert_platform_user(Platform::Discord, "42", None, None)
            .await
            .unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(b.username.as_deref(), Some("ann2"));
        assert_ne!(a.id, c.id);
        let c1 = db
            .upsert_chat(Platform::Telegram, "-100", "group", Some("g"))
            .await
            .unwrap();
        let c2 = db
            .upsert_chat(Platform::Telegram, "-100", "group", Some("g"))
            .await
            .unwrap();
        assert_eq!(c1, c2);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_redelivered_message_is_stored_once_and_reset_starts_a_new_conversation(
        pool: SqlitePool,
    ) {
        let db = Db::from_pool(pool);
        let (assistant, user, chat) = setup(&db).await;
        let conv = db
            .current_conversation(assistant, chat, None, Some(user.id))
            .await
            .unwrap();
        let m1 = db
            .insert_message(&msg(conv.id, Role::User, "hi", Some(user.id), Some("7")))
            .await
            .unwrap();
        let m2 = db
            .insert_message(&msg(conv.id, Role::User, "hi", Some(user.id), Some("7")))
            .await
            .unwrap();
        assert_eq!(m1.id, m2.id);
        db.insert_message(&msg(conv.id, Role::Assistant, "hello!", None, Some("8")))
            .await
            .unwrap();
        let recent = db.recent_messages(conv.id, 10).await.unwrap();
        assert_eq!(
            recent
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>(),
            ["hi", "hello!"]
        );
        assert_eq!(
            db.current_conversation(assistant, chat, None, None)
                .await
                .unwrap()
                .id,
            conv.id
        );
        assert_eq!(db.close_conversations(chat, None, None).await.unwrap(), 1);
        let next = db
            .current_conversation(assistant, chat, None, None)
            .await
            .unwrap();
        assert_ne!(next.id, conv.id);
        // Threads of one chat are separate conversations.
        let thread = db
            .current_conversation(assistant, chat, Some("t1"), None)
            .await
            .unwrap();
        assert_ne!(thread.id, next.id);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn rating_again_replaces_the_rating_and_only_replies_can_be_rated(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let (assistant, user, chat) = setup(&db).await;
        let conv = db
            .current_conversation(assistant, chat, None, Some(user.id))
            .await
            .unwrap();
        let q = db
            .insert_message(&msg(conv.id, Role::User, "q", Some(user.id), None))
            .await
            .unwrap();
        let a = db
            .insert_message(&msg(conv.id, Role::Assistant, "a", None, None))
            .await
            .unwrap();
        db.set_feedback(a.id, "telegram:42", Some(user.id), Some(1), None)
            .await
            .unwrap();
        let f = db
            .set_feedback(a.id, "telegram:42", Some(user.id), Some(-1), None)
            .await
            .unwrap();
        assert_eq!(f.rating, Some(-1));
        let op = db
            .set_feedback(a.id, "operator", None, None, Some("better"))
            .await
            .unwrap();
        assert_eq!(op.correction.as_deref(), Some("better"));
        assert_eq!(db.counts().await.unwrap().rated_replies, 1);
        assert!(
            db.set_feedback(q.id, "telegram:42", None, Some(1), None)
                .await
                .is_err()
        );
        assert!(
            db.set_feedback(a.id, "telegram:42", None, Some(5), None)
                .await
                .is_err()
        );
        assert!(
            db.set_feedback(9999, "telegram:42", None, Some(1), None)
                .await
                .is_err()
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn removing_a_reaction_removes_only_the_rating_it_gave(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let (assistant, user, chat) = setup(&db).await;
        let conv = db
            .current_conversation(assistant, chat, None, Some(user.id))
            .await
            .unwrap();
        let a = db
            .insert_message(&msg(conv.id, Role::Assistant, "a", None, Some("901")))
            .await
            .unwrap();
        let rating = || async {
            sql::all::<(String, Option<i64>, Option<String>)>(
                db.pool(),
                "select rater, rating, correction from feedback order by rater",
                (),
            )
            .await
            .unwrap()
        };
        // 👎 replaced 👍; 👍 taken back (in either order with the 👎) keeps the 👎.
        db.set_feedback(a.id, "discord:42", Some(user.id), Some(-1), None)
            .await
            .unwrap();
        assert!(!db.remove_rating(a.id, "discord:42", 1).await.unwrap());
        assert_eq!(
            rating().await,
            vec![("discord:42".to_string(), Some(-1), None)]
        );
        assert!(db.remove_rating(a.id, "discord:42", -1).await.unwrap());
        assert!(rating().await.is_empty());
        // With a correction in the row the correction stays.
        db.set_feedback(a.id, "discord:43", None, Some(1), Some("better"))
            .await
            .unwrap();
        assert!(db.remove_rating(a.id, "discord:43", 1).await.unwrap());
        assert_eq!(
            rating().await,
            vec![("discord:43".to_string(), None, Some("better".to_string()))]
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn threads_and_platform_messages_are_looked_up_by_index(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        for (sql, index) in [
            (
                "select id from conversations where platform_thread_id = ?",
                "conversations_thread_idx",
            ),
            (
                "select id from messages where platform_message_id = ?",
                "messages_platform_message_idx",
            ),
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sql::all(db.pool(), &format!("explain query plan {sql}"), ("1",))
                    .await
                    .unwrap();
            assert!(
                plan.iter().any(|(_, _, _, d)| d.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn replies_are_found_by_platform_id_and_by_the_message_they_answer(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let (assistant, user, chat) = setup(&db).await;
        let conv = db
            .current_conversation(assistant, chat, Some("t9"), Some(user.id))
            .await
            .unwrap();
        db.insert_message(&msg(conv.id, Role::User, "q1", Some(user.id), Some("1")))
            .await
            .unwrap();
        let a1 = db
            .insert_message(&msg(conv.id, Role::Assistant, "a1", None, Some("2")))
            .await
            .unwrap();
        db.insert_message(&msg(conv.id, Role::User, "q2", Some(user.id), Some("3")))
            .await
            .unwrap();
        assert_eq!(
            db.stored_reply_to(conv.id, "1")
                .await
                .unwrap()
                .map(|m| m.id),
            Some(a1.id)
        );
        assert_eq!(db.stored_reply_to(conv.id, "3").await.unwrap(), None);
        // Telegram's chat: the platform must match.
        assert_eq!(
            db.reply_by_platform_id(Platform::Telegram, "2")
                .await
                .unwrap()
                .map(|m| m.content),
            Some("a1".to_string())
        );
        assert_eq!(
            db.reply_by_platform_id(Platform::Discord, "2")
                .await
                .unwrap(),
            None
        );
        // A user message is not a reply.
        assert_eq!(
            db.reply_by_platform_id(Platform::Telegram, "1")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            db.chat_of_thread(Platform::Telegram, "t9").await.unwrap(),
            Some((chat, "42".to_string()))
        );
        assert_eq!(
            db.chat_of_thread(Platform::Discord, "t9").await.unwrap(),
            None
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn an_update_is_seen_once(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        assert!(
            db.mark_update_seen(Platform::Telegram, "1001")
                .await
                .unwrap()
        );
        assert!(
            !db.mark_update_seen(Platform::Telegram, "1001")
                .await
                .unwrap()
        );
        assert!(
            db.mark_update_seen(Platform::Discord, "1001")
                .await
                .unwrap()
        );
    }
}
