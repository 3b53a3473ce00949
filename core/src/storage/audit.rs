//! The audit log: one row per operator or user action that changes what users see or
//! what is kept about them.

use super::{Db, Result, sql};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub details: Option<String>,
}

impl Db {
    /// Record an action. A failure to record is returned: callers log it, the action
    /// itself stands.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        details: Option<&str>,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "insert into audit_log (actor, action, target, details) values (?, ?, ?, ?)",
            (actor, action, target, details),
        )
        .await?;
        Ok(())
    }

    /// Entries newest first, `limit` of them, older than entry `before` when given.
    pub async fn audit_entries(&self, before: Option<i64>, limit: i64) -> Result<Vec<AuditEntry>> {
        sql::all(
            self.pool(),
            "select id, at, actor, action, target, details from audit_log
             where id < ? order by id desc limit ?",
            (before.unwrap_or(i64::MAX), limit),
        )
        .await
    }
}
