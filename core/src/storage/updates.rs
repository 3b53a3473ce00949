//! Inbound platform updates, stored before they are confirmed to the platform: the bot
//! works from this table, so an update read but not yet answered survives a crash.

use super::{Db, Platform, Result, sql};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingUpdate {
    pub update_key: String,
    pub payload: String,
}

impl Db {
    /// Store an update as pending; false if it was already stored (redelivered).
    pub async fn store_update(&self, platform: Platform, key: &str, payload: &str) -> Result<bool> {
        Ok(sql::execute(
            self.pool(),
            "insert into inbound_updates (platform, update_key, payload, status) values (?, ?, ?, 'pending')
             on conflict do nothing",
            (platform.as_str(), key, payload),
        )
        .await?
        .rows_affected()
            == 1)
    }

    /// Updates stored but not yet handled, oldest first (numeric keys in numeric order), of
    /// one `source` when given (keys `SOURCE:ID`: one Telegram bot's). (A pending row
    /// without a payload reads as an empty one: its handler fails it rather than the whole
    /// read failing.)
    pub async fn pending_updates(
        &self,
        platform: Platform,
        source: Option<&str>,
    ) -> Result<Vec<PendingUpdate>> {
        sql::all(
            self.pool(),
            "select update_key, coalesce(payload, '') as payload from inbound_updates
             where platform = ?1 and status = 'pending' and (?2 is null or update_key like ?2 || ':%')
               and (retry_at is null or retry_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             order by length(update_key), update_key",
            (platform.as_str(), source),
        )
        .await
    }

    /// Give the keys stored without a source (before there were several Telegram bots:
    /// they were all one bot's) to `source`. Returns how many.
    pub async fn adopt_unscoped_updates(&self, platform: Platform, source: &str) -> Result<u64> {
        Ok(sql::execute(
            self.pool(),
            "update or ignore inbound_updates set update_key = ?1 || ':' || update_key
             where platform = ?2 and instr(update_key, ':') = 0",
            (source, platform.as_str()),
        )
        .await?
        .rows_affected())
    }

    /// Record how an update ended: `error` None is done, Some is failed (not retried). The
    /// payload (the whole platform message, with the user's text) is dropped: only pending
    /// updates are read from it, and `/forget` must leave no copy of a user's text behind.
    pub async fn finish_update(
        &self,
        platform: Platform,
        key: &str,
        error: Option<&str>,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update inbound_updates set status = case when ?1 is null then 'done' else 'failed' end,
                error = ?1, payload = null, done_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             where platform = ?2 and update_key = ?3",
            (error, platform.as_str(), key),
        )
        .await?;
        Ok(())
    }

    /// A reply that failed for a passing reason: the update stays pending, to be tried
    /// again in `retry_in_secs`. Returns the attempts so far.
    pub async fn postpone_update(
        &self,
        platform: Platform,
        key: &str,
        error: &str,
        retry_in_secs: f64,
    ) -> Result<i64> {
        let (attempts,): (i64,) = sql::one(
            self.pool(),
            "update inbound_updates set attempts = attempts + 1, error = ?1,
                retry_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+' || ?2 || ' seconds')
             where platform = ?3 and update_key = ?4 returning attempts",
            (error, retry_in_secs, platform.as_str(), key),
        )
        .await?;
        Ok(attempts)
    }

    /// How old a stored update is, in seconds, and how many times its reply failed.
    pub async fn update_age(&self, platform: Platform, key: &str) -> Result<Option<(f64, i64)>> {
        sql::optional(
            self.pool(),
            "select (julianday('now') - julianday(created_at)) * 86400.0, attempts
             from inbound_updates where platform = ? and update_key = ?",
            (platform.as_str(), key),
        )
        .await
    }

