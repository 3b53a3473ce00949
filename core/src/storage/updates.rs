//! Inbound platform updates, stored before they are confirmed to the platform: the bot
//! works from this table, so an update read but not yet answered survives a crash.

use super::{Db, Platform, Result};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingUpdate {
    pub update_key: String,
    pub payload: String,
}

impl Db {
    /// Store an update as pending; false if it was already stored (redelivered).
    pub async fn store_update(&self, platform: Platform, key: &str, payload: &str) -> Result<bool> {
        Ok(sqlx::query(
            "insert into inbound_updates (platform, update_key, payload, status) values (?, ?, ?, 'pending')
             on conflict do nothing",
        )
        .bind(platform.as_str())
        .bind(key)
        .bind(payload)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1)
    }

    /// Updates stored but not yet handled, oldest first (numeric keys in numeric order). (A
    /// pending row without a payload reads as an empty one: its handler fails it rather than
    /// the whole read failing.)
    pub async fn pending_updates(&self, platform: Platform) -> Result<Vec<PendingUpdate>> {
        Ok(sqlx::query_as(
            "select update_key, coalesce(payload, '') as payload from inbound_updates
             where platform = ? and status = 'pending' order by length(update_key), update_key",
        )
        .bind(platform.as_str())
        .fetch_all(self.pool())
        .await?)
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
        sqlx::query(
            "update inbound_updates set status = case when ?1 is null then 'done' else 'failed' end,
                error = ?1, payload = null, done_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             where platform = ?2 and update_key = ?3",
        )
        .bind(error)
        .bind(platform.as_str())
        .bind(key)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// An update's status (`pending`, `done`, `failed`), if it was stored.
    pub async fn update_status(&self, platform: Platform, key: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "select status from inbound_updates where platform = ? and update_key = ?",
        )
        .bind(platform.as_str())
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(s,)| s))
    }

    /// The highest numeric update key stored for a platform (Telegram's `update_id`).
    pub async fn last_update_id(&self, platform: Platform) -> Result<Option<i64>> {
        let (max,): (Option<i64>,) = sqlx::query_as(
            "select max(cast(update_key as integer)) from inbound_updates where platform = ?",
        )
        .bind(platform.as_str())
        .fetch_one(self.pool())
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
            db.store_update(Platform::Telegram, "10", "{\"a\":1}")
                .await
                .unwrap()
        );
        assert!(
            !db.store_update(Platform::Telegram, "10", "{\"a\":2}")
                .await
                .unwrap()
        );
        assert!(
            db.store_update(Platform::Telegram, "9", "{}")
                .await
                .unwrap()
        );
        assert!(
            db.store_update(Platform::Telegram, "100", "{}")
                .await
                .unwrap()
        );
        let keys: Vec<String> = db
            .pending_updates(Platform::Telegram)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.update_key)
            .collect();
        assert_eq!(keys, ["9", "10", "100"]);
        assert_eq!(
            db.last_update_id(Platform::Telegram).await.unwrap(),
            Some(100)
        );
        db.finish_update(Platform::Telegram, "10", None)
            .await
            .unwrap();
        db.finish_update(Platform::Telegram, "9", Some("blocked by the user"))
            .await
            .unwrap();
        let left = db.pending_updates(Platform::Telegram).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].update_key, "100");
        // A finished update keeps no copy of the message; a pending one keeps it.
        let payloads: Vec<(String, Option<String>)> = sqlx::query_as(
            "select update_key, payload from inbound_updates order by length(update_key), update_key",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(
            payloads,
            [
                ("9".to_string(), None),
                ("10".to_string(), None),
                ("100".to_string(), Some("{}".to_string()))
            ]
        );
        assert_eq!(db.last_update_id(Platform::Discord).await.unwrap(), None);
    }
}
