//! Which adapter serves a conversation: its pin (kept until it has been idle), the
//! running canary and its rating counts, and each adapter's ratings over time.

use super::{Db, Result, sql};
use crate::canary::Ratings;
use serde::Serialize;

/// A conversation's pin, as the router needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    /// None: the base model.
    pub adapter_id: Option<i64>,
    /// Seconds since the conversation's last message (or since the pin, without messages).
    pub idle_secs: f64,
    /// False when the pinned adapter was deleted or rolled back after the pin.
    pub valid: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Canary {
    pub id: i64,
    pub assistant_id: i64,
    pub adapter_id: i64,
    pub baseline_adapter_id: Option<i64>,
    pub share: f64,
    pub started_at: String,
    pub ended_at: Option<String>,
    /// `promoted`, `rolled_back` or `cancelled` once ended.
    pub outcome: Option<String>,
    pub reason: Option<String>,
}

/// 👍 and 👎 on an adapter's replies on one day (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DailyRatings {
    pub day: String,
    pub up: i64,
    pub down: i64,
}

const CANARY_COLUMNS: &str = "id, assistant_id, adapter_id, baseline_adapter_id, share, started_at, ended_at, outcome, reason";

impl Db {
    /// The pin of a conversation, if it has one.
    pub async fn conversation_pin(&self, conversation_id: i64) -> Result<Option<Pin>> {
        let row: Option<(Option<i64>, f64, i64)> = sql::optional(
            self.pool(),
            "select c.pinned_adapter_id,
                    (julianday('now') - julianday(coalesce(
                        (select max(m.created_at) from messages m where m.conversation_id = c.id),
                        c.pinned_at))) * 86400.0,
                    c.pinned_adapter_id is null or exists (
                        select 1 from adapters a where a.id = c.pinned_adapter_id
                        and (a.rolled_back_at is null or a.rolled_back_at < c.pinned_at))
             from conversations c where c.id = ? and c.pinned_at is not null",
            (conversation_id,),
        )
        .await?;
        Ok(row.map(|(adapter_id, idle_secs, valid)| Pin {
            adapter_id,
            idle_secs,
            valid: valid != 0,
        }))
    }

    /// Pin a conversation to `adapter_id` (None: the base model) from now.
    pub async fn pin_conversation(
        &self,
        conversation_id: i64,
        adapter_id: Option<i64>,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update conversations set pinned_adapter_id = ?, pinned_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
            (adapter_id, conversation_id),
        )
        .await?;
        Ok(())
    }

    /// Start a canary of `adapter_id` against what the assistant has active now. A canary
    /// already running is ended first (cancelled: the newer adapter replaces it).
    pub async fn start_canary(
        &self,
        assistant_id: i64,
        adapter_id: i64,
        share: f64,
    ) -> Result<Canary> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sql::execute(
            &mut *tx,
            "update canaries set ended_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), outcome = 'cancelled',
                reason = 'replaced by the canary of a newer adapter'
             where assistant_id = ? and ended_at is null",
            (assistant_id,),
        )
        .await?;
        let canary: Canary = sql::one(
            &mut *tx,
            &format!(
                "insert into canaries (assistant_id, adapter_id, baseline_adapter_id, share)
                 select id, ?, active_adapter_id, ? from assistants where id = ?
                 returning {CANARY_COLUMNS}"
            ),
            (adapter_id, share, assistant_id),
        )
        .await?;
        tx.commit().await?;
        Ok(canary)
    }

    /// The assistant's running canary, if any.
    pub async fn running_canary(&self, assistant_id: i64) -> Result<Option<Canary>> {
        sql::optional(
            self.pool(),
            &format!(
                "select {CANARY_COLUMNS} from canaries where assistant_id = ? and ended_at is null"
            ),
            (assistant_id,),
        )
        .await
    }

    pub async fn canary(&self, id: i64) -> Result<Canary> {
        self.row_by_id("canaries", CANARY_COLUMNS, id, "canary ")
            .await
    }

    /// The assistant's canaries, newest first.
    pub async fn canaries(&self, assistant_id: i64, limit: i64) -> Result<Vec<Canary>> {
        sql::all(
            self.pool(),
            &format!(
                "select {CANARY_COLUMNS} from canaries where assistant_id = ? order by id desc limit ?"
            ),
            (assistant_id, limit),
        )
        .await
    }

    /// End a running canary. A rolled-back candidate is marked so that conversations
    /// pinned to it move on at their next turn. False when it had already ended (another
    /// process decided first).
    pub async fn end_canary(&self, id: i64, outcome: &str, reason: &str) -> Result<bool> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let ended = sql::execute(
            &mut *tx,
            "update canaries set ended_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), outcome = ?, reason = ?
             where id = ? and ended_at is null",
            (outcome, reason, id),
        )
        .await?
        .rows_affected()
            == 1;
        if ended && outcome == "rolled_back" {
            sql::execute(
                &mut *tx,
                "update adapters set rolled_back_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 where id = (select adapter_id from canaries where id = ?)",
                (id,),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(ended)
    }

    /// Rated replies (👍 and all) served by `adapter_id` (None: the base model) since
    /// `since`, in the assistant's routed conversations (bot chats; not the playground).
    pub async fn routed_ratings(
        &self,
        assistant_id: i64,
        adapter_id: Option<i64>,
        since: &str,
    ) -> Result<Ratings> {
        let (up, rated): (i64, i64) = sql::one(
            self.pool(),
            "select coalesce(sum(f.rating = 1), 0), count(*)
             from messages m
             join conversations c on c.id = m.conversation_id
             join feedback f on f.message_id = m.id
             where m.role = 'assistant' and m.adapter_id is ? and m.created_at >= ?
               and c.assistant_id = ? and c.pinned_at is not null and f.rating is not null",
            (adapter_id, since, assistant_id),
        )
        .await?;
        Ok(Ratings {
            up: up as u64,
            rated: rated as u64,
        })
    }

    /// 👍 and 👎 on an adapter's replies per day, oldest first (None: the base model).
    pub async fn daily_ratings(
        &self,
        adapter_id: Option<i64>,
        days: i64,
    ) -> Result<Vec<DailyRatings>> {
        sql::all(
            self.pool(),
            "select substr(m.created_at, 1, 10) as day,
                    coalesce(sum(f.rating = 1), 0) as up, coalesce(sum(f.rating = -1), 0) as down
             from messages m join feedback f on f.message_id = m.id
             where m.role = 'assistant' and m.adapter_id is ? and f.rating is not null
               and m.created_at >= strftime('%Y-%m-%dT00:00:00Z', 'now', printf('-%d days', ? - 1))
             group by day order by day",
            (adapter_id, days),
        )
        .await
    }
}
