//! The bot's state, and where a message or a command came from.

use crate::queue::{UpdateHandler, UpdateQueue};
use crate::rate_limit::RateLimiter;
use loraloop_core::Services;
use loraloop_core::storage::PendingUpdate;
use serenity::all::{GuildId, Http, Message, UserId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// The reactions a reply gets and a user rates with.
pub(super) const THUMBS_UP: &str = "👍";
pub(super) const THUMBS_DOWN: &str = "👎";

/// Where a message or a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Dm,
    /// A server channel that is not one of the bot's threads.
    Channel {
        guild: GuildId,
    },
    /// A thread the bot started: its parent channel's chat row and Discord id.
    Thread {
        guild: GuildId,
        chat: i64,
        parent: u64,
    },
}

pub struct DiscordBot {
    pub(super) core: Services,
    /// The bot's user, fetched before the gateway starts.
    pub(super) me: UserId,
    /// serenity's client, set once it is built (before the gateway starts and any event).
    pub(super) http: OnceLock<Arc<Http>>,
    /// The stored messages, by conversation target (a DM channel, a thread, or for a
    /// mention that starts a thread the message id, which becomes the thread's id): a
    /// conversation's messages run in order, different ones in parallel.
    pub(super) queue: Arc<UpdateQueue<u64>>,
    /// The bot's threads: thread id -> (parent chat row, parent channel id).
    pub(super) threads: Mutex<HashMap<u64, (i64, u64)>>,
    pub(super) rate: RateLimiter,
    /// Rung when a message is stored (and on READY): the dispatcher looks for pending ones.
    pub(super) wake: tokio::sync::Notify,
    /// When each channel last got a refusal.
    pub(super) refused: Mutex<HashMap<u64, Instant>>,
}

impl UpdateHandler for DiscordBot {
    async fn handle(&self, update: &PendingUpdate) -> anyhow::Result<()> {
        let m: Message = serde_json::from_str(&update.payload)
            .map_err(|e| anyhow::anyhow!("unreadable message: {e}"))?;
        self.on_message(m).await
    }
}
