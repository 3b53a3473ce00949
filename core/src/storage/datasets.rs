//! Datasets: immutable, hashed snapshots of chat examples (or of preference rows),
//! versioned per name.

use super::sql::Found;
use super::{Db, Result, StorageError, sql};
use crate::domain::ChatExample;
use crate::preference::Objective;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Dataset {
    pub id: i64,
    pub name: String,
    pub version: i64,
    pub content_hash: String,
    pub format: String,
    pub source: String,
    pub example_count: i64,
    pub created_at: String,
    /// `sft` (chat examples), `dpo` (preference pairs) or `kto` (rated replies).
    pub kind: String,
    /// The assistant whose conversations it was built from (None: any assistant's to use).
    pub assistant_id: Option<i64>,
}

impl Dataset {
    /// What the dataset holds (`sft` for a value this build does not know).
    pub fn objective(&self) -> Objective {
        self.kind.parse().unwrap_or_default()
    }
}

/// A dataset to store. `content_hash` is computed by the caller over the canonical lines
/// (`loraloop_trainer::dataset::content_hash`) so one definition of the hash exists.
#[derive(Debug, Clone, Default)]
pub struct NewDataset<'a> {
    pub name: &'a str,
    pub format: &'a str,
    pub source: &'a str,
    pub content_hash: &'a str,
    pub examples: &'a [ChatExample],
    /// Conversation each example came from, parallel to `examples` or `lines` (empty
    /// for imports).
    pub source_conversations: &'a [Option<i64>],
    /// `Sft`: `examples` holds the rows; `Dpo` and `Kto`: `lines` holds them, one JSON
    /// object each (`loraloop_core::preference`'s shapes).
    pub kind: Objective,
    pub lines: &'a [String],
    pub assistant_id: Option<i64>,
}

impl NewDataset<'_> {
    /// Each row as stored: its JSON line and its character count (what token estimates
    /// divide).
    fn rows(&self) -> Vec<(String, usize)> {
        match self.kind {
            Objective::Sft => self
                .examples
                .iter()
                .map(|e| (e.to_json_line(), e.char_len()))
                .collect(),
            Objective::Dpo | Objective::Kto => self
                .lines
                .iter()
                .map(|l| (l.clone(), l.chars().count()))
                .collect(),
        }
    }
}

/// What storing a dataset did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetInsert {
    /// A new version was created.
    Created(Dataset),
    /// The same content already exists under this name: nothing was written.
    Unchanged(Dataset),
}

