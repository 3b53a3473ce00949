//! After downtime: Discord does not deliver the messages sent while the bot was away (a
//! new gateway session starts from now), so the bot reads each channel it answered in
//! since the newest message it stored there, and takes them as if they had just come.
//!
//! A channel's cursor says "every message up to here is stored": the next start reads from
//! it. So a message from the gateway may move it only when no older message can still be
//! missing ([`super::unread::Unread`]): a message sent while the bot was away and not yet
//! read from the history, or one whose store failed. Gateway events are handled in parallel tasks, so
//! two messages sent together can be stored out of order; a kill between the two stores
//! would leave the cursor past the older one, so the history is read from a little before
//! the cursor ([`REREAD`]); what was stored already is recognised and not answered again.

use super::bot::{DiscordBot, Via};
use super::calls::retry;
use crate::lock;
use loraloop_core::storage::Platform;
use serenity::all::{ChannelId, GetMessages, GuildId, MessageId};
use std::sync::Arc;
use std::time::Duration;

/// Channels the bot stored a message in during this many days are read again.
const RECENT_DAYS: i64 = 14;
/// At most this many channels, and this many pages of 100 messages from each.
const MAX_CHANNELS: i64 = 500;
const MAX_PAGES: usize = 10;
/// The history is read from this long (in Discord's snowflake time) before the cursor.
const REREAD: Duration = Duration::from_secs(60);
/// What could not be read (the channel list, a channel's history) is tried again after
/// this wait, doubling up to [`RETRY_MAX`], until it is read or the bot stops: until then
/// its cursors stay where they are, and a cursor left far behind would have the next
/// start read old pages instead of what was missed.
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl DiscordBot {
    /// On READY: read every recent channel's messages since the bot's cursor there.
    pub(super) async fn catch_up(self: Arc<Self>) {
        // Until the list is read no cursor moves.
        let Some(cursors) = self
            .until_read(RETRY_FIRST, "where to catch up from", || async {
                Ok(self
                    .core
                    .db
                    .cursors(Platform::Discord, RECENT_DAYS, MAX_CHANNELS)
                    .await?)
            })
            .await
        else {
            return;
        };
        let cursors: Vec<(u64, Option<String>, i64)> = cursors
            .into_iter()
            .filter_map(|(channel, guild, last)| Some((channel.parse().ok()?, guild, last)))
            .collect();
        {
            let mut unread = lock(&self.unread);
            for (channel, ..) in &cursors {
                unread.add(*channel);
            }
            unread.listed = true;
        }
        let mut found = 0;
        for (channel, guild, last) in cursors {
            match self.catch_up_channel(channel, guild.as_deref(), last).await {
                Ok(n) => {
                    found += n;
                    lock(&self.unread).read(channel);
                }
                Err(e) => {
                    tracing::warn!("discord: cannot read channel {channel}'s history: {e:#}");
                    tokio::spawn(self.clone().read_again(channel, guild, last));
                }
            }
        }
        if found > 0 {
            tracing::info!("discord: {found} message(s) sent while the bot was away, to answer");
        }
    }

    /// Read a channel again from `after`, a little later and until it is read (it was
    /// marked unread when its history or a message's store failed).
    pub(super) async fn read_again(
        self: Arc<Self>,
        channel: u64,
        guild: Option<String>,
        after: i64,
    ) {
        tokio::time::sleep(RETRY_FIRST).await;
        if self.queue.stopping() {
            return;
        }
        let what = format!("channel {channel}'s history");
        let read = self
            .until_read(RETRY_FIRST * 2, &what, || {
                self.catch_up_channel(channel, guild.as_deref(), after)
            })
            .await;
        if read.is_some() {
            lock(&self.unread).read(channel);
        }
    }

    /// `read` until it succeeds (its value) or the bot stops (None), waiting `wait` after
    /// the first failure, doubling up to [`RETRY_MAX`].
    async fn until_read<T, Fut>(
        &self,
        mut wait: Duration,
        what: &str,
        mut read: impl FnMut() -> Fut,
    ) -> Option<T>
    where
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        loop {
            match read().await {
                Ok(v) => return Some(v),
                Err(e) => tracing::warn!(
                    "discord: cannot read {what}: {e:#}; trying again in {}s",
                    wait.as_secs()
                ),
            }
            tokio::time::sleep(wait).await;
            if self.queue.stopping() {
                return None;
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// The messages of one channel after `after` (and [`REREAD`] before it), oldest first;
    /// how many were new.
    async fn catch_up_channel(
        &self,
        channel: u64,
        guild: Option<&str>,
        after: i64,
    ) -> anyhow::Result<usize> {
        let ch = ChannelId::new(channel);
        // REST message objects carry no server: the cursor remembers it.
        let guild = guild.map(str::parse::<u64>).transpose()?.map(GuildId::new);
        // A snowflake's bits above the 22nd are milliseconds.
        let reread = (REREAD.as_millis() as u64) << 22;
        let mut after = MessageId::new(u64::try_from(after)?.saturating_sub(reread).max(1));
        let mut new = 0;
        for _ in 0..MAX_PAGES {
            let mut page = retry("read channel history", || {
                ch.messages(self.http(), GetMessages::new().after(after).limit(100))
            })
            .await?;
            page.sort_by_key(|m| m.id);
            let Some(last) = page.last() else { break };
            after = last.id;
            let full = page.len() == 100;
            for mut m in page {
                m.guild_id = m.guild_id.or(guild);
                new += usize::from(self.receive(m, Via::History).await?);
            }
            if !full {
                break;
            }
        }
        Ok(new)
    }
}
