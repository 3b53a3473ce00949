//! Curation: conversation search, one conversation with its feedback, the operator's
//! ratings and corrections, and training examples built from stored conversations (what
//! the web console's conversation and dataset pages read and change).

use super::sql::Found;
use super::{Db, Feedback, Platform, Result, sql};
use crate::domain::{ChatExample, ChatMessage, Role};
use crate::preference::{KtoRow, PreferencePair, PreferenceRows};
use chrono::NaiveDate;
use serde::Serialize;

/// The rater name of feedback given in the console.
pub const OPERATOR: &str = "operator";

crate::keywords! {
    /// Which conversations to list by their replies' ratings (by anyone).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum RatingFilter ("rating filter") {
        #[default]
        Any = "any",
        /// At least one reply rated 👍.
        Up = "up",
        /// At least one reply rated 👎.
        Down = "down",
        /// No rating at all.
        Unrated = "unrated",
    }
}

/// A conversation search. Text filters match case-insensitively (ASCII) anywhere in the
/// value; dates are inclusive and compare the conversation's start (UTC).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationFilter {
    /// Text contained in any message.
    pub text: Option<String>,
    pub platform: Option<Platform>,
    /// Contained in the username, display name or platform id of the conversation's user
    /// or of any message's author.
    pub user: Option<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub rating: RatingFilter,
}

/// One row of the conversation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ConversationSummary {
    pub id: i64,
    /// The chat's platform (or the user's, for conversations without a chat).
    pub platform: Option<String>,
    /// Display name, username or platform id of the user who started it.
    pub user: Option<String>,
    pub created_at: String,
    pub closed_at: Option<String>,
    pub message_count: i64,
    pub thumbs_up: i64,
    pub thumbs_down: i64,
    pub excluded_from_training: bool,
}

/// A message with its author and every feedback given on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageWithFeedback {
    pub id: i64,
    pub role: String,
    pub content: String,
    /// The author of a user message (display name, username or platform id).
    pub author: Option<String>,
    pub adapter_name: Option<String>,
    pub created_at: String,
    pub feedback: Vec<Feedback>,
}

impl MessageWithFeedback {
    /// The operator's feedback, if any.
    pub fn operator_feedback(&self) -> Option<&Feedback> {
        self.feedback.iter().find(|f| f.rater == OPERATOR)
    }
}

/// A conversation with every turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationDetail {
    pub summary: ConversationSummary,
    pub messages: Vec<MessageWithFeedback>,
}

/// Which conversations become a dataset, and how feedback shapes the examples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuildFilter {
    /// Conversations of this assistant (by id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assistant: Option<i64>,
    /// Conversations with at least one reply from this adapter (by id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<i64>,
    pub platform: Option<Platform>,
    /// The platform's chat id (a Telegram chat, a Discord channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// Conversations by their replies' ratings.
    #[serde(skip_serializing_if = "is_any")]
    pub rating: RatingFilter,
    /// Train only on replies someone rated 👍 (others get weight 0).
    pub only_upvoted: bool,
    /// An operator's correction replaces the reply as the training target.
    pub include_corrections: bool,
    /// Replies someone rated 👎 get weight 0.
    pub exclude_downvoted: bool,
}

fn is_any(r: &RatingFilter) -> bool {
    *r == RatingFilter::Any
}

/// A training example and the conversation it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationExample {
    pub conversation_id: i64,
    pub example: ChatExample,
}

/// The select list of [`ConversationSummary`] over `conversations c`, its chat `ch` and
/// user `u`.
const SUMMARY_SELECT: &str = "select c.id,
        coalesce(ch.platform, u.platform) as platform,
        coalesce(u.display_name, u.username, u.platform_user_id, ch.title) as user,
        c.created_at, c.closed_at,
        (select count(*) from messages m where m.conversation_id = c.id) as message_count,
        (select count(*) from feedback f join messages m on m.id = f.message_id
          where m.conversation_id = c.id and f.rating = 1) as thumbs_up,
        (select count(*) from feedback f join messages m on m.id = f.message_id
          where m.conversation_id = c.id and f.rating = -1) as thumbs_down,
        c.excluded_from_training
    from conversations c
    left join chats ch on ch.id = c.chat_id
    left join platform_users u on u.id = c.user_id";

/// The conversation search's conditions, over parameters ?1 to ?6 (see `bind_filter`).
fn search_where() -> String {
    format!(
        "where (?1 is null or exists (
            select 1 from messages m where m.conversation_id = c.id
            and instr(lower(m.content), lower(?1)) > 0))
    and (?2 is null or coalesce(ch.platform, u.platform) = ?2)
    and (?3 is null or exists (
            select 1 from platform_users pu
            where (pu.id = c.user_id
                   or pu.id in (select m.user_id from messages m where m.conversation_id = c.id))
              and (instr(lower(coalesce(pu.username, '')), lower(?3)) > 0
                   or instr(lower(coalesce(pu.display_name, '')), lower(?3)) > 0
                   or instr(lower(pu.platform_user_id), lower(?3)) > 0)))
    and (?4 is null or substr(c.created_at, 1, 10) >= ?4)
    and (?5 is null or substr(c.created_at, 1, 10) <= ?5)
    and {}",
        rating_condition(6)
    )
}

