//! Adapters: the stored LoRA adapters, which one each assistant has active, and the
//! activation history a rollback walks back.

use super::sql::Found;
use super::{Db, Result, sql};
use serde::Serialize;

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
    /// When an operator or a canary last rolled it back (None: never, or activated since).
    pub rolled_back_at: Option<String>,
    /// The assistant it was trained for (None: uploaded without one; any assistant may use it).
    pub assistant_id: Option<i64>,
    /// When a user whose data it was trained on asked to be forgotten (retrain or retire it).
    pub forgotten_data_at: Option<String>,
}

/// One step back in the activation history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackStep {
    /// The activation row undone.
    pub undo: i64,
    /// The adapter it activated and the one active before it (None: the base model).
    pub from: Option<i64>,
    pub to: Option<i64>,
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
    pub assistant_id: Option<i64>,
}

const ADAPTER_COLUMNS: &str = "id, name, path, base_model, base_model_hash, tokenizer_hash, chat_template_hash, method, rank, alpha, target_modules, metrics, job_id, created_at, report_card, rolled_back_at, assistant_id, forgotten_data_at";

impl Db {
    pub async fn insert_adapter(&self, a: &NewAdapter<'_>) -> Result<Adapter> {
        sql::one(
            self.pool(),
            &format!(
                "insert into adapters (name, path, base_model, base_model_hash, tokenizer_hash, chat_template_hash,
                                       rank, alpha, target_modules, metrics, job_id, assistant_id, forgotten_data_at)
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                         -- trained while a user's data was taken out of its dataset
                         (select p.purged_at from dataset_purges p join training_jobs j on j.dataset_id = p.dataset_id
                          where j.id = ?11))
                 returning {ADAPTER_COLUMNS}"
            ),
            (
                a.name,
                a.path,
                a.base_model,
                a.base_model_hash,
                a.tokenizer_hash,
                a.chat_template_hash,
                a.rank,
                a.alpha,
                serde_json::to_string(a.target_modules)?,
                a.metrics.to_string(),
                a.job_id,
                a.assistant_id,
            ),
        )
        .await
    }

    pub async fn adapter(&self, id: i64) -> Result<Adapter> {
        self.row_by_id("adapters", ADAPTER_COLUMNS, id, "adapter ")
            .await
    }

    /// Store an adapter's report card (JSON).
    pub async fn set_report_card(&self, id: i64, card: &serde_json::Value) -> Result<()> {
        let updated = sql::execute(
            self.pool(),
            "update adapters set report_card = ? where id = ?",
            (card.to_string(), id),
        )
        .await?;
        updated.found(|| format!("adapter {id}"))?;
        Ok(())
    }

    /// The adapter a training job registered, if it did.
    pub async fn adapter_of_job(&self, job_id: i64) -> Result<Option<Adapter>> {
        sql::optional(
            self.pool(),
            &format!("select {ADAPTER_COLUMNS} from adapters where job_id = ? order by id limit 1"),
            (job_id,),
        )
        .await
    }

    /// The adapter named `name` (names are unique), if there is one.
    pub async fn adapter_named(&self, name: &str) -> Result<Option<Adapter>> {
        sql::optional(
            self.pool(),
            &format!("select {ADAPTER_COLUMNS} from adapters where name = ?"),
            (name,),
        )
        .await
    }

    /// Whether an adapter or an assistant has the name `name` (the OpenAI endpoint's
    /// `model` names both).
    pub async fn model_name_in_use(&self, name: &str) -> Result<bool> {
        let (used,): (bool,) = sql::one(
            self.pool(),
            "select exists (select 1 from adapters where name = ?1) \
                 or exists (select 1 from assistants where name = ?1)",
            (name,),
        )
        .await?;
        Ok(used)
    }

    pub async fn list_adapters(&self) -> Result<Vec<Adapter>> {
        sql::all(
            self.pool(),
            &format!("select {ADAPTER_COLUMNS} from adapters order by id"),
            (),
        )
        .await
    }

    /// The adapters an assistant may use: its own and those tied to no assistant.
    pub async fn assistant_adapters(&self, assistant_id: i64) -> Result<Vec<Adapter>> {
        sql::all(
            self.pool(),
            &format!(
                "select {ADAPTER_COLUMNS} from adapters where assistant_id = ? or assistant_id is null order by id"
            ),
            (assistant_id,),
        )
        .await
    }

    /// Make `adapter_id` (or the base model, for None) the assistant's active adapter and
    /// record the activation, in its history and the audit log. Activating what is
    /// already active records nothing: a second entry in the history would make the next
    /// rollback undo it and change nothing.
    pub async fn activate_adapter(
        &self,
        assistant_id: i64,
        adapter_id: Option<i64>,
        by: &str,
    ) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let active: Option<Option<i64>> = sql::value(
            &mut *tx,
            "select active_adapter_id from assistants where id = ?",
            (assistant_id,),
        )
        .await?;
        if active.found(|| format!("assistant {assistant_id}"))? == adapter_id {
            return Ok(());
        }
        sql::execute(
            &mut *tx,
            "update assistants set active_adapter_id = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
            (adapter_id, assistant_id),
        )
        .await?;
        sql::execute(
            &mut *tx,
            "insert into adapter_activations (assistant_id, adapter_id, activated_by) values (?, ?, ?)",
            (assistant_id, adapter_id, by),
        )
        .await?;
        sql::execute(
            &mut *tx,
            "update adapters set rolled_back_at = null where id = ?",
            (adapter_id,),
        )
        .await?;
        audit_swap(&mut tx, by, "activate adapter", assistant_id, adapter_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// What a rollback would undo, walking the activation history back: activations
    /// stack up and each rollback takes the newest one off, so rolling back twice goes two
    /// steps back. None when no activation is left to undo.
    pub async fn rollback_step(&self, assistant_id: i64) -> Result<Option<RollbackStep>> {
        let rows: Vec<(i64, Option<i64>, Option<i64>)> = sql::all(
            self.pool(),
            "select id, adapter_id, rollback_of from adapter_activations where assistant_id = ? order by id",
            (assistant_id,),
        )
        .await?;
        let mut stack: Vec<(i64, Option<i64>)> = Vec::new();
        for (id, adapter, undoes) in rows {
            match undoes {
                Some(undone) => {
                    if stack.last().is_some_and(|(top, _)| *top == undone) {
                        stack.pop();
                    }
                }
                None => stack.push((id, adapter)),
            }
        }
        let Some(&(undo, from)) = stack.last() else {
            return Ok(None);
        };
        // Below the first activation the assistant ran the base model.
        let to = stack.len().checked_sub(2).and_then(|i| stack[i].1);
        Ok(Some(RollbackStep { undo, from, to }))
    }

    /// Apply a rollback step: `step.to` becomes active, the history records which
    /// activation was undone, and the adapter rolled back from is marked (conversations
    /// pinned to it move on at their next turn).
    pub async fn record_rollback(
        &self,
        assistant_id: i64,
        step: &RollbackStep,
        by: &str,
    ) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sql::execute(
            &mut *tx,
            "update assistants set active_adapter_id = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
            (step.to, assistant_id),
        )
        .await?;
        sql::execute(
            &mut *tx,
            "insert into adapter_activations (assistant_id, adapter_id, activated_by, rollback_of) values (?, ?, ?, ?)",
            (assistant_id, step.to, by, step.undo),
        )
        .await?;
        if step.from != step.to {
            sql::execute(
                &mut *tx,
                "update adapters set rolled_back_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
                (step.from,),
            )
            .await?;
        }
        audit_swap(&mut tx, by, "roll back adapter", assistant_id, step.to).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The trained-token count recorded in an adapter's metrics, when it has one.
    pub async fn adapter_trained_tokens(&self, id: i64) -> Result<Option<i64>> {
        let row: Option<(Option<i64>,)> = sql::optional(
            self.pool(),
            "select cast(json_extract(metrics, '$.trained_tokens') as integer) from adapters where id = ?",
            (id,),
        )
        .await?;
        Ok(row.and_then(|(t,)| t))
    }
}