impl DatasetInsert {
    pub fn dataset(&self) -> &Dataset {
        match self {
            Self::Created(d) | Self::Unchanged(d) => d,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredExample {
    pub position: i64,
    pub example: ChatExample,
    pub char_count: i64,
    pub token_count: Option<i64>,
    pub source_conversation_id: Option<i64>,
}

const COLUMNS: &str = "id, name, version, content_hash, format, source, example_count, created_at, kind, assistant_id";

impl Db {
    /// Store a dataset as the next version of `name` in one transaction: either every
    /// example is written or nothing is. Identical content under the same name is not
    /// stored twice.
    pub async fn insert_dataset(&self, new: &NewDataset<'_>) -> Result<DatasetInsert> {
        self.insert_dataset_with_progress(new, &|_| {}).await
    }

    /// [`Db::insert_dataset`], calling `progress` with the number of examples written.
    pub async fn insert_dataset_with_progress(
        &self,
        new: &NewDataset<'_>,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<DatasetInsert> {
        validate_name(new.name)?;
        let rows = new.rows();
        if rows.is_empty() {
            return Err(StorageError::Invalid {
                what: "dataset".into(),
                message: "a dataset needs at least one example".into(),
            });
        }
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let existing: Option<Dataset> = sql::optional(
            &mut *tx,
            &format!("select {COLUMNS} from datasets where name = ? and content_hash = ?"),
            (new.name, new.content_hash),
        )
        .await?;
        if let Some(d) = existing {
            return Ok(DatasetInsert::Unchanged(d));
        }
        let dataset: Dataset = sql::one(
            &mut *tx,
            &format!(
                "insert into datasets (name, version, content_hash, format, source, example_count, kind, assistant_id)
                 values (?1, (select coalesce(max(version), 0) + 1 from datasets where name = ?1), ?2, ?3, ?4, ?5, ?6, ?7)
                 returning {COLUMNS}"
            ),
            (
                new.name,
                new.content_hash,
                new.format,
                new.source,
                rows.len() as i64,
                new.kind.as_str(),
                new.assistant_id,
            ),
        )
        .await?;
        let n = rows.len();
        for (i, (line, chars)) in rows.into_iter().enumerate() {
            sql::execute(
                &mut *tx,
                "insert into dataset_examples (dataset_id, position, messages, char_count, source_conversation_id)
                 values (?, ?, ?, ?, ?)",
                (
                    dataset.id,
                    i as i64,
                    line,
                    chars as i64,
                    new.source_conversations.get(i).copied().flatten(),
                ),
            )
            .await?;
            if i % 256 == 255 || i + 1 == n {
                progress(i + 1);
            }
        }
        tx.commit().await?;
        Ok(DatasetInsert::Created(dataset))
    }

    /// Every dataset version, by name then version.
    pub async fn list_datasets(&self) -> Result<Vec<Dataset>> {
        sql::all(
            self.pool(),
            &format!("select {COLUMNS} from datasets order by name, version"),
            (),
        )
        .await
    }

    /// A dataset by name: the given version, or the latest.
    pub async fn dataset(&self, name: &str, version: Option<i64>) -> Result<Dataset> {
        let found: Option<Dataset> = sql::optional(
            self.pool(),
            &format!(
                "select {COLUMNS} from datasets where name = ?1 and (?2 is null or version = ?2)
                 order by version desc limit 1"
            ),
            (name, version),
        )
        .await?;
        found.ok_or_else(|| StorageError::NotFound {
            what: match version {
                Some(v) => format!("dataset {name:?} version {v}"),
                None => format!("dataset {name:?}"),
            },
        })
    }

    /// A dataset's example count and its rough token count (characters / 4, each example
    /// cut at `sequence_len`), for estimates before a job.
    pub async fn dataset_token_estimate(
        &self,
        dataset_id: i64,
        sequence_len: usize,
    ) -> Result<(i64, f64)> {
        sql::one(
            self.pool(),
            "select count(*), coalesce(sum(min(char_count / 4.0, ?)), 0.0) from dataset_examples where dataset_id = ?",
            (sequence_len as f64, dataset_id),
        )
        .await
    }

    /// The chat examples of an SFT dataset, in order (a preference dataset's rows are
    /// not chat examples: `dataset_lines`).
    pub async fn dataset_examples(&self, dataset_id: i64) -> Result<Vec<StoredExample>> {
        let kind: Option<String> = sql::value(
            self.pool(),
            "select kind from datasets where id = ?",
            (dataset_id,),
        )
        .await?;
        if let Some(k) = kind.filter(|k| k != "sft") {
            return Err(StorageError::Invalid {
                what: format!("dataset {dataset_id}"),
                message: format!("it holds {k} preference rows, not chat examples"),
            });
        }
        #[derive(sqlx::FromRow)]
        struct Row {
            position: i64,
            messages: String,
            char_count: i64,
            token_count: Option<i64>,
            source_conversation_id: Option<i64>,
        }
        let rows: Vec<Row> = sql::all(
            self.pool(),
            "select position, messages, char_count, token_count, source_conversation_id
             from dataset_examples where dataset_id = ? order by position",
            (dataset_id,),
        )
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredExample {
                    position: r.position,
                    example: serde_json::from_str(&r.messages)?,
                    char_count: r.char_count,
                    token_count: r.token_count,
                    source_conversation_id: r.source_conversation_id,
                })
            })
            .collect()
    }

    /// Every row of a dataset as stored (one JSON object each), in order: what a
    /// preference dataset holds, and what an export writes.
    pub async fn dataset_lines(&self, dataset_id: i64) -> Result<Vec<String>> {
        sql::column(
            self.pool(),
            "select messages from dataset_examples where dataset_id = ? order by position",
            (dataset_id,),
        )
        .await
    }

    /// A dataset as the JSONL file its export writes: the stored lines, each ending with
    /// `\n` (a chat dataset's are its OpenAI chat JSONL).
    pub async fn dataset_jsonl(&self, dataset_id: i64) -> Result<String> {
        Ok(self
            .dataset_lines(dataset_id)
            .await?
            .iter()
            .map(|l| format!("{l}\n"))
            .collect())
    }

    /// The conversations a dataset's rows came from (a report card leaves them out of
    /// its rated replies).
    pub async fn dataset_conversations(&self, dataset_id: i64) -> Result<Vec<i64>> {
        sql::column(
            self.pool(),
            "select distinct source_conversation_id from dataset_examples
             where dataset_id = ? and source_conversation_id is not null",
            (dataset_id,),
        )
        .await
    }

    /// A dataset version by id.
    pub async fn dataset_by_id(&self, id: i64) -> Result<Dataset> {
        self.row_by_id("datasets", COLUMNS, id, "dataset ").await
    }

    /// Delete one version (or all versions when `version` is None). Refused while a
    /// training job references it. Returns the number of versions deleted.
    pub async fn delete_dataset(&self, name: &str, version: Option<i64>) -> Result<u64> {
        let result = sql::execute(
            self.pool(),
            "delete from datasets where name = ?1 and (?2 is null or version = ?2)",
            (name, version),
        )
        .await
        .map_err(|e| match &e {
            // A job's reference to the dataset, or to its examples through the cascade
            // (SQLite reports a failure inside a cascade as a trigger's, code 1811).
            StorageError::Sqlx(sqlx::Error::Database(db))
                if db.is_foreign_key_violation()
                    || db.message().contains("FOREIGN KEY constraint failed") =>
            {
                StorageError::Invalid {
                    what: format!("deletion of dataset {name:?}"),
                    message: "a training job uses it; delete the job first".into(),
                }
            }
            _ => e,
        })?;
        Ok(result
            .found(|| match version {
                Some(v) => format!("version {v} of dataset {name:?}"),
                None => format!("dataset {name:?}"),
            })?
            .rows_affected())
    }
}