    /// Record the platform message a reply to this update is streamed into.
    pub async fn record_update_reply(
        &self,
        platform: Platform,
        key: &str,
        platform_id: &str,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "update inbound_updates set reply_platform_id = ? where platform = ? and update_key = ?",
            (platform_id, platform.as_str(), key),
        )
        .await?;
        Ok(())
    }

    /// The platform message a reply to this update was being streamed into, if any.
    pub async fn update_reply(&self, platform: Platform, key: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> = sql::optional(
            self.pool(),
            "select reply_platform_id from inbound_updates where platform = ? and update_key = ?",
            (platform.as_str(), key),
        )
        .await?;
        Ok(row.and_then(|(r,)| r))
    }

    /// Record that the bot stored message `message_id` of `channel` (the cursor only moves
    /// forward).
    pub async fn advance_cursor(
        &self,
        platform: Platform,
        channel: &str,
        guild: Option<&str>,
        message_id: i64,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "insert into channel_cursors (platform, channel, guild, last_message_id) values (?1, ?2, ?3, ?4)
             on conflict (platform, channel) do update set
                last_message_id = max(last_message_id, excluded.last_message_id),
                guild = coalesce(excluded.guild, guild),
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            (platform.as_str(), channel, guild, message_id),
        )
        .await?;
        Ok(())
    }

    /// The channels the bot stored a message in during the last `days`, newest first, at
    /// most `limit`: (channel, guild, last message id).
    pub async fn cursors(
        &self,
        platform: Platform,
        days: i64,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>, i64)>> {
        sql::all(
            self.pool(),
            "select channel, guild, last_message_id from channel_cursors
             where platform = ?1 and updated_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ?2 || ' days')
             order by updated_at desc limit ?3",
            (platform.as_str(), days, limit),
        )
        .await
    }

    /// An update's status (`pending`, `done`, `failed`), if it was stored.
    pub async fn update_status(&self, platform: Platform, key: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sql::optional(
            self.pool(),
            "select status from inbound_updates where platform = ? and update_key = ?",
            (platform.as_str(), key),
        )
        .await?;
        Ok(row.map(|(s,)| s))
    }

    /// The highest update id stored under `source` (keys `SOURCE:ID`: one Telegram bot's
    /// `update_id`s).
    pub async fn last_update_id(&self, platform: Platform, source: &str) -> Result<Option<i64>> {
        let (max,): (Option<i64>,) = sql::one(
            self.pool(),
            "select max(cast(substr(update_key, length(?1) + 2) as integer)) from inbound_updates
             where platform = ?2 and update_key like ?1 || ':%'",
            (source, platform.as_str()),
        )
        .await?;
        Ok(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    #[sqlx::test(migrations = "../migrations")]
    async fn an_update_is_stored_once_and_pending_until_finished(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        assert!(
            db.store_update(Platform::Telegram, "7:10", "{\"a\":1}")
                .await
                .unwrap()
        );
        assert!(
            !db.store_update(Platform::Telegram, "7:10", "{\"a\":2}")
                .await
                .unwrap()
        );
        assert!(
            db.store_update(Platform::Telegram, "7:9", "{}")
                .await
                .unwrap()
        );
        assert!(
            db.store_update(Platform::Telegram, "7:100", "{}")
                .await
                .unwrap()
        );
        // Another bot's update, and one stored before keys had a bot.
        assert!(
            db.store_update(Platform::Telegram, "8:5", "{}")
                .await
                .unwrap()
        );
        assert!(
            db.store_update(Platform::Telegram, "3", "{}")
                .await
                .unwrap()
        );
        assert_eq!(
            db.adopt_unscoped_updates(Platform::Telegram, "7")
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            db.last_update_id(Platform::Telegram, "8").await.unwrap(),
            Some(5)
        );
        db.finish_update(Platform::Telegram, "8:5", None)
            .await
            .unwrap();
        db.finish_update(Platform::Telegram, "7:3", None)
            .await
            .unwrap();
        let keys: Vec<String> = db
            .pending_updates(Platform::Telegram, Some("7"))
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.update_key)
            .collect();
        assert_eq!(keys, ["7:9", "7:10", "7:100"]);
        assert_eq!(
            db.last_update_id(Platform::Telegram, "7").await.unwrap(),
            Some(100)
        );
        db.finish_update(Platform::Telegram, "7:10", None)
            .await
            .unwrap();
        db.finish_update(Platform::Telegram, "7:9", Some("blocked by the user"))
            .await
            .unwrap();
        let left = db.pending_updates(Platform::Telegram, None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].update_key, "7:100");
        // A finished update keeps no copy of the message; a pending one keeps it.
        let payloads: Vec<(String, Option<String>)> = sql::all(
            db.pool(),
            "select update_key, payload from inbound_updates where update_key in ('7:9', '7:10', '7:100')
             order by length(update_key), update_key",
            (),
        )
        .await
        .unwrap();
        assert_eq!(
            payloads,
            [
                ("7:9".to_string(), None),
                ("7:10".to_string(), None),
                ("7:100".to_string(), Some("{}".to_string()))
            ]
        );
        assert_eq!(
            db.last_update_id(Platform::Discord, "7").await.unwrap(),
            None
        );
    }
}