/// The audit entry of an activation or a rollback, in its transaction: a swap that
/// happened is never missing from the log (the gate's included).
async fn audit_swap(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    by: &str,
    action: &str,
    assistant_id: i64,
    adapter_id: Option<i64>,
) -> Result<()> {
    let name: Option<String> = match adapter_id {
        Some(id) => sql::value(&mut **tx, "select name from adapters where id = ?", (id,)).await?,
        None => None,
    };
    let target = format!(
        "assistant {assistant_id}: {}",
        name.as_deref().unwrap_or("the base model")
    );
    sql::execute(
        &mut **tx,
        "insert into audit_log (actor, action, target) values (?, ?, ?)",
        (by, action, target),
    )
    .await?;
    Ok(())
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
            assistant_id: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn an_adapter_is_found_by_its_exact_name(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let modules = vec!["q_proj".to_string()];
        let metrics = serde_json::json!({});
        let one = db
            .insert_adapter(&adapter("one", &modules, &metrics))
            .await
            .unwrap();
        db.insert_adapter(&adapter("two", &modules, &metrics))
            .await
            .unwrap();
        assert_eq!(db.adapter_named("one").await.unwrap(), Some(one));
        // Names compare as the OpenAI endpoint's `model` does: exactly.
        assert_eq!(db.adapter_named("One").await.unwrap(), None);
        assert_eq!(db.adapter_named("one ").await.unwrap(), None);
        assert_eq!(db.adapter_named("three").await.unwrap(), None);
        // A name is in use as an adapter's or an assistant's, compared exactly.
        db.ensure_assistant("helper", "m", "s").await.unwrap();
        for (name, used) in [
            ("one", true),
            ("helper", true),
            ("One", false),
            ("three", false),
        ] {
            assert_eq!(db.model_name_in_use(name).await.unwrap(), used, "{name}");
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
        // A repeated activation (a second click, the gate after an operator) is no step.
        db.activate_adapter(asst.id, Some(two.id), "gate")
            .await
            .unwrap();
        assert_eq!(
            db.assistant("a").await.unwrap().active_adapter_id,
            Some(two.id)
        );
        // Each activation is in the audit log (newest first), the repeated one not.
        let audit: Vec<(String, String, Option<String>)> = db
            .audit_entries(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.actor, e.action, e.target))
            .collect();
        let entry = |action: &str, target: &str| {
            (
                "operator".to_string(),
                action.to_string(),
                Some(target.to_string()),
            )
        };
        let a = asst.id;
        assert_eq!(
            audit,
            [
                entry("activate adapter", &format!("assistant {a}: two")),
                entry("activate adapter", &format!("assistant {a}: one")),
            ]
        );
        // Each rollback goes one step further back: two, then one, then the base model.
        let back = |db: Db| async move {
            let step = db.rollback_step(asst.id).await.unwrap()?;
            db.record_rollback(asst.id, &step, "operator")
                .await
                .unwrap();
            Some((
                step.from,
                db.assistant("a").await.unwrap().active_adapter_id,
            ))
        };
        assert_eq!(back(db.clone()).await, Some((Some(two.id), Some(one.id))));
        assert!(db.adapter(two.id).await.unwrap().rolled_back_at.is_some());
        assert_eq!(back(db.clone()).await, Some((Some(one.id), None)));
        assert_eq!(back(db.clone()).await, None, "nothing left to undo");
        let newest = db.audit_entries(None, 1).await.unwrap().remove(0);
        assert_eq!(newest.action, "roll back adapter");
        assert_eq!(
            newest.target,
            Some(format!("assistant {a}: the base model"))
        );
        // Activating again clears the mark and starts a new step.
        db.activate_adapter(asst.id, Some(two.id), "operator")
            .await
            .unwrap();
        assert!(db.adapter(two.id).await.unwrap().rolled_back_at.is_none());
        assert_eq!(back(db.clone()).await, Some((Some(two.id), None)));
        assert!(
            db.insert_adapter(&adapter("one", &modules, &metrics))
                .await
                .is_err(),
            "names are unique"
        );
        assert_eq!(db.list_adapters().await.unwrap().len(), 2);
    }
}