/// Whether conversation `c`'s ratings pass a [`RatingFilter`] (its SQL value, in parameter
/// `?{param}`: `up`, `down`, `unrated`; anything else passes all).
fn rating_condition(param: u8) -> String {
    format!(
        "(case ?{param}
           when 'up' then exists (select 1 from feedback f join messages m on m.id = f.message_id
                                  where m.conversation_id = c.id and f.rating = 1)
           when 'down' then exists (select 1 from feedback f join messages m on m.id = f.message_id
                                    where m.conversation_id = c.id and f.rating = -1)
           when 'unrated' then not exists (select 1 from feedback f join messages m on m.id = f.message_id
                                           where m.conversation_id = c.id and f.rating is not null)
           else 1 end)"
    )
}

fn day(d: Option<NaiveDate>) -> Option<String> {
    d.map(|d| d.format("%Y-%m-%d").to_string())
}

/// A text filter: `None` when blank.
fn needle(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl Db {
    /// One page of conversations matching `filter`, newest first, and how many match in
    /// all.
    pub async fn search_conversations(
        &self,
        filter: &ConversationFilter,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<ConversationSummary>, i64)> {
        let text = needle(&filter.text);
        let user = needle(&filter.user);
        let platform = filter.platform.map(Platform::as_str);
        let (from, to) = (day(filter.from), day(filter.to));
        let rating = filter.rating.as_str();
        let conditions = search_where();
        let rows: Vec<ConversationSummary> = sql::all(
            self.pool(),
            &format!("{SUMMARY_SELECT} {conditions} order by c.id desc limit ?7 offset ?8"),
            (&text, platform, &user, &from, &to, rating, limit, offset),
        )
        .await?;
        let (total,): (i64,) = sql::one(
            self.pool(),
            &format!(
                "select count(*) from conversations c
                 left join chats ch on ch.id = c.chat_id
                 left join platform_users u on u.id = c.user_id {conditions}"
            ),
            (&text, platform, &user, &from, &to, rating),
        )
        .await?;
        Ok((rows, total))
    }

    /// A conversation with every message (oldest first) and its feedback.
    pub async fn conversation_detail(&self, id: i64) -> Result<ConversationDetail> {
        let summary: Option<ConversationSummary> = sql::optional(
            self.pool(),
            &format!("{SUMMARY_SELECT} where c.id = ?"),
            (id,),
        )
        .await?;
        let summary = summary.found(|| format!("conversation {id}"))?;
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            role: String,
            content: String,
            author: Option<String>,
            adapter_name: Option<String>,
            created_at: String,
        }
        let rows: Vec<Row> = sql::all(
            self.pool(),
            "select m.id, m.role, m.content,
                    coalesce(u.display_name, u.username, u.platform_user_id) as author,
                    m.adapter_name, m.created_at
             from messages m left join platform_users u on u.id = m.user_id
             where m.conversation_id = ? order by m.id",
            (id,),
        )
        .await?;
        let feedback: Vec<Feedback> = sql::all(
            self.pool(),
            "select f.id, f.message_id, f.rater, f.rating, f.correction
             from feedback f join messages m on m.id = f.message_id
             where m.conversation_id = ? order by f.id",
            (id,),
        )
        .await?;
        let messages = rows
            .into_iter()
            .map(|r| MessageWithFeedback {
                feedback: feedback
                    .iter()
                    .filter(|f| f.message_id == r.id)
                    .cloned()
                    .collect(),
                id: r.id,
                role: r.role,
                content: r.content,
                author: r.author,
                adapter_name: r.adapter_name,
                created_at: r.created_at,
            })
            .collect();
        Ok(ConversationDetail { summary, messages })
    }

    /// The operator's feedback on a message, if any.
    pub async fn operator_feedback(&self, message_id: i64) -> Result<Option<Feedback>> {
        sql::optional(
            self.pool(),
            "select id, message_id, rater, rating, correction from feedback
             where message_id = ? and rater = ?",
            (message_id, OPERATOR),
        )
        .await
    }

    /// Rate a reply as the operator (1 or -1), keeping the operator's correction.
    pub async fn set_operator_rating(&self, message_id: i64, rating: i64) -> Result<Feedback> {
        let existing = self.operator_feedback(message_id).await?;
        let correction = existing.and_then(|f| f.correction);
        self.set_feedback(
            message_id,
            OPERATOR,
            None,
            Some(rating),
            correction.as_deref(),
        )
        .await
    }

    /// Set (or with `None`, clear) the operator's corrected reply, keeping the operator's
    /// rating. Clearing the correction of an unrated reply removes the feedback row.
    pub async fn set_operator_correction(
        &self,
        message_id: i64,
        correction: Option<&str>,
    ) -> Result<Option<Feedback>> {
        self.reply_conversation(message_id).await?;
        let rating = self
            .operator_feedback(message_id)
            .await?
            .and_then(|f| f.rating);
        if rating.is_none() && correction.is_none() {
            sql::execute(
                self.pool(),
                "delete from feedback where message_id = ? and rater = ?",
                (message_id, OPERATOR),
            )
            .await?;
            return Ok(None);
        }
        self.set_feedback(message_id, OPERATOR, None, rating, correction)
            .await
            .map(Some)
    }

    /// Flip a conversation's exclusion from training; returns the new value.
    pub async fn toggle_conversation_excluded(&self, id: i64) -> Result<bool> {
        let row: Option<(bool,)> = sql::optional(
            self.pool(),
            "update conversations set excluded_from_training = 1 - excluded_from_training
             where id = ? returning excluded_from_training",
            (id,),
        )
        .await?;
        row.map(|(e,)| e).found(|| format!("conversation {id}"))
    }

    /// Delete a conversation with its messages and their feedback. Dataset examples built
    /// from it stay (datasets are snapshots); only their link to it is cleared.
    pub async fn delete_conversation(&self, id: i64) -> Result<()> {
        let done =
            sql::execute(self.pool(), "delete from conversations where id = ?", (id,)).await?;
        done.found(|| format!("conversation {id}"))?;
        Ok(())
    }

    /// The training jobs that use a dataset version (they keep it from being deleted).
    pub async fn jobs_using_dataset(&self, dataset_id: i64) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = sql::all(
            self.pool(),
            "select id from training_jobs where dataset_id = ? order by id",
            (dataset_id,),
        )
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Training examples from the stored conversations `filter` picks, oldest first
    /// (see [`conversation_example`] for the rules).
    ///
    /// Conversations excluded from training, and those started by a user excluded from
    /// training, are skipped.
    pub async fn conversation_examples(
        &self,
        filter: &BuildFilter,
    ) -> Result<Vec<ConversationExample>> {
        let mut out = Vec::new();
        for turns in self
            .build_turns(filter)
            .await?
            .chunk_by(|a, b| a.conversation_id == b.conversation_id)
        {
            let first = &turns[0];
            if let Some(example) = conversation_example(&first.system_prompt, turns, filter) {
                out.push(ConversationExample {
                    conversation_id: first.conversation_id,
                    example,
                });
            }
        }
        Ok(out)
    }

    /// Preference rows from the rated and corrected replies of the conversations `filter`
    /// picks (same exclusions as [`Self::conversation_examples`]); see
    /// [`crate::preference`] for the rules.
    pub async fn preference_rows(&self, filter: &BuildFilter) -> Result<PreferenceRows> {
        let mut out = PreferenceRows::default();
        for turns in self
            .build_turns(filter)
            .await?
            .chunk_by(|a, b| a.conversation_id == b.conversation_id)
        {
            preference_rows(&turns[0].system_prompt, turns, &mut out);
        }
        Ok(out)
    }

    /// Every message of the conversations `filter` picks, by conversation and order.
    async fn build_turns(&self, filter: &BuildFilter) -> Result<Vec<TurnRow>> {
        sql::all(
            self.pool(),
            &format!(
                "with picked as (
                 select c.id, a.system_prompt from conversations c
                 join assistants a on a.id = c.assistant_id
                 left join chats ch on ch.id = c.chat_id
                 left join platform_users u on u.id = c.user_id
                 where c.excluded_from_training = 0
                   and coalesce(u.excluded_from_training, 0) = 0
                   and (?1 is null or coalesce(ch.platform, u.platform) = ?1)
                   and (?2 is null or substr(c.created_at, 1, 10) >= ?2)
                   and (?3 is null or substr(c.created_at, 1, 10) <= ?3)
                   and (?5 is null or c.assistant_id = ?5)
                   and (?6 is null or exists (select 1 from messages m
                          where m.conversation_id = c.id and m.adapter_id = ?6))
                   and (?7 is null or ch.platform_chat_id = ?7)
                   and {})
             select p.id as conversation_id, p.system_prompt, m.role, m.content,
                    coalesce(pu.excluded_from_training, 0) as author_excluded,
                    exists (select 1 from feedback f where f.message_id = m.id and f.rating = 1) as upvoted,
                    exists (select 1 from feedback f where f.message_id = m.id and f.rating = -1) as downvoted,
                    (select f.correction from feedback f
                      where f.message_id = m.id and f.rater = ?4) as correction
             from picked p join messages m on m.conversation_id = p.id
             left join platform_users pu on pu.id = m.user_id
             order by p.id, m.id",
                rating_condition(8)
            ),
            (
                filter.platform.map(Platform::as_str),
                day(filter.from),
                day(filter.to),
                OPERATOR,
                filter.assistant,
                filter.adapter,
                needle(&filter.chat),
                filter.rating.as_str(),
            ),
        )
        .await
    }
}

