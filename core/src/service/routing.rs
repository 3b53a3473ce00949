//! Which adapter answers a bot conversation's next turn. A conversation keeps the adapter
//! it was pinned to until it has been idle for `assistant.pin_idle_minutes` (or that
//! adapter was deleted or rolled back); then it is pinned again, to the running canary's
//! candidate when the canary draws it, else to the active adapter.

use crate::canary;
use crate::error::Result;
use crate::service::adapters::AdapterService;
use crate::storage::{Assistant, Db};
use loraloop_model::engine::AdapterChoice;
use std::sync::Arc;

pub struct Router {
    pub(super) db: Db,
    pub(super) adapters: Arc<AdapterService>,
    /// Seconds a pin outlives the conversation's last message (0: no pinning).
    pub(super) pin_idle_secs: f64,
}

impl Router {
    /// The adapter for `conversation_id`'s next turn with `assistant`, pinning the
    /// conversation to it.
    pub async fn route(
        &self,
        assistant: &Assistant,
        conversation_id: i64,
    ) -> Result<AdapterChoice> {
        if let Some(pin) = self.db.conversation_pin(conversation_id).await?
            && pin.valid
            && pin.idle_secs < self.pin_idle_secs
        {
            match self.adapters.choice_of(pin.adapter_id).await {
                Ok(choice) => return Ok(choice),
                Err(e) => tracing::warn!(
                    conversation_id,
                    "the pinned adapter cannot be served ({e}); pinning again"
                ),
            }
        }
        let canary = self.db.running_canary(assistant.id).await?;
        let target = match canary {
            Some(c) if canary::serves(conversation_id, c.id, c.share) => Some(c.adapter_id),
            _ => {
                self.db
                    .assistant_by_id(assistant.id)
                    .await?
                    .active_adapter_id
            }
        };
        let choice = self.adapters.choice_of(target).await?;
        self.db.pin_conversation(conversation_id, target).await?;
        Ok(choice)
    }
}
