//! SQLite storage through sqlx. Migrations from `migrations/` are embedded in the binary
//! and applied when the database is opened. WAL mode, foreign keys on, `STRICT` tables.
//!
//! Queries run through [`sql`]'s `execute` / `one` / `optional` / `all`, which bind a tuple
//! of parameters to sqlx's runtime-checked queries. Not the compile-time macros: building
//! needs no database and no `DATABASE_URL`. Every query is exercised by the `#[sqlx::test]`
//! tests of its repository.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE`: a deferred transaction
//! that reads and then writes fails with `SQLITE_BUSY_SNAPSHOT` (no waiting helps) when
//! another connection committed in between, which concurrent bot handlers hit at once.

mod adapters;
mod admin;
mod assistants;
mod audit;
mod chat;
mod classifier_jobs;
mod curation;
mod datasets;
mod files;
mod forget;
mod jobs;
mod maintenance;
mod routing;
mod sql;
mod sweeps;
mod updates;

pub use crate::preference::PreferenceRows;
pub use adapters::{Adapter, NewAdapter, RollbackStep};
pub use assistants::{
    Assistant, AssistantSettings, ROUTE_SCOPES, Route, validate_assistant_name, validate_route,
};
pub use audit::AuditEntry;
pub use chat::{Conversation, Feedback, NewMessage, Platform, PlatformUser, StoredMessage};
pub use classifier_jobs::{ClassifierJob, ClassifierJobEvent, NewClassifierJob};
pub use curation::{
    BuildFilter, ConversationDetail, ConversationExample, ConversationFilter, ConversationSummary,
    MessageWithFeedback, OPERATOR, RatingFilter,
};
pub use datasets::{
    Dataset, DatasetInsert, NewDataset, StoredExample, validate_name as validate_dataset_name,
};
pub use files::{NewFile, StoredFile};
pub use forget::{Forgotten, lines_hash};
pub use jobs::{
    JobState, NewFileJob, NewJob, NewTrainingEvent, Recovered, TrainingEvent, TrainingJob,
};
pub use maintenance::{Pruned, Retention};
pub use routing::{Canary, DailyRatings, Pin};
pub use sweeps::Sweep;
pub use updates::PendingUpdate;

use sql::Found;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::time::Duration;

