//! Messages from the gateway: whether the bot answers them (where, allowlists, refusals), storing them, and handing the stored ones to the update queue.

use super::bot::{DiscordBot, Place, Via};
use crate::lock;
use crate::text;
use loraloop_core::storage::Platform;
use serenity::all::{ChannelId, GuildId, Message, MessageType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a burst of messages is given to be stored before the dispatcher reads the
/// pending ones: serenity handles each gateway event in its own task, so messages sent
/// together can be stored out of order.
pub(super) const SETTLE: Duration = Duration::from_millis(150);
/// How often the dispatcher looks for pending messages without being woken.
const RETRY_TICK: Duration = Duration::from_secs(5);
/// A refusal (channel not allowed, DMs off) goes to a channel at most once per this long.
pub(super) const REFUSAL_INTERVAL: Duration = Duration::from_secs(3600);

impl DiscordBot {
    /// The bot's thread this channel is, if it is one (memory, then the database).
    pub(super) async fn bot_thread(
        &self,
        channel: ChannelId,
    ) -> anyhow::Result<Option<(i64, u64)>> {
        if let Some(t) = lock(&self.threads).get(&channel.get()) {
            return Ok(Some(*t));
        }
        let found = self
            .core
            .db
            .chat_of_thread(Platform::Discord, &channel.get().to_string())
            .await?;
        Ok(match found {
            Some((chat, parent)) => {
                let parent: u64 = parent.parse()?;
                lock(&self.threads).insert(channel.get(), (chat, parent));
                Some((chat, parent))
            }
            None => None,
        })
    }

    pub(super) async fn place(
        &self,
        guild: Option<GuildId>,
        channel: ChannelId,
    ) -> anyhow::Result<Place> {
        let Some(guild) = guild else {
            return Ok(Place::Dm);
        };
        Ok(match self.bot_thread(channel).await? {
            Some((chat, parent)) => Place::Thread {
                guild,
                chat,
                parent,
            },
            None => Place::Channel { guild },
        })
    }

    /// Whether the allowlists let the bot answer here.
    pub(super) fn allowed(&self, place: Place, channel: ChannelId) -> bool {
        let cfg = &self.core.config.raw.discord;
        let (guild, channel) = match place {
            Place::Dm => return cfg.direct_messages,
            Place::Channel { guild } => (guild.get(), channel.get()),
            Place::Thread { guild, parent, .. } => (guild.get(), parent),
        };
        (cfg.allowed_guild_ids.is_empty() || cfg.allowed_guild_ids.contains(&guild))
            && (cfg.allowed_channel_ids.is_empty() || cfg.allowed_channel_ids.contains(&channel))
    }

    pub(super) fn replied_to_me(&self, m: &Message) -> bool {
        m.referenced_message
            .as_ref()
            .is_some_and(|r| r.author.id == self.me)
    }

    /// A message from the gateway or a channel's history: store it if the bot is to
    /// answer it, then wake the dispatcher; true when it was new. Outside the allowlists
    /// nothing is stored and the channel gets a refusal (at most one an hour).
    pub(super) async fn receive(&self, m: Message, via: Via) -> anyhow::Result<bool> {
        let me = self.me;
        if m.author.bot || m.author.id == me {
            return Ok(false);
        }
        // System messages (a member added to a thread, a pin, ...) are nobody talking.
        if !matches!(m.kind, MessageType::Regular | MessageType::InlineReply) {
            return Ok(false);
        }
        let thread = self.bot_thread(m.channel_id).await?;
        let addressed = m.guild_id.is_none()
            || m.mentions.iter().any(|u| u.id == me)
            || self.replied_to_me(&m)
            || thread.is_some();
        if !addressed {
            return Ok(false);
        }
        let place = match (m.guild_id, thread) {
            (None, _) => Place::Dm,
            (Some(guild), Some((chat, parent))) => Place::Thread {
                guild,
                chat,
                parent,
            },
            (Some(guild), None) => Place::Channel { guild },
        };
        if !self.allowed(place, m.channel_id) {
            self.refuse(m.channel_id, place).await;
            return Ok(false);
        }
        let payload = serde_json::to_string(&m)?;
        let key = m.id.get().to_string();
        // Discord does not send a message again: retry a failed store a few times (a busy
        // or briefly unavailable database); a message still not stored is read from the
        // channel's history again (the cursor stops before it: see `catch_up`).
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        let stored = loop {
            attempt += 1;
            match self
                .core
                .db
                .store_update(Platform::Discord, &key, &payload)
                .await
            {
                Ok(new) => break new,
                Err(e) if attempt < 5 => {
                    tracing::warn!("discord: storing message {key} failed ({e}); retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.into()),
            }
        };
        // The history is read in order; the gateway's messages are stored in parallel.
        let may_advance = via == Via::History || lock(&self.unread).may_advance(m.channel_id.get());
        let guild = m.guild_id.map(|g| g.get().to_string());
        if may_advance
            && let Err(e) = self
                .core
                .db
                .advance_cursor(
                    Platform::Discord,
                    &m.channel_id.get().to_string(),
                    guild.as_deref(),
                    i64::try_from(m.id.get())?,
                )
                .await
        {
            tracing::warn!(
                "discord: cannot record channel {}'s cursor: {e}",
                m.channel_id
            );
        }
        if stored {
            self.wake.notify_one();
        } else {
            tracing::debug!("discord: message {} was delivered again", m.id);
        }
        Ok(stored)
    }

    /// Tell a channel the bot does not answer there, at most once per
    /// [`REFUSAL_INTERVAL`].
    pub(super) async fn refuse(&self, channel: ChannelId, place: Place) {
        {
            let mut refused = lock(&self.refused);
            if refused
                .get(&channel.get())
                .is_some_and(|t| t.elapsed() < REFUSAL_INTERVAL)
            {
                return;
            }
            if refused.len() > 10_000 {
                refused.retain(|_, t| t.elapsed() < REFUSAL_INTERVAL);
            }
            refused.insert(channel.get(), Instant::now());
        }
        let text = if place == Place::Dm {
            text::NO_DMS
        } else {
            text::NOT_HERE
        };
        if let Err(e) = self.say(channel, text).await {
            tracing::info!("discord: cannot send a refusal to {channel}: {e:#}");
        }
    }

    /// The conversation a message belongs to, as the key of its worker: its thread (a
    /// mention in a server channel starts a thread whose id is the message's), else its
    /// channel.
    pub(super) async fn target(&self, m: &Message) -> u64 {
        if m.guild_id.is_none()
            || self.replied_to_me(m)
            || !matches!(self.bot_thread(m.channel_id).await, Ok(None))
        {
            return m.channel_id.get();
        }
        m.id.get()
    }

    /// Hand every pending message to its conversation's worker, in message order.
    pub(super) async fn dispatcher(self: Arc<Self>) {
        loop {
            // Also every few seconds: replies that failed for a passing reason are due
            // again after their wait.
            let _ = tokio::time::timeout(RETRY_TICK, self.wake.notified()).await;
            tokio::time::sleep(SETTLE).await;
            let pending = match self.core.db.pending_updates(Platform::Discord, None).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("discord: cannot read pending messages: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.wake.notify_one();
                    continue;
                }
            };
            for p in pending {
                if !self.queue.claim(&p.update_key) {
                    if self.queue.stopping() {
                        return;
                    }
                    continue;
                }
                let target = match serde_json::from_str::<Message>(&p.payload) {
                    Ok(m) => self.target(&m).await,
                    Err(_) => 0,
                };
                self.queue.push(target, p, &self);
            }
        }
    }
}
