//! The bot's state, and where a message or a command came from.

use super::unread::Unread;
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

/// How a message reached the bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    Gateway,
    /// Read from a channel's history, in order (see `catch_up`).
    History,
}

pub struct DiscordBot {
    pub(super) core: Services,
    /// The bot's user, fetched before the gateway starts.
    pub(super) me: UserId,
    /// The bot's application, from READY (its routes send its messages to an assistant).
    pub(super) application: OnceLock<u64>,
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
    /// The channels whose cursor a gateway message may not move yet.
    pub(super) unread: Mutex<Unread>,
}

impl DiscordBot {
    /// The assistant that answers in `channel` at `place`: the route of the channel (a
    /// thread's parent), else of the server, else of this bot's application, else the
    /// default assistant.
    pub(super) async fn assistant(
        &self,
        place: Place,
        channel: serenity::all::ChannelId,
    ) -> loraloop_core::error::Result<loraloop_core::storage::Assistant> {
        let app = self.application.get().copied().unwrap_or(self.me.get());
        let (channel, guild) = match place {
            Place::Dm => (channel.get(), None),
            Place::Channel { guild } => (channel.get(), Some(guild.get())),
            Place::Thread { guild, parent, .. } => (parent, Some(guild.get())),
        };
        let (channel, guild, app) = (
            channel.to_string(),
            guild.map(|g| g.to_string()),
            app.to_string(),
        );
        let mut places = vec![("channel", channel.as_str())];
        if let Some(g) = &guild {
            places.push(("guild", g.as_str()));
        }
        places.push(("application", app.as_str()));
        self.core.assistants.routed("discord", &places).await
    }
}

impl UpdateHandler for DiscordBot {
    async fn handle(&self, update: &PendingUpdate) -> anyhow::Result<()> {
        let m: Message = serde_json::from_str(&update.payload)
            .map_err(|e| anyhow::anyhow!("unreadable message: {e}"))?;
        self.on_message(m).await
    }

    fn retryable(&self, error: &anyhow::Error) -> bool {
        crate::streaming::passing_failure(error)
            || error.chain().any(|c| {
                c.downcast_ref::<serenity::Error>()
                    .is_some_and(super::calls::transient)
            })
    }
}
