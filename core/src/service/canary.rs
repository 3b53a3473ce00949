//! Running canaries to their end: count the ratings of both sides, and promote the
//! candidate or roll it back when the evidence says so (`canary::decide`). Called on a
//! timer by `serve`; an operator can also stop a canary.

use crate::canary::{self, CanaryConfig, Decision, Ratings};
use crate::error::{Result, ServiceError};
use crate::service::adapters::AdapterService;
use crate::storage::{Canary, Db};
use serde::Serialize;
use std::sync::Arc;

pub struct CanaryService {
    pub(super) db: Db,
    pub(super) adapters: Arc<AdapterService>,
    pub(super) config: CanaryConfig,
}

/// A canary with its ratings so far and where the decision stands.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryStatus {
    pub canary: Canary,
    pub candidate: Ratings,
    pub current: Ratings,
    /// For a running canary: what the next look decides; for an ended one, nothing.
    pub decision: Option<Decision>,
}

impl CanaryService {
    pub fn config(&self) -> &CanaryConfig {
        &self.config
    }

    /// The ratings of both sides of a canary since it started.
    pub async fn status(&self, c: Canary) -> Result<CanaryStatus> {
        let candidate = self
            .db
            .routed_ratings(c.assistant_id, Some(c.adapter_id), &c.started_at)
            .await?;
        let current = self
            .db
            .routed_ratings(c.assistant_id, c.baseline_adapter_id, &c.started_at)
            .await?;
        let decision = c
            .ended_at
            .is_none()
            .then(|| canary::decide(candidate, current, &self.config));
        Ok(CanaryStatus {
            canary: c,
            candidate,
            current,
            decision,
        })
    }

    /// The assistant's running canary's status, if one runs.
    pub async fn running(&self, assistant_id: i64) -> Result<Option<CanaryStatus>> {
        match self.db.running_canary(assistant_id).await? {
            Some(c) => Ok(Some(self.status(c).await?)),
            None => Ok(None),
        }
    }

    /// Look at every assistant's running canary and end those whose ratings decide.
    /// Returns the canaries that ended and how.
    pub async fn tick(&self) -> Result<Vec<(Canary, Decision)>> {
        let mut ended = Vec::new();
        for a in self.db.list_assistants().await? {
            if let Some(status) = self.running(a.id).await?
                && let Some(e) = self.decide(status).await?
            {
                ended.push(e);
            }
        }
        Ok(ended)
    }

    async fn decide(&self, status: CanaryStatus) -> Result<Option<(Canary, Decision)>> {
        let c = status.canary;
        let (outcome, reason) = match &status.decision {
            Some(Decision::Promote { reason }) => ("promoted", reason),
            Some(Decision::RollBack { reason }) => ("rolled_back", reason),
            _ => return Ok(None),
        };
        // Only one process ends it; the others see it ended and do nothing.
        if !self.db.end_canary(c.id, outcome, reason).await? {
            return Ok(None);
        }
        if outcome == "promoted" {
            self.adapters
                .promote(c.assistant_id, c.adapter_id, "canary")
                .await?;
        }
        Ok(status.decision.map(|d| (c, d)))
    }

    /// An operator ends the running canary: the candidate is rolled back (conversations
    /// pinned to it move on at their next turn). Returns it as ended.
    pub async fn stop(&self, assistant_id: i64, by: &str) -> Result<Canary> {
        let c = self
            .db
            .running_canary(assistant_id)
            .await?
            .ok_or_else(|| ServiceError::Conflict("no canary is running".into()))?;
        self.db
            .end_canary(c.id, "rolled_back", &format!("stopped by {by}"))
            .await?;
        Ok(self.db.canary(c.id).await?)
    }
}
