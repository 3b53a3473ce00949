//! After downtime: Discord does not deliver the messages sent while the bot was away (a
//! new gateway session starts from now), so the bot reads each channel it answered in
//! since the newest message it stored there, and takes them as if they had just come.

use super::bot::DiscordBot;
use super::calls::retry;
use loraloop_core::storage::Platform;
use serenity::all::{ChannelId, GetMessages, GuildId, MessageId};
use std::sync::Arc;

/// Channels the bot stored a message in during this many days are read again.
const RECENT_DAYS: i64 = 14;
/// At most this many channels, and this many pages of 100 messages from each.
const MAX_CHANNELS: i64 = 500;
const MAX_PAGES: usize = 10;

impl DiscordBot {
    /// Read every recent channel's messages since the bot's cursor there.
    pub(super) async fn catch_up(self: Arc<Self>) {
        let cursors = match self
            .core
            .db
            .cursors(Platform::Discord, RECENT_DAYS, MAX_CHANNELS)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("discord: cannot read where to catch up from: {e}");
                return;
            }
        };
        let mut found = 0;
        for (channel, guild, last) in cursors {
            match self
                .catch_up_channel(&channel, guild.as_deref(), last)
                .await
            {
                Ok(n) => found += n,
                Err(e) => tracing::warn!("discord: cannot read channel {channel}'s history: {e:#}"),
            }
        }
        if found > 0 {
            tracing::info!("discord: {found} message(s) sent while the bot was away, to answer");
        }
    }

    /// The messages of one channel after `after`, oldest first; how many were new.
    async fn catch_up_channel(
        &self,
        channel: &str,
        guild: Option<&str>,
        after: i64,
    ) -> anyhow::Result<usize> {
        let ch = ChannelId::new(channel.parse()?);
        // REST message objects carry no server: the cursor remembers it.
        let guild = guild.map(str::parse::<u64>).transpose()?.map(GuildId::new);
        let mut after = MessageId::new(u64::try_from(after)?.max(1));
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
                new += usize::from(self.receive(m).await?);
            }
            if !full {
                break;
            }
        }
        Ok(new)
    }
}
