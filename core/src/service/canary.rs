//! Running canaries to their end: count the ratings of both sides, and promote the
//! candidate or roll it back when the evidence says so (`canary::decide`). Called on a
//! timer by `serve`; an operator can also stop a canary.

use crate::canary::{self, CanaryConfig, Decision, Ratings};
use crate::error::{Result, ServiceError};
use crate::service::adapters::AdapterService;
use crate::storage::{Assistant, Canary, Db};
use serde::Serialize;
use std::sync::Arc;

pub struct CanaryService {
    pub(super) db: Db,
    pub(super) adapters: Arc<AdapterService>,
    pub(super) assistant: Assistant,
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

    /// The running canary's status, if one runs.
    pub async fn running(&self) -> Result<Option<CanaryStatus>> {
        match self.db.running_canary(self.assistant.id).await? {
            Some(c) => Ok(Some(self.status(c).await?)),
            None => Ok(None),
        }
    }

    /// Look at the running canary and end it when its ratings decide. Returns the canary
    /// that ended and how, if one did.
    pub async fn tick(&self) -> Result<Option<(Canary, Decision)>> {
        let Some(status) = self.running().await? else {
            return Ok(None);
        };
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
            self.adapters.promote(c.adapter_id, "canary").await?;
        }
        Ok(status.decision.map(|d| (c, d)))
    }

    /// An operator ends the running canary: the candidate is rolled back (conversations
    /// pinned to it move on at their next turn). Returns it as ended.
    pub async fn stop(&self, by: &str) -> Result<Canary> {
        let c = self
            .db
            .running_canary(self.assistant.id)
            .await?
            .ok_or_else(|| ServiceError::Conflict("no canary is running".into()))?;
        self.db
            .end_canary(c.id, "rolled_back", &format!("stopped by {by}"))
            .await?;
        Ok(self.db.canary(c.id).await?)
    }
}