/// A stored message as the dataset builder sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct TurnRow {
    conversation_id: i64,
    system_prompt: String,
    role: String,
    content: String,
    /// The author is a user excluded from training.
    author_excluded: bool,
    upvoted: bool,
    downvoted: bool,
    /// The operator's correction.
    correction: Option<String>,
}

/// The system prompt as a conversation's first message; none when it is blank.
fn system_context(system_prompt: &str) -> Vec<ChatMessage> {
    if system_prompt.trim().is_empty() {
        return Vec::new();
    }
    vec![ChatMessage::new(Role::System, system_prompt)]
}

/// The turns of a known role as the conversation went for training: without the messages
/// of users excluded from training, nor the replies to them (up to the next message of
/// someone else).
fn visible_turns<'a>(
    turns: impl IntoIterator<Item = &'a TurnRow>,
) -> impl Iterator<Item = (Role, &'a TurnRow)> {
    let mut skipping_replies = false;
    turns.into_iter().filter_map(move |t| {
        let role = t.role.parse::<Role>().ok()?;
        match role {
            Role::User if t.author_excluded => {
                skipping_replies = true;
                None
            }
            Role::User | Role::System => {
                skipping_replies = false;
                Some((role, t))
            }
            Role::Assistant if skipping_replies => None,
            Role::Assistant => Some((role, t)),
        }
    })
}