/// Dataset names: 1-100 characters of letters, digits, `-`, `_`, `.` (they appear in file
/// names and URLs).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=100).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid {
            what: format!("dataset name {name:?}"),
            message: "use 1-100 letters, digits, '-', '_' or '.', not starting with '.'".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatMessage, Role};
    use sqlx::SqlitePool;

    fn examples(n: usize) -> Vec<ChatExample> {
        (0..n)
            .map(|i| ChatExample {
                messages: vec![
                    ChatMessage::new(Role::User, format!("question {i}")),
                    ChatMessage::new(Role::Assistant, format!("answer {i}")),
                ],
            })
            .collect()
    }

    fn new<'a>(name: &'a str, hash: &'a str, ex: &'a [ChatExample]) -> NewDataset<'a> {
        NewDataset {
            assistant_id: None,
            name,
            format: "openai",
            source: "test.jsonl",
            content_hash: hash,
            examples: ex,
            ..Default::default()
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_new_dataset_is_version_one_and_its_examples_come_back_in_order(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let ex = examples(3);
        let created = db.insert_dataset(&new("faq", "h1", &ex)).await.unwrap();
        let DatasetInsert::Created(d) = created else {
            panic!("not created")
        };
        assert_eq!((d.name.as_str(), d.version, d.example_count), ("faq", 1, 3));
        let stored = db.dataset_examples(d.id).await.unwrap();
        let back: Vec<_> = stored.iter().map(|s| s.example.clone()).collect();
        assert_eq!(back, ex);
        assert_eq!(stored[1].char_count, "question 1answer 1".len() as i64);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_same_content_under_the_same_name_is_not_stored_twice(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let ex = examples(2);
        db.insert_dataset(&new("faq", "h1", &ex)).await.unwrap();
        let again = db.insert_dataset(&new("faq", "h1", &ex)).await.unwrap();
        assert!(matches!(again, DatasetInsert::Unchanged(ref d) if d.version == 1));
        let changed = db
            .insert_dataset(&new("faq", "h2", &examples(3)))
            .await
            .unwrap();
        assert!(matches!(changed, DatasetInsert::Created(ref d) if d.version == 2));
        // Another name with the same content is its own dataset.
        let other = db.insert_dataset(&new("faq2", "h1", &ex)).await.unwrap();
        assert!(matches!(other, DatasetInsert::Created(ref d) if d.version == 1));
        assert_eq!(db.list_datasets().await.unwrap().len(), 3);
        assert_eq!(db.dataset("faq", None).await.unwrap().version, 2);
        assert_eq!(db.dataset("faq", Some(1)).await.unwrap().content_hash, "h1");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn stored_datasets_and_examples_cannot_be_modified(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let d = db
            .insert_dataset(&new("faq", "h1", &examples(1)))
            .await
            .unwrap();
        let err = sql::execute(
            db.pool(),
            "update datasets set name = 'x' where id = ?",
            (d.dataset().id,),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("datasets are immutable"), "{err}");
        let err = sql::execute(db.pool(), "update dataset_examples set messages = '{}'", ())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("immutable"), "{err}");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_failure_halfway_through_an_insert_leaves_the_database_unchanged(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        db.insert_dataset(&new("faq", "h1", &examples(2)))
            .await
            .unwrap();
        // Make the 4th example row fail, after the dataset row and three examples went in.
        sql::execute(
            db.pool(),
            "create trigger fail_fourth before insert on dataset_examples when new.position = 3
             begin select raise(abort, 'disk on fire'); end",
            (),
        )
        .await
        .unwrap();
        let err = db
            .insert_dataset(&new("faq", "h2", &examples(5)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let all = db.list_datasets().await.unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        let (rows,): (i64,) = sql::one(db.pool(), "select count(*) from dataset_examples", ())
            .await
            .unwrap();
        assert_eq!(rows, 2);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn deleting_a_dataset_removes_its_examples(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let d = db
            .insert_dataset(&new("faq", "h1", &examples(2)))
            .await
            .unwrap();
        let missing = db.delete_dataset("faq", Some(5)).await.unwrap_err();
        assert_eq!(
            missing.to_string(),
            "version 5 of dataset \"faq\" not found"
        );
        assert_eq!(db.delete_dataset("faq", None).await.unwrap(), 1);
        assert!(
            db.dataset_examples(d.dataset().id)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            db.delete_dataset("faq", None).await,
            Err(StorageError::NotFound { .. })
        ));
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn bad_names_and_empty_datasets_are_refused(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        for bad in ["", "a b", "../x", ".hidden", &"x".repeat(101)] {
            assert!(
                db.insert_dataset(&new(bad, "h", &examples(1)))
                    .await
                    .is_err(),
                "{bad:?}"
            );
        }
        assert!(db.insert_dataset(&new("ok", "h", &[])).await.is_err());
    }
}