/// The embedded migrations (the `migrations/` folder at the workspace root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    // The messages hold their cause's text, so the cause is not also a `source`: with it,
    // a chain printed whole (`{:#}`) said "UNIQUE constraint failed" three times.
    #[error("cannot create the database folder {path}: {error}")]
    CreateDir {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlx(sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    /// The row would clash with one that exists (a taken name).
    #[error("{message}")]
    Conflict { message: String },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        Self::Sqlx(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StorageError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

/// Apply pending migrations on a connection of their own with foreign keys off: a table
/// rebuild (SQLite's documented way to change a column) drops the old table, and with
/// foreign keys on that drop would run the children's `on delete` actions (cascading away
/// a job's events). `foreign_key_check` afterwards proves every link still holds.
async fn migrate(opts: &SqliteConnectOptions) -> Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect_with(&opts.clone().foreign_keys(false)).await?;
    MIGRATOR.run(&mut conn).await?;
    let broken: Vec<(String, Option<i64>)> = sql::all(
        &mut conn,
        "select \"table\", rowid from pragma_foreign_key_check",
        (),
    )
    .await?;
    conn.close().await?;
    if let Some((table, row)) = broken.first() {
        return Err(StorageError::Invalid {
            what: "database".into(),
            message: format!(
                "after the migrations, {} row(s) point at rows that do not exist (first: {table} row {row:?})",
                broken.len()
            ),
        });
    }
    Ok(())
}

/// A handle to the database: cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Open (creating if needed) the SQLite file at `path` and apply pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| StorageError::CreateDir {
                path: parent.to_path_buf(),
                error,
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::connect(opts).await
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
        migrate(&opts).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    /// Wrap a pool whose migrations have already been applied (`#[sqlx::test]`).
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Row `id` of `table` read as `T` from its `columns`; not found: `"{what}{id}"`.
    async fn row_by_id<T>(&self, table: &str, columns: &str, id: i64, what: &str) -> Result<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let found: Option<T> = sql::optional(
            &self.pool,
            &format!("select {columns} from {table} where id = ?"),
            (id,),
        )
        .await?;
        found.found(|| format!("{what}{id}"))
    }

    /// `columns` ("a, b") as `alias.a, alias.b`, for a query that joins tables.
    fn qualified(columns: &str, alias: &str) -> String {
        columns
            .split(", ")
            .map(|c| format!("{alias}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Row counts the dashboard and `loraloop status` show.
    pub async fn counts(&self) -> Result<Counts> {
        let row: (i64, i64, i64, i64) = sql::one(
            &self.pool,
            "select (select count(*) from conversations), (select count(*) from messages),
                    (select count(*) from feedback where rating is not null),
                    (select count(*) from datasets)",
            (),
        )
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
    use std::str::FromStr;

    #[tokio::test]
    async fn opening_a_file_creates_it_in_wal_mode_with_foreign_keys_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/loraloop.db");
        let db = Db::open(&path).await.unwrap();
        assert!(path.exists());
        let (mode,): (String,) = sql::one(db.pool(), "pragma journal_mode", ())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let (fk,): (i64,) = sql::one(db.pool(), "pragma foreign_keys", ())
            .await
            .unwrap();
        assert_eq!(fk, 1);
        // Re-opening applies nothing twice.
        drop(db);
        Db::open(&path).await.unwrap();
    }

    #[tokio::test]
    async fn a_database_error_printed_with_its_causes_says_what_failed_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let insert = "insert into admin_credentials (username, password_hash) values ('a', 'h')";
        sql::execute(db.pool(), insert, ()).await.unwrap();
        let e = sql::execute(db.pool(), insert, ()).await.unwrap_err();
        let whole = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            whole.matches("UNIQUE constraint failed").count(),
            1,
            "{whole}"
        );
    }

    /// The tables with a foreign key that points nowhere.
    async fn broken_links(pool: &SqlitePool) -> Vec<(String,)> {
        sql::all(pool, "select \"table\" from pragma_foreign_key_check", ())
            .await
            .unwrap()
    }

    /// A database in `dir` migrated up to (not including) migration `version`, and a pool
    /// on it with foreign keys on, as a server would have left it.
    async fn migrated_before(
        dir: &std::path::Path,
        version: i64,
    ) -> (SqliteConnectOptions, SqlitePool) {
        let url = format!("sqlite://{}?mode=rwc", dir.join("old.db").display());
        let opts = SqliteConnectOptions::from_str(&url).unwrap();
        let pool = SqlitePool::connect_with(opts.clone().foreign_keys(true))
            .await
            .unwrap();
        let before: Vec<_> = MIGRATOR
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect();
        let old = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(before),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        old.run(&pool).await.unwrap();
        (opts, pool)
    }

    /// The rebuild of `training_jobs` (nullable `dataset_id`) on a database that has jobs,
    /// their events and adapters: every row and every link survives, cascades included.
    #[tokio::test]
    async fn rebuilding_training_jobs_keeps_jobs_events_and_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, pool) = migrated_before(dir.path(), 20261204000001).await;
        for q in [
            "insert into datasets (id, name, version, content_hash, format, source, example_count) values (1, 'd', 1, 'h', 'openai', 'f', 0)",
            "insert into training_jobs (id, state, dataset_id, base_model, attempts) values (7, 'succeeded', 1, 'm', 1)",
            "insert into training_events (job_id, kind, step, loss) values (7, 'step', 3, 0.5)",
            "insert into adapters (id, name, path, base_model, base_model_hash, tokenizer_hash, chat_template_hash, job_id) values (2, 'job-7', 'p', 'm', 'h', 'h', 'h', 7)",
            "update training_jobs set adapter_id = 2 where id = 7",
        ] {
            sql::execute(&pool, q, ()).await.unwrap();
        }
        // With foreign keys on, the rebuild would cascade: its guard refuses to run.
        let refused = MIGRATOR.run(&pool).await;
        assert!(refused.is_err(), "{refused:?}");
        migrate(&opts).await.unwrap();
        let job: (i64, Option<i64>, i64, Option<i64>) = sql::one(
            &pool,
            "select id, dataset_id, attempts, adapter_id from training_jobs",
            (),
        )
        .await
        .unwrap();
        assert_eq!(job, (7, Some(1), 1, Some(2)));
        let adapter_job: (Option<i64>,) = sql::one(&pool, "select job_id from adapters", ())
            .await
            .unwrap();
        assert_eq!(adapter_job.0, Some(7));
        let problems = broken_links(&pool).await;
        assert!(problems.is_empty(), "{problems:?}");
        // The events still hang off the job: deleting it cascades to them.
        sql::execute(&pool, "delete from training_jobs where id = 7", ())
            .await
            .unwrap();
        let events: (i64,) = sql::one(&pool, "select count(*) from training_events", ())
            .await
            .unwrap();
        assert_eq!(events.0, 0);
    }

    /// The rebuild of `files` (results files get their own purpose) on a database whose
    /// jobs were created from files: the files, their bytes and the jobs' links survive,
    /// and deleting a file still clears the link.
    #[tokio::test]
    async fn rebuilding_files_keeps_files_and_the_jobs_links() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, pool) = migrated_before(dir.path(), 20261207000001).await;
        for q in [
            "insert into files (id, filename, purpose, bytes, content) values (4, 'a.jsonl', 'fine-tune', 3, x'7b7d0a')",
            "insert into training_jobs (id, state, base_model, training_file_id, validation_file_id) values (9, 'validating_files', 'm', 4, 4)",
        ] {
            sql::execute(&pool, q, ()).await.unwrap();
        }
        let refused = MIGRATOR.run(&pool).await;
        assert!(refused.is_err(), "{refused:?}");
        migrate(&opts).await.unwrap();
        let file: (i64, String, Vec<u8>) =
            sql::one(&pool, "select id, purpose, content from files", ())
                .await
                .unwrap();
        assert_eq!(file, (4, "fine-tune".into(), b"{}\n".to_vec()));
        sql::execute(
            &pool,
            "insert into files (filename, purpose, bytes, content) values ('r.csv', 'fine-tune-results', 0, x'')",
            (),
        )
        .await
            .unwrap();
        let problems = broken_links(&pool).await;
        assert!(problems.is_empty(), "{problems:?}");
        sql::execute(&pool, "delete from files where id = 4", ())
            .await
            .unwrap();
        let links: (Option<i64>, Option<i64>) = sql::one(
            &pool,
            "select training_file_id, validation_file_id from training_jobs",
            (),
        )
        .await
        .unwrap();
        assert_eq!(links, (None, None));
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn every_table_is_strict(pool: SqlitePool) {
        let rows: Vec<(String, i64)> = sql::all(
            &pool,
            "select name, strict from pragma_table_list where schema = 'main'
             and type = 'table' and name not like 'sqlite_%' and name != '_sqlx_migrations'",
            (),
        )
        .await
        .unwrap();
        assert!(rows.len() >= 14, "{rows:?}");
        for (name, strict) in rows {
            assert_eq!(strict, 1, "table {name} is not STRICT");
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_strict_table_refuses_a_value_of_the_wrong_type(pool: SqlitePool) {
        let err = sql::execute(
            &pool,
            "insert into chats (platform, platform_chat_id, created_at) values ('telegram', '1', x'00')",
            (),
        )
        .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot store BLOB value in TEXT column"),
            "{err}"
        );
    }
}
