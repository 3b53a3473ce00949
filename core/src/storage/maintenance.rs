//! Keeping the database healthy over months: an online backup, moving adapter folders
//! on a restore, and retention for the tables that would otherwise only grow.

use super::{Db, Result, StorageError, sql};
use std::path::Path;

/// How long rows of the growing tables are kept (`retention:` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Handled platform updates (pending ones are always kept).
    pub updates_days: f64,
    /// Events of jobs that ended (their step losses, messages).
    pub training_events_days: f64,
    /// The audit log.
    pub audit_days: f64,
}

/// Rows removed by one retention pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub updates: u64,
    pub sessions: u64,
    pub training_events: u64,
    pub audit: u64,
    pub cursors: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.updates + self.sessions + self.training_events + self.audit + self.cursors
    }
}

impl Db {
    /// A consistent copy of the whole database at `path` (SQLite's `VACUUM INTO`: online,
    /// the server may keep running). `path` must not exist.
    pub async fn backup_into(&self, path: &Path) -> Result<()> {
        sql::execute(self.pool(), "vacuum into ?", (path.display().to_string(),)).await?;
        Ok(())
    }

    /// SQLite's check of every page and index: an error naming the first problem it
    /// finds (a restore refuses a damaged copy before it replaces anything).
    pub async fn integrity_check(&self) -> Result<()> {
        let first: Option<String> = sql::value(self.pool(), "pragma integrity_check", ()).await?;
        match first.as_deref() {
            Some("ok") => Ok(()),
            other => Err(StorageError::Invalid {
                what: "database".into(),
                message: format!(
                    "the integrity check failed: {}",
                    other.unwrap_or("no answer")
                ),
            }),
        }
    }

    /// Fold the write-ahead log into the file and end every connection, so the file alone
    /// holds the whole database (and may be moved).
    pub async fn close(&self) -> Result<()> {
        sql::execute(self.pool(), "pragma wal_checkpoint(truncate)", ()).await?;
        self.pool().close().await;
        Ok(())
    }

    /// Adapters whose folder starts with `from`: moved under `to` (a restore into another
    /// data folder). Returns how many.
    pub async fn relocate_adapters(&self, from: &str, to: &str) -> Result<u64> {
        Ok(sql::execute(
            self.pool(),
            "update adapters set path = ?2 || substr(path, length(?1) + 1)
             where substr(path, 1, length(?1)) = ?1",
            (from, to),
        )
        .await?
        .rows_affected())
    }

    /// Delete what `retention` no longer keeps, and expired console sessions.
    pub async fn prune(&self, retention: &Retention) -> Result<Pruned> {
        let before = |days: f64| {
            format!(
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{} seconds')",
                (days * 86400.0) as i64
            )
        };
        let now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
        let delete = |sql: String| async move {
            let done = sql::execute(self.pool(), &sql, ()).await?;
            Ok::<_, StorageError>(done.rows_affected())
        };
        Ok(Pruned {
            updates: delete(format!(
                "delete from inbound_updates where status in ('done', 'failed') and created_at < {}",
                before(retention.updates_days)
            ))
            .await?,
            sessions: delete(format!("delete from web_sessions where expires_at < {now}")).await?,
            training_events: delete(format!(
                "delete from training_events where job_id in (
                    select id from training_jobs
                    where state in ('succeeded', 'failed', 'cancelled') and finished_at < {})",
                before(retention.training_events_days)
            ))
            .await?,
            audit: delete(format!(
                "delete from audit_log where at < {}",
                before(retention.audit_days)
            ))
            .await?,
            // Channels not heard from in a long while are not read again after downtime.
            cursors: delete(format!(
                "delete from channel_cursors where updated_at < {}",
                before(90.0)
            ))
            .await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Platform;
    use sqlx::SqlitePool;

    async fn count(db: &Db, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn retention_removes_old_handled_rows_and_keeps_the_rest(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        for (key, status, days_ago) in [
            ("1:1", "done", 40),
            ("1:2", "failed", 40),
            ("1:3", "pending", 40),
            ("1:4", "done", 2),
        ] {
            db.store_update(Platform::Telegram, key, "{}")
                .await
                .unwrap();
            sql::execute(
                db.pool(),
                &format!(
                    "update inbound_updates set status = ?, created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{days_ago} days') where update_key = ?"
                ),
                (status, key),
            )
            .await
            .unwrap();
        }
        db.audit("console:admin", "activate", Some("adapter 1"), None)
            .await
            .unwrap();
        db.audit("console:admin", "rollback", None, None)
            .await
            .unwrap();
        sql::execute(
            db.pool(),
            "update audit_log set at = '2020-01-01T00:00:00.000Z' where action = 'activate'",
            (),
        )
        .await
        .unwrap();
        let p = db
            .prune(&Retention {
                updates_days: 30.0,
                training_events_days: 365.0,
                audit_days: 365.0,
            })
            .await
            .unwrap();
        assert_eq!((p.updates, p.audit), (2, 1));
        let keys: Vec<String> =
            sqlx::query_scalar("select update_key from inbound_updates order by update_key")
                .fetch_all(db.pool())
                .await
                .unwrap();
        assert_eq!(keys, ["1:3", "1:4"], "pending and recent rows stay");
        assert_eq!(count(&db, "select count(*) from audit_log").await, 1);
        let entries = db.audit_entries(None, 10).await.unwrap();
        assert_eq!(entries[0].action, "rollback");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_backup_is_a_database_of_its_own(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        db.audit("api", "create job", Some("job 1"), None)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("b.db");
        db.backup_into(&copy).await.unwrap();
        let restored = Db::open(&copy).await.unwrap();
        let e = restored.audit_entries(None, 5).await.unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].target.as_deref(), Some("job 1"));
        assert!(
            db.backup_into(&copy).await.is_err(),
            "an existing file is not overwritten"
        );
    }
}
