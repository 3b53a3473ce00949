//! Uploaded files (OpenAI's `/v1/files`): the bytes as uploaded, until deleted.

use super::sql::Found;
use super::{Db, Result, sql};
use serde::Serialize;

/// A file's metadata (the bytes are read apart: [`Db::file_content`]).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct StoredFile {
    pub id: i64,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub filename: &'a str,
    pub purpose: &'a str,
    pub content: &'a [u8],
}

const FILE_COLUMNS: &str = "id, filename, purpose, bytes, created_at";

impl Db {
    pub async fn insert_file(&self, f: &NewFile<'_>) -> Result<StoredFile> {
        sql::one(
            self.pool(),
            &format!(
                "insert into files (filename, purpose, bytes, content) values (?, ?, ?, ?)
                 returning {FILE_COLUMNS}"
            ),
            (f.filename, f.purpose, f.content.len() as i64, f.content),
        )
        .await
    }

    pub async fn file(&self, id: i64) -> Result<StoredFile> {
        self.row_by_id("files", FILE_COLUMNS, id, "file file-")
            .await
    }

    pub async fn file_content(&self, id: i64) -> Result<Vec<u8>> {
        let found: Option<(Vec<u8>,)> =
            sql::optional(self.pool(), "select content from files where id = ?", (id,)).await?;
        found.map(|r| r.0).found(|| format!("file file-{id}"))
    }

    /// Files of `purpose` (all when None), `limit` of them after the file `after` in the
    /// order asked (newest first unless `ascending`).
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<i64>,
        limit: i64,
        ascending: bool,
    ) -> Result<Vec<StoredFile>> {
        let (cmp, order, start) = if ascending {
            (">", "asc", i64::MIN)
        } else {
            ("<", "desc", i64::MAX)
        };
        sql::all(
            self.pool(),
            &format!(
                "select {FILE_COLUMNS} from files where (?1 is null or purpose = ?1) and id {cmp} ?2
                 order by id {order} limit ?3"
            ),
            (purpose, after.unwrap_or(start), limit),
        )
        .await
    }

    /// False when there was no such file. Jobs keep their datasets; their file link clears.
    pub async fn delete_file(&self, id: i64) -> Result<bool> {
        let done = sql::execute(self.pool(), "delete from files where id = ?", (id,)).await?;
        Ok(done.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NewFileJob;

    #[tokio::test]
    async fn a_deleted_files_id_is_never_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let new = NewFile {
            filename: "train.jsonl",
            purpose: "fine-tune",
            content: b"{}\n",
        };
        let first = db.insert_file(&new).await.unwrap();
        assert!(db.delete_file(first.id).await.unwrap());
        let second = db.insert_file(&new).await.unwrap();
        assert!(second.id > first.id, "{} after {}", second.id, first.id);
    }

    #[tokio::test]
    async fn a_file_round_trips_and_a_job_from_it_waits_for_validation() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let content = b"{\"messages\": []}\n".to_vec();
        let f = db
            .insert_file(&NewFile {
                filename: "train.jsonl",
                purpose: "fine-tune",
                content: &content,
            })
            .await
            .unwrap();
        assert_eq!(f.bytes, content.len() as i64);
        assert_eq!(db.file_content(f.id).await.unwrap(), content);
        let hp = serde_json::json!({});
        let job = db
            .create_file_job(&NewFileJob {
                base_model: "m",
                method: "lora",
                hyperparameters: &hp,
                assistant_id: None,
                training_file_id: f.id,
                validation_file_id: None,
                suffix: Some("mine"),
            })
            .await
            .unwrap();
        assert_eq!(job.state, "validating_files");
        assert_eq!(job.dataset_id, None);
        // A job with no dataset cannot be queued: the schema refuses it.
        let queued = sql::execute(
            db.pool(),
            "update training_jobs set state = 'queued' where id = ?",
            (job.id,),
        )
        .await;
        assert!(queued.is_err(), "{queued:?}");
        assert!(
            db.job_file_refused(job.id, "training_file", "bad line 1")
                .await
                .unwrap()
        );
        let failed = db.job(job.id).await.unwrap();
        assert_eq!(
            (failed.state.as_str(), failed.error_param.as_deref()),
            ("failed", Some("training_file"))
        );
        // Deleting the file keeps the job, without its link.
        assert!(db.delete_file(f.id).await.unwrap());
        assert!(!db.delete_file(f.id).await.unwrap());
        assert_eq!(db.job(job.id).await.unwrap().training_file_id, None);
    }
}
