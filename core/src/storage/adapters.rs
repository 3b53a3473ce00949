//! Assistants and adapters: which base model each assistant runs and which LoRA adapter is
//! active, with the activation history a rollback walks back.

use super::{Db, Result, StorageError};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Assistant {
    pub id: i64,
    pub name: String,
    pub base_model: String,
    pub system_prompt: String,
    pub generation: String,
    pub active_adapter_id: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Adapter {
    pub id: i64,
    pub name: String,
    pub path: String,
    pub base_model: String,
    pub base_model_hash: String,
    pub tokenizer_hash: String,
    pub chat_template_hash: String,
    pub method: String,
    pub rank: Option<i64>,
    pub alpha: Option<f64>,
    pub target_modules: String,
    pub metrics: String,
    pub job_id: Option<i64>,
    pub created_at: String,
    /// The report card as JSON (None: uploaded, or made before cards existed).
    pub report_card: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewAdapter<'a> {
    pub name: &'a str,
    pub path: &'a str,
    pub base_model: &'a str,
    pub base_model_hash: &'a str,
    pub tokenizer_hash: &'a str,
    pub chat_template_hash: &'a str,
    pub rank: Option<i64>,
    pub alpha: Option<f64>,
    pub target_modules: &'a [String],
    pub metrics: &'a serde_json::Value,
    pub job_id: Option<i64>,
}

const ASSISTANT_COLUMNS: &str =
    "id, name, base_model, system_prompt, generation, active_adapter_id";
const ADAPTER_COLUMNS: &str = "id, name, path, base_model, base_model_hash, tokenizer_hash, chat_template_hash, method, rank, alpha, target_modules, metrics, job_id, created_at, report_card";

impl Db {
    /// The assistant with this name, created with these settings if it does not exist.
    pub async fn ensure_assistant(
        &self,
        name: &str,
        base_model: &str,
        system_prompt: &str,
    ) -> Result<Assistant> {
        sqlx::query("insert into assistants (name, base_model, system_prompt) values (?, ?, ?) on conflict (name) do nothing")
            .bind(name)
            .bind(base_model)
            .bind(system_prompt)
            .execute(self.pool())
            .await?;
        self.assistant(name).await
    }

    pub async fn assistant(&self, name: &str) -> Result<Assistant> {
        let found: Option<Assistant> = sqlx::query_as(&format!(
            "select {ASSISTANT_COLUMNS} from assistants where name = ?"
        ))
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        found.ok_or_else(|| StorageError::NotFound {
            what: format!("assistant {name:?}"),
        })
    }

    pub async fn insert_adapter(&self, a: &NewAdapter<'_>) -> Result<Adapter> {
        Ok(sqlx::query_as(&format!(
            "insert into adapters (name, path, base_model, base_model_hash, tokenizer_hash, chat_template_hash,
                                   rank, alpha, target_modules, metrics, job_id)
             values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) returning {ADAPTER_COLUMNS}"
        ))
        .bind(a.name)
        .bind(a.path)
        .bind(a.base_model)
        .bind(a.base_model_hash)
        .bind(a.tokenizer_hash)
        .bind(a.chat_template_hash)
        .bind(a.rank)
        .bind(a.alpha)
        .bind(serde_json::to_string(a.target_modules)?)
        .bind(a.metrics.to_string())
        .bind(a.job_id)
        .fetch_one(self.pool())
        .await?)
    }

    pub async fn adapter(&self, id: i64) -> Result<Adapter> {
        let found: Option<Adapter> = sqlx::query_as(&format!(
            "select {ADAPTER_COLUMNS} from adapters where id = ?"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        found.ok_or_else(|| StorageError::NotFound {
            what: format!("adapter {id}"),
        })
    }

    /// Store an adapter's report card (JSON).
    pub async fn set_report_card(&self, id: i64, card: &serde_json::Value) -> Result<()> {
        let updated = sqlx::query("update adapters set report_card = ? where id = ?")
            .bind(card.to_string())
            .bind(id)
            .execute(self.pool())
            .await?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::NotFound {
                what: format!("adapter {id}"),
            });
        }
        Ok(())
    }

    pub async fn list_adapters(&self) -> Result<Vec<Adapter>> {
        Ok(sqlx::query_as(&format!(
            "select {ADAPTER_COLUMNS} from adapters order by id"
        ))
        .fetch_all(self.pool())
        .await?)
    }

    /// Make `adapter_id` (or the base model, for None) the assistant's active adapter and
    /// record the activation.
    pub async fn activate_adapter(
        &self,
        assistant_id: i64,
        adapter_id: Option<i64>,
        by: &str,
    ) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query(
            "update assistants set active_adapter_id = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
        )
        .bind(adapter_id)
        .bind(assistant_id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StorageError::NotFound {
                what: format!("assistant {assistant_id}"),
            });
        }
        sqlx::query("insert into adapter_activations (assistant_id, adapter_id, activated_by) values (?, ?, ?)")
            .bind(assistant_id)
            .bind(adapter_id)
            .bind(by)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Roll back to the adapter that was active before the current activation. Returns the
    /// adapter now active (None: the base model).
    pub async fn rollback_adapter(&self, assistant_id: i64, by: &str) -> Result<Option<i64>> {
        let history = self.recent_activations(assistant_id, 2).await?;
        let previous = history.get(1).copied().flatten();
        self.activate_adapter(assistant_id, previous, by).await?;
        Ok(previous)
    }

    /// The adapters of the assistant's last `n` activations, newest first (None: the
    /// base model was activated).
    pub async fn recent_activations(&self, assistant_id: i64, n: i64) -> Result<Vec<Option<i64>>> {
        let rows: Vec<(Option<i64>,)> = sqlx::query_as(
            "select adapter_id from adapter_activations where assistant_id = ? order by id desc limit ?",
        )
        .bind(assistant_id)
        .bind(n)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(a,)| a).collect())
    }

    /// The trained-token count recorded in an adapter's metrics, when it has one.
    pub async fn adapter_trained_tokens(&self, id: i64) -> Result<Option<i64>> {
        let row: Option<(Option<i64>,)> = sqlx::query_as(
            "select cast(json_extract(metrics, '$.trained_tokens') as integer) from adapters where id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.and_then(|(t,)| t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    fn adapter<'a>(
        name: &'a str,
        modules: &'a [String],
        metrics: &'a serde_json::Value,
    ) -> NewAdapter<'a> {
        NewAdapter {
            name,
            path: "adapters/x",
            base_model: "SmolLM2",
            base_model_hash: "b",
            tokenizer_hash: "t",
            chat_template_hash: "c",
            rank: Some(16),
            alpha: Some(32.0),
            target_modules: modules,
            metrics,
            job_id: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn activation_and_rollback_walk_the_history(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let asst = db.ensure_assistant("a", "m", "s").await.unwrap();
        assert_eq!(db.ensure_assistant("a", "other", "x").await.unwrap(), asst);
        let modules = vec!["q_proj".to_string()];
        let metrics = serde_json::json!({"eval_loss": 1.5});
        let one = db
            .insert_adapter(&adapter("one", &modules, &metrics))
            .await
            .unwrap();
        let two = db
            .insert_adapter(&adapter("two", &modules, &metrics))
            .await
            .unwrap();
        assert_eq!(one.target_modules, r#"["q_proj"]"#);
        db.activate_adapter(asst.id, Some(one.id), "operator")
            .await
            .unwrap();
        db.activate_adapter(asst.id, Some(two.id), "operator")
            .await
            .unwrap();
        assert_eq!(
            db.assistant("a").await.unwrap().active_adapter_id,
            Some(two.id)
        );
        assert_eq!(
            db.rollback_adapter(asst.id, "operator").await.unwrap(),
            Some(one.id)
        );
        assert_eq!(
            db.assistant("a").await.unwrap().active_adapter_id,
            Some(one.id)
        );
        assert!(
            db.insert_adapter(&adapter("one", &modules, &metrics))
                .await
                .is_err(),
            "names are unique"
        );
        assert_eq!(db.list_adapters().await.unwrap().len(), 2);
    }
}
