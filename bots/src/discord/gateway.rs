//! The gateway events the bot listens to, handed to the bot.

use super::bot::{DiscordBot, Via};
use super::calls::retry;
use super::commands::commands;
use crate::lock;
use serenity::all::{
    Command, Context, EventHandler, GatewayIntents, GuildId, Interaction, Message, Reaction, Ready,
    ResumedEvent,
};
use std::sync::Arc;

/// The gateway events the bot needs: messages (guilds and DMs) with their content, and
/// reactions for the ratings. MESSAGE_CONTENT is privileged: it must be switched on in the
/// application's Bot settings.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
        | GatewayIntents::GUILD_MESSAGE_REACTIONS
        | GatewayIntents::DIRECT_MESSAGE_REACTIONS
}

pub(super) struct Handler(pub(super) Arc<DiscordBot>);

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        tracing::info!(
            "discord: connected as {} ({} server(s))",
            ready.user.name,
            ready.guilds.len()
        );
        let _ = self.0.application.set(ready.application.id.get());
        // Messages stored by an earlier run and not answered, and those sent while the
        // bot was away.
        lock(&self.0.unread).new_session();
        self.0.wake.notify_one();
        tokio::spawn(self.0.clone().catch_up());
        let dev_guild = self.0.core.config.raw.discord.dev_guild_id;
        let registered = retry("register commands", || async {
            match dev_guild {
                Some(g) => GuildId::new(g).set_commands(&ctx.http, commands()).await,
                None => Command::set_global_commands(&ctx.http, commands()).await,
            }
        })
        .await;
        if let Err(e) = registered {
            tracing::warn!("discord: registering the slash commands failed: {e}");
        }
    }

    async fn resume(&self, _ctx: Context, _: ResumedEvent) {
        tracing::info!("discord: gateway session resumed");
    }

    async fn message(&self, _ctx: Context, m: Message) {
        let (channel, id) = (m.channel_id.get(), m.id.get());
        let guild = m.guild_id.map(|g| g.get().to_string());
        if let Err(e) = self.0.receive(m, Via::Gateway).await {
            tracing::error!(
                "discord: cannot store a message: {e:#}; reading the channel's history again soon"
            );
            // Marked before the store is retried: no later message moves the cursor past it.
            lock(&self.0.unread).add(channel);
            let before = i64::try_from(id.saturating_sub(1)).unwrap_or(i64::MAX);
            tokio::spawn(self.0.clone().read_again(channel, guild, before));
        }
    }

    async fn reaction_add(&self, _ctx: Context, r: Reaction) {
        if let Err(e) = self.0.on_reaction(r, true).await {
            tracing::warn!("discord: reaction: {e:#}");
        }
    }

    async fn reaction_remove(&self, _ctx: Context, r: Reaction) {
        if let Err(e) = self.0.on_reaction(r, false).await {
            tracing::warn!("discord: reaction removal: {e:#}");
        }
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        let outcome = match interaction {
            Interaction::Command(c) => self.0.on_command(&ctx.http, &c).await,
            Interaction::Component(c) => self.0.on_component(&ctx.http, &c).await,
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            tracing::warn!("discord: interaction: {e:#}");
        }
    }
}
