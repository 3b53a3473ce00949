//! SQLite storage through sqlx. Migrations from `migrations/` are embedded in the binary
//! and applied when the database is opened. WAL mode, foreign keys on, `STRICT` tables.
//!
//! Queries are written with the runtime-checked `sqlx::query*` functions rather than the
//! compile-time macros, so building needs no database and no `DATABASE_URL`; every query is
//! exercised by the `#[sqlx::test]` tests of its repository.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE`: a deferred transaction
//! that reads and then writes fails with `SQLITE_BUSY_SNAPSHOT` (no waiting helps) when
//! another connection committed in between, which concurrent bot handlers hit at once.

mod adapters;
mod admin;
mod assistants;
mod audit;
mod chat;
mod curation;
mod datasets;
mod forget;
mod jobs;
mod maintenance;
mod routing;
mod updates;

pub use crate::preference::PreferenceRows;
pub use adapters::{Adapter, NewAdapter, RollbackStep};
pub use assistants::{
    Assistant, AssistantSettings, ROUTE_SCOPES, Route, validate_assistant_name, validate_route,
};
pub use audit::AuditEntry;
pub use chat::{Conversation, Feedback, NewMessage, Platform, PlatformUser, StoredMessage};
pub use curation::{
    BuildFilter, ConversationDetail, ConversationExample, ConversationFilter, ConversationSummary,
    MessageWithFeedback, OPERATOR, PLATFORMS, RatingFilter,
};
pub use datasets::{
    Dataset, DatasetInsert, NewDataset, StoredExample, validate_name as validate_dataset_name,
};
pub use forget::{Forgotten, lines_hash};
pub use jobs::{JobState, NewJob, NewTrainingEvent, TrainingEvent, TrainingJob};
pub use maintenance::{Pruned, Retention};
pub use routing::{Canary, DailyRatings, Pin};
pub use updates::PendingUpdate;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// The embedded migrations (the `migrations/` folder at the workspace root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create the database folder {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A handle to the database: cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Open (creating if needed) the SQLite file at `path` and apply pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StorageError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::connect(opts).await
    }

    /// Open a database URL such as `sqlite::memory:` (tests, tools).
    pub async fn open_url(url: &str) -> Result<Self> {
        Self::connect(SqliteConnectOptions::from_str(url)?.create_if_missing(true)).await
    }

    async fn connect(opts: SqliteConnectOptions) -> Result<Self> {
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Deleted rows are overwritten, not left in free pages: `/forget` leaves no copy
            // of a user's text in the file.
            .pragma("secure_delete", "on")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// Wrap a pool whose migrations have already been applied (`#[sqlx::test]`).
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Row counts the dashboard and `loraloop status` show.
    pub async fn counts(&self) -> Result<Counts> {
        let row: (i64, i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from conversations), (select count(*) from messages),
                    (select count(*) from feedback where rating is not null),
                    (select count(*) from datasets)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Counts {
            conversations: row.0,
            messages: row.1,
            rated_replies: row.2,
            datasets: row.3,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub conversations: i64,
    pub messages: i64,
    pub rated_replies: i64,
    pub datasets: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opening_a_file_creates_it_in_wal_mode_with_foreign_keys_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/loraloop.db");
        let db = Db::open(&path).await.unwrap();
        assert!(path.exists());
        let (mode,): (String,) = sqlx::query_as("pragma journal_mode")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let (fk,): (i64,) = sqlx::query_as("pragma foreign_keys")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(fk, 1);
        // Re-opening applies nothing twice.
        drop(db);
        Db::open(&path).await.unwrap();
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn every_table_is_strict(pool: SqlitePool) {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "select name, strict from pragma_table_list where schema = 'main'
             and type = 'table' and name not like 'sqlite_%' and name != '_sqlx_migrations'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(rows.len() >= 14, "{rows:?}");
        for (name, strict) in rows {
            assert_eq!(strict, 1, "table {name} is not STRICT");
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_strict_table_refuses_a_value_of_the_wrong_type(pool: SqlitePool) {
        let err = sqlx::query("insert into chats (platform, platform_chat_id, created_at) values ('telegram', '1', x'00')")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot store BLOB value in TEXT column"),
            "{err}"
        );
    }
}