/// One conversation as a training example, or `None` when nothing in it can be trained on.
///
/// - The assistant's system prompt (when not blank) comes first, then the messages in
///   order.
/// - A message of a user excluded from training is left out, and so are the replies to
///   it (up to the next user message).
/// - With `include_corrections`, the operator's correction replaces a reply's text.
/// - A reply gets `weight: 0` (kept as context, not trained on) when
///   `exclude_downvoted` and someone rated it 👎, or `only_upvoted` and nobody rated it
///   👍 — unless its correction is the target (a corrected reply is the operator's own).
/// - Blank messages and the messages after the last reply (unanswered) are left out.
/// - The example needs a user message and a reply with a non-zero weight.
fn conversation_example(
    system_prompt: &str,
    turns: &[TurnRow],
    filter: &BuildFilter,
) -> Option<ChatExample> {
    let mut messages = system_context(system_prompt);
    for (role, t) in visible_turns(turns) {
        match role {
            Role::User | Role::System => {
                if !t.content.trim().is_empty() {
                    messages.push(ChatMessage::new(role, t.content.as_str()));
                }
            }
            Role::Assistant => {
                let correction = t
                    .correction
                    .as_deref()
                    .filter(|c| filter.include_corrections && !c.trim().is_empty());
                let content = correction.unwrap_or(&t.content);
                if content.trim().is_empty() {
                    continue;
                }
                let untrained = correction.is_none()
                    && ((filter.exclude_downvoted && t.downvoted)
                        || (filter.only_upvoted && !t.upvoted));
                let mut m = ChatMessage::new(Role::Assistant, content);
                m.weight = untrained.then_some(0.0);
                messages.push(m);
            }
        }
    }
    let last_reply = messages.iter().rposition(|m| m.role == Role::Assistant)?;
    messages.truncate(last_reply + 1);
    let has_user = messages.iter().any(|m| m.role == Role::User);
    let trained = messages
        .iter()
        .any(|m| m.role == Role::Assistant && m.weight != Some(0.0));
    (has_user && trained).then_some(ChatExample { messages })
}

/// The preference rows of one conversation (rules on [`PreferenceRows`]). Each reply's
/// prompt is the conversation before it as users saw it: the system prompt, then the
/// messages, without those of users excluded from training and the replies to them.
fn preference_rows(system_prompt: &str, turns: &[TurnRow], out: &mut PreferenceRows) {
    let mut context = system_context(system_prompt);
    let non_blank = turns.iter().filter(|t| !t.content.trim().is_empty());
    for (role, t) in visible_turns(non_blank) {
        match role {
            Role::User | Role::System => {}
            Role::Assistant if context.iter().any(|m| m.role == Role::User) => {
                let kto = |completion: &str, label| KtoRow {
                    prompt: context.clone(),
                    completion: completion.to_string(),
                    label,
                };
                let correction = t
                    .correction
                    .as_deref()
                    .filter(|c| !c.trim().is_empty() && *c != t.content);
                let mut push_kto = |completion: &str, label| {
                    out.kto.push(kto(completion, label));
                    out.kto_conversations.push(t.conversation_id);
                };
                if let Some(c) = correction {
                    out.pairs.push(PreferencePair {
                        prompt: context.clone(),
                        preferred: c.to_string(),
                        non_preferred: t.content.clone(),
                    });
                    out.pair_conversations.push(t.conversation_id);
                    push_kto(c, true);
                }
                match (t.upvoted, t.downvoted || correction.is_some()) {
                    (true, false) => push_kto(&t.content, true),
                    (false, true) => push_kto(&t.content, false),
                    _ => {}
                }
            }
            Role::Assistant => {}
        }
        context.push(ChatMessage::new(role, t.content.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;
    use crate::storage::{NewDataset, NewJob, NewMessage};
    use sqlx::SqlitePool;

    /// A conversation builder over one database.
    struct Fixture {
        db: Db,
        assistant: i64,
    }

    impl Fixture {
        async fn new(pool: SqlitePool, system_prompt: &str) -> Self {
            let db = Db::from_pool(pool);
            let assistant = db
                .ensure_assistant("loraloop", "tiny", system_prompt)
                .await
                .unwrap()
                .id;
            Self { db, assistant }
        }

        async fn user(&self, platform: Platform, id: &str, name: &str) -> i64 {
            self.db
                .upsert_platform_user(platform, id, Some(name), Some(&name.to_uppercase()))
                .await
                .unwrap()
                .id
        }

        /// A conversation of `user` in a new chat, with `(role, content)` turns; returns
        /// its id and the message ids.
        async fn conversation(
            &self,
            platform: Platform,
            user: i64,
            turns: &[(Role, &str)],
        ) -> (i64, Vec<i64>) {
            let chat_key = format!("chat-{}", self.db.counts().await.unwrap().conversations);
            let chat = self
                .db
                .upsert_chat(platform, &chat_key, "private", None)
                .await
                .unwrap();
            let conv = self
                .db
                .current_conversation(self.assistant, chat, None, Some(user))
                .await
                .unwrap();
            let mut ids = Vec::new();
            for (role, content) in turns {
                let m = self
                    .db
                    .insert_message(&NewMessage {
                        conversation_id: conv.id,
                        role: *role,
                        content,
                        user_id: (*role == Role::User).then_some(user),
                        platform_message_id: None,
                        adapter_id: None,
                        adapter_name: None,
                        prompt_tokens: None,
                        completion_tokens: None,
                    })
                    .await
                    .unwrap();
                ids.push(m.id);
            }
            (conv.id, ids)
        }

        async fn set_created(&self, conversation: i64, at: &str) {
            sql::execute(
                self.db.pool(),
                "update conversations set created_at = ? where id = ?",
                (at, conversation),
            )
            .await
            .unwrap();
        }

        async fn search(&self, filter: ConversationFilter) -> Vec<i64> {
            let (rows, total) = self.db.search_conversations(&filter, 50, 0).await.unwrap();
            assert_eq!(total as usize, rows.len(), "{filter:?}");
            rows.into_iter().map(|r| r.id).collect()
        }
    }

    use Role::{Assistant as A, System as S, User as U};

    fn msg(role: Role, content: &str, weight: Option<f64>) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
            weight,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn ratings_and_corrections_become_dpo_pairs_and_kto_rows(pool: SqlitePool) {
        let f = Fixture::new(pool, "Be brief.").await;
        let ann = f.user(Platform::Telegram, "1001", "ann").await;
        let (_, m) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[
                    (U, "Hi"),
                    (A, "Hello!"),
                    (U, "Capital of France?"),
                    (A, "Lyon."),
                    (U, "Thanks"),
                    (A, "You're welcome."),
                ],
            )
            .await;
        // 👍 on the first reply, 👎 and a correction on the second, the third unrated.
        f.db.set_feedback(m[1], "telegram:1001", Some(ann), Some(1), None)
            .await
            .unwrap();
        f.db.set_feedback(m[3], "telegram:1001", Some(ann), Some(-1), None)
            .await
            .unwrap();
        f.db.set_operator_correction(m[3], Some("Paris."))
            .await
            .unwrap();
        // A second conversation, unrated, and one whose only reply is rated both ways.
        f.conversation(Platform::Telegram, ann, &[(U, "a"), (A, "b")])
            .await;
        let (_, m3) = f
            .conversation(Platform::Telegram, ann, &[(U, "c"), (A, "d")])
            .await;
        f.db.set_feedback(m3[1], "telegram:1001", Some(ann), Some(1), None)
            .await
            .unwrap();
        f.db.set_feedback(m3[1], "telegram:2", None, Some(-1), None)
            .await
            .unwrap();
        let rows = f.db.preference_rows(&BuildFilter::default()).await.unwrap();
        let first = vec![msg(S, "Be brief.", None), msg(U, "Hi", None)];
        let second = vec![
            msg(S, "Be brief.", None),
            msg(U, "Hi", None),
            msg(A, "Hello!", None),
            msg(U, "Capital of France?", None),
        ];
        assert_eq!(
            rows.pairs,
            vec![PreferencePair {
                prompt: second.clone(),
                preferred: "Paris.".into(),
                non_preferred: "Lyon.".into(),
            }]
        );
        let kto = |prompt: &Vec<ChatMessage>, completion: &str, label| KtoRow {
            prompt: prompt.clone(),
            completion: completion.into(),
            label,
        };
        assert_eq!(
            rows.kto,
            vec![
                kto(&first, "Hello!", true),
                kto(&second, "Paris.", true),
                kto(&second, "Lyon.", false),
            ]
        );
        // The JSONL shapes other tools read.
        assert_eq!(
            rows.pairs[0].to_json()["preferred_output"],
            serde_json::json!([{"role": "assistant", "content": "Paris."}])
        );
        assert_eq!(
            rows.kto[2].to_json()["prompt"][3],
            serde_json::json!({"role": "user", "content": "Capital of France?"})
        );
        assert_eq!(rows.kto[2].to_json()["label"], false);
        // Filters apply: only conversations rated 👎 somewhere, another platform: nothing.
        let down = BuildFilter {
            rating: RatingFilter::Down,
            ..Default::default()
        };
        assert_eq!(f.db.preference_rows(&down).await.unwrap().kto.len(), 3);
        let discord = BuildFilter {
            platform: Some(Platform::Discord),
            ..Default::default()
        };
        assert_eq!(
            f.db.preference_rows(&discord).await.unwrap(),
            PreferenceRows::default()
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn an_excluded_users_messages_and_the_replies_to_them_make_no_preference_rows(
        pool: SqlitePool,
    ) {
        let f = Fixture::new(pool, "").await;
        let ann = f.user(Platform::Telegram, "1", "ann").await;
        let eve = f.user(Platform::Telegram, "2", "eve").await;
        let (_, m) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[
                    (U, "ann asks"),
                    (A, "to ann"),
                    (U, "eve asks"),
                    (A, "to eve"),
                    (U, "ann again"),
                    (A, "to ann again"),
                ],
            )
            .await;
        sql::execute(
            f.db.pool(),
            "update messages set user_id = ? where id = ?",
            (eve, m[2]),
        )
        .await
        .unwrap();
        sql::execute(
            f.db.pool(),
            "update platform_users set excluded_from_training = 1 where id = ?",
            (eve,),
        )
        .await
        .unwrap();
        for (reply, rating) in [(m[1], 1), (m[3], 1), (m[5], -1)] {
            f.db.set_feedback(reply, "telegram:1", Some(ann), Some(rating), None)
                .await
                .unwrap();
        }
        let rows = f.db.preference_rows(&BuildFilter::default()).await.unwrap();
        // By the rules on `preference_rows`: eve's message and the reply to it are in no
        // prompt and give no row.
        let kto = |prompt: Vec<ChatMessage>, completion: &str, label| KtoRow {
            prompt,
            completion: completion.into(),
            label,
        };
        assert_eq!(
            rows.kto,
            vec![
                kto(vec![msg(U, "ann asks", None)], "to ann", true),
                kto(
                    vec![
                        msg(U, "ann asks", None),
                        msg(A, "to ann", None),
                        msg(U, "ann again", None),
                    ],
                    "to ann again",
                    false
                ),
            ]
        );
        assert!(rows.pairs.is_empty());
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn each_search_filter_narrows_the_list(pool: SqlitePool) {
        let f = Fixture::new(pool, "").await;
        let ann = f.user(Platform::Telegram, "1001", "ann").await;
        let bob = f.user(Platform::Discord, "2002", "bob").await;
        let (c1, m1) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[(U, "Where is the Eiffel tower?"), (A, "In Paris.")],
            )
            .await;
        let (c2, m2) = f
            .conversation(
                Platform::Discord,
                bob,
                &[(U, "hello"), (A, "hi"), (U, "bye"), (A, "ciao")],
            )
            .await;
        let (c3, _) = f
            .conversation(Platform::Telegram, bob, &[(U, "paris 100%_"), (A, "ok")])
            .await;
        f.set_created(c1, "2026-01-10T08:00:00.000Z").await;
        f.set_created(c2, "2026-02-01T23:59:59.999Z").await;
        f.set_created(c3, "2026-03-05T00:00:00.000Z").await;
        f.db.set_feedback(m1[1], "telegram:1001", Some(ann), Some(1), None)
            .await
            .unwrap();
        f.db.set_feedback(m2[1], "discord:2002", Some(bob), Some(-1), None)
            .await
            .unwrap();
        f.db.set_feedback(m2[3], OPERATOR, None, Some(1), None)
            .await
            .unwrap();

        let all = ConversationFilter::default();
        assert_eq!(f.search(all.clone()).await, [c3, c2, c1]);
        let text = |t: &str| ConversationFilter {
            text: Some(t.into()),
            ..Default::default()
        };
        assert_eq!(f.search(text("PARIS")).await, [c3, c1]);
        assert_eq!(f.search(text("100%_")).await, [c3]);
        assert_eq!(f.search(text("%")).await, [c3], "% is not a wildcard");
        assert_eq!(
            f.search(text("'; drop table messages; --")).await,
            [0i64; 0]
        );
        assert_eq!(
            f.search(text("   ")).await,
            [c3, c2, c1],
            "blank: no filter"
        );
        let platform = ConversationFilter {
            platform: Some(Platform::Telegram),
            ..Default::default()
        };
        assert_eq!(f.search(platform).await, [c3, c1]);
        let user = |u: &str| ConversationFilter {
            user: Some(u.into()),
            ..Default::default()
        };
        assert_eq!(f.search(user("BO")).await, [c3, c2], "username");
        assert_eq!(f.search(user("ANN")).await, [c1], "display name");
        assert_eq!(f.search(user("200")).await, [c3, c2], "platform id");
        let dates = |from: Option<&str>, to: Option<&str>| ConversationFilter {
            from: from.map(|d| d.parse().unwrap()),
            to: to.map(|d| d.parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            f.search(dates(Some("2026-02-01"), None)).await,
            [c3, c2],
            "from is inclusive"
        );
        assert_eq!(
            f.search(dates(None, Some("2026-02-01"))).await,
            [c2, c1],
            "to includes the whole day"
        );
        assert_eq!(
            f.search(dates(Some("2026-01-11"), Some("2026-03-04")))
                .await,
            [c2]
        );
        let rating = |r: RatingFilter| ConversationFilter {
            rating: r,
            ..Default::default()
        };
        assert_eq!(f.search(rating(RatingFilter::Up)).await, [c2, c1]);
        assert_eq!(f.search(rating(RatingFilter::Down)).await, [c2]);
        assert_eq!(f.search(rating(RatingFilter::Unrated)).await, [c3]);
        assert_eq!(f.search(rating(RatingFilter::Any)).await, [c3, c2, c1]);
        let combined = ConversationFilter {
            platform: Some(Platform::Telegram),
            user: Some("bob".into()),
            text: Some("paris".into()),
            ..Default::default()
        };
        assert_eq!(f.search(combined).await, [c3]);

        // Columns, and paging with the total of all matches.
        let (page, total) = f.db.search_conversations(&all, 2, 1).await.unwrap();
        assert_eq!(total, 3);
        assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), [c2, c1]);
        let row = &page[0];
        assert_eq!(row.platform.as_deref(), Some("discord"));
        assert_eq!(row.user.as_deref(), Some("BOB"));
        assert_eq!(row.message_count, 4);
        assert_eq!((row.thumbs_up, row.thumbs_down), (1, 1));
        assert!(!row.excluded_from_training);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn operator_feedback_keeps_the_other_half_and_clearing_removes_it(pool: SqlitePool) {
        let f = Fixture::new(pool, "").await;
        let ann = f.user(Platform::Web, "a", "ann").await;
        let (c, m) = f
            .conversation(Platform::Web, ann, &[(U, "q"), (A, "a")])
            .await;
        f.db.set_operator_correction(m[1], Some("better"))
            .await
            .unwrap();
        let fb = f.db.set_operator_rating(m[1], -1).await.unwrap();
        assert_eq!(
            (fb.rating, fb.correction.as_deref()),
            (Some(-1), Some("better"))
        );
        let fb = f.db.set_operator_correction(m[1], None).await.unwrap();
        assert_eq!(fb.map(|f| (f.rating, f.correction)), Some((Some(-1), None)));
        // Unrated and uncorrected: no row left.
        sql::execute(
            f.db.pool(),
            "update feedback set rating = null, correction = 'x'",
            (),
        )
        .await
        .unwrap();
        assert_eq!(
            f.db.set_operator_correction(m[1], None).await.unwrap(),
            None
        );
        assert_eq!(f.db.operator_feedback(m[1]).await.unwrap(), None);
        // A user message cannot be corrected; a missing one is not found.
        assert!(matches!(
            f.db.set_operator_correction(m[0], None).await,
            Err(StorageError::Invalid { .. })
        ));
        assert!(matches!(
            f.db.set_operator_rating(9999, 1).await,
            Err(StorageError::NotFound { .. })
        ));
        let detail = f.db.conversation_detail(c).await.unwrap();
        assert_eq!(detail.messages.len(), 2);
        assert_eq!(detail.messages[0].author.as_deref(), Some("ANN"));
        assert!(detail.messages[1].feedback.is_empty());
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn excluding_and_deleting_a_conversation(pool: SqlitePool) {
        let f = Fixture::new(pool, "").await;
        let ann = f.user(Platform::Web, "a", "ann").await;
        let (c, m) = f
            .conversation(Platform::Web, ann, &[(U, "q"), (A, "a")])
            .await;
        f.db.set_operator_rating(m[1], 1).await.unwrap();
        assert!(f.db.toggle_conversation_excluded(c).await.unwrap());
        assert!(
            f.db.conversation_detail(c)
                .await
                .unwrap()
                .summary
                .excluded_from_training
        );
        assert!(!f.db.toggle_conversation_excluded(c).await.unwrap());
        f.db.delete_conversation(c).await.unwrap();
        let counts = f.db.counts().await.unwrap();
        assert_eq!((counts.conversations, counts.messages), (0, 0));
        assert_eq!(counts.rated_replies, 0);
        assert!(matches!(
            f.db.delete_conversation(c).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(matches!(
            f.db.toggle_conversation_excluded(c).await,
            Err(StorageError::NotFound { .. })
        ));
    }

    /// The examples built with `filter`, as (conversation, messages).
    async fn built(db: &Db, filter: &BuildFilter) -> Vec<(i64, Vec<ChatMessage>)> {
        db.conversation_examples(filter)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.conversation_id, e.example.messages))
            .collect()
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn ratings_and_corrections_set_the_weights(pool: SqlitePool) {
        let f = Fixture::new(pool, "Be brief.").await;
        let ann = f.user(Platform::Telegram, "1", "ann").await;
        // c1: reply 1 rated 👍 by a user, reply 2 rated 👎 and corrected by the operator.
        let (c1, m1) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[(U, "2+2?"), (A, "4"), (U, "3+3?"), (A, "7")],
            )
            .await;
        f.db.set_feedback(m1[1], "telegram:1", Some(ann), Some(1), None)
            .await
            .unwrap();
        f.db.set_feedback(m1[3], "telegram:1", Some(ann), Some(-1), None)
            .await
            .unwrap();
        f.db.set_operator_correction(m1[3], Some("6"))
            .await
            .unwrap();
        // c2: one reply rated 👎, nothing else.
        let (c2, m2) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[(U, "capital of Peru?"), (A, "Quito")],
            )
            .await;
        f.db.set_operator_rating(m2[1], -1).await.unwrap();
        // c3: unrated.
        let (c3, _) = f
            .conversation(Platform::Telegram, ann, &[(U, "hi"), (A, "hello")])
            .await;

        let sys = || msg(S, "Be brief.", None);
        // No feedback options: everything as said, fully weighted.
        assert_eq!(
            built(&f.db, &BuildFilter::default()).await,
            [
                (
                    c1,
                    vec![
                        sys(),
                        msg(U, "2+2?", None),
                        msg(A, "4", None),
                        msg(U, "3+3?", None),
                        msg(A, "7", None)
                    ]
                ),
                (
                    c2,
                    vec![
                        sys(),
                        msg(U, "capital of Peru?", None),
                        msg(A, "Quito", None)
                    ]
                ),
                (c3, vec![sys(), msg(U, "hi", None), msg(A, "hello", None)]),
            ]
        );
        // Excluding 👎: those replies get weight 0; c2 has nothing left to train on.
        let exclude_down = BuildFilter {
            exclude_downvoted: true,
            ..Default::default()
        };
        assert_eq!(
            built(&f.db, &exclude_down).await,
            [
                (
                    c1,
                    vec![
                        sys(),
                        msg(U, "2+2?", None),
                        msg(A, "4", None),
                        msg(U, "3+3?", None),
                        msg(A, "7", Some(0.0))
                    ]
                ),
                (c3, vec![sys(), msg(U, "hi", None), msg(A, "hello", None)]),
            ]
        );
        // With corrections, the corrected reply is the target and is trained on.
        let corrected = BuildFilter {
            exclude_downvoted: true,
            include_corrections: true,
            ..Default::default()
        };
        assert_eq!(
            built(&f.db, &corrected).await[0],
            (
                c1,
                vec![
                    sys(),
                    msg(U, "2+2?", None),
                    msg(A, "4", None),
                    msg(U, "3+3?", None),
                    msg(A, "6", None)
                ]
            )
        );
        // Only 👍: unrated replies get weight 0, so c2 and c3 drop out.
        let only_up = BuildFilter {
            only_upvoted: true,
            ..Default::default()
        };
        assert_eq!(
            built(&f.db, &only_up).await,
            [(
                c1,
                vec![
                    sys(),
                    msg(U, "2+2?", None),
                    msg(A, "4", None),
                    msg(U, "3+3?", None),
                    msg(A, "7", Some(0.0))
                ]
            )]
        );
        let only_up_corrected = BuildFilter {
            only_upvoted: true,
            include_corrections: true,
            ..Default::default()
        };
        assert_eq!(
            built(&f.db, &only_up_corrected).await[0].1[4],
            msg(A, "6", None)
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn excluded_conversations_users_and_incomplete_ones_are_left_out(pool: SqlitePool) {
        let f = Fixture::new(pool, "   ").await;
        let ann = f.user(Platform::Telegram, "1", "ann").await;
        let eve = f.user(Platform::Telegram, "2", "eve").await;
        let bob = f.user(Platform::Discord, "3", "bob").await;
        let (kept, _) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[(U, "a1"), (A, "r1"), (U, "unanswered")],
            )
            .await;
        let (excluded, _) = f
            .conversation(Platform::Telegram, ann, &[(U, "a2"), (A, "r2")])
            .await;
        f.db.toggle_conversation_excluded(excluded).await.unwrap();
        let (_no_user, _) = f
            .conversation(Platform::Telegram, ann, &[(A, "greeting only")])
            .await;
        let (_no_reply, _) = f
            .conversation(Platform::Telegram, ann, &[(U, "anyone?")])
            .await;
        // A group conversation started by ann in which eve (excluded) also writes: eve's
        // message and the reply to it go, the rest stays.
        let (group, ids) = f
            .conversation(
                Platform::Telegram,
                ann,
                &[
                    (U, "ann asks"),
                    (A, "to ann"),
                    (U, "eve asks"),
                    (A, "to eve"),
                ],
            )
            .await;
        sql::execute(
            f.db.pool(),
            "update messages set user_id = ? where id = ?",
            (eve, ids[2]),
        )
        .await
        .unwrap();
        // A conversation started by eve goes whole.
        let (_eves, _) = f
            .conversation(Platform::Telegram, eve, &[(U, "mine"), (A, "yours")])
            .await;
        sql::execute(
            f.db.pool(),
            "update platform_users set excluded_from_training = 1 where id = ?",
            (eve,),
        )
        .await
        .unwrap();
        let (discord, _) = f
            .conversation(Platform::Discord, bob, &[(U, "b1"), (A, "r3")])
            .await;
        f.set_created(discord, "2025-12-31T23:00:00.000Z").await;
        f.set_created(kept, "2026-06-01T10:00:00.000Z").await;
        f.set_created(group, "2026-06-02T10:00:00.000Z").await;

        assert_eq!(
            built(&f.db, &BuildFilter::default()).await,
            [
                (kept, vec![msg(U, "a1", None), msg(A, "r1", None)]),
                (
                    group,
                    vec![msg(U, "ann asks", None), msg(A, "to ann", None)]
                ),
                (discord, vec![msg(U, "b1", None), msg(A, "r3", None)]),
            ],
            "a blank system prompt is left out; so is the unanswered question"
        );
        let telegram = BuildFilter {
            platform: Some(Platform::Telegram),
            ..Default::default()
        };
        let ids: Vec<i64> = built(&f.db, &telegram).await.iter().map(|e| e.0).collect();
        assert_eq!(ids, [kept, group]);
        let until_2025 = BuildFilter {
            to: Some("2025-12-31".parse().unwrap()),
            ..Default::default()
        };
        let ids: Vec<i64> = built(&f.db, &until_2025)
            .await
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(ids, [discord]);
        let from_2026 = BuildFilter {
            from: Some("2026-01-01".parse().unwrap()),
            ..Default::default()
        };
        assert!(
            !built(&f.db, &from_2026)
                .await
                .iter()
                .any(|e| e.0 == discord)
        );
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn jobs_using_a_dataset_are_listed(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let examples = [ChatExample {
            messages: vec![msg(U, "q", None), msg(A, "a", None)],
        }];
        let d = db
            .insert_dataset(&NewDataset {
                assistant_id: None,
                name: "faq",
                format: "openai",
                source: "t",
                content_hash: "h",
                examples: &examples,
                ..Default::default()
            })
            .await
            .unwrap()
            .dataset()
            .clone();
        assert_eq!(db.dataset_by_id(d.id).await.unwrap(), d);
        assert!(db.jobs_using_dataset(d.id).await.unwrap().is_empty());
        let job = db
            .create_job(&NewJob {
                dataset_id: d.id,
                assistant_id: None,
                base_model: "tiny",
                method: "lora",
                hyperparameters: &serde_json::json!({}),
            })
            .await
            .unwrap();
        assert_eq!(db.jobs_using_dataset(d.id).await.unwrap(), [job.id]);
        assert!(matches!(
            db.dataset_by_id(d.id + 1).await,
            Err(StorageError::NotFound { .. })
        ));
    }

    #[test]
    fn filters_parse_from_their_names() {
        assert_eq!("discord".parse::<Platform>(), Ok(Platform::Discord));
        assert!("irc".parse::<Platform>().is_err());
        for r in RatingFilter::ALL {
            assert_eq!(r.as_str().parse::<RatingFilter>(), Ok(r));
        }
        assert!("good".parse::<RatingFilter>().is_err());
    }
}
