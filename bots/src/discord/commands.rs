//! Slash commands (/reset, /forget, /help, /status) and the /forget confirmation button.

use super::bot::{DiscordBot, Place};
use super::calls::retry;
use crate::text;
use loraloop_core::storage::Platform;
use serenity::all::{
    ButtonStyle, CommandInteraction, ComponentInteraction, CreateActionRow, CreateButton,
    CreateCommand, CreateInteractionResponse, CreateInteractionResponseMessage,
    EditInteractionResponse, Http, RoleId,
};

/// The slash commands, registered (bulk overwrite) on every READY.
pub fn commands() -> Vec<CreateCommand> {
    vec![
        CreateCommand::new("reset").description("Start a new conversation here"),
        CreateCommand::new("forget").description("Delete everything stored about you"),
        CreateCommand::new("help").description("How to use this bot"),
        CreateCommand::new("status")
            .description("Active adapter and training job (members with the admin role)"),
    ]
}

pub(super) fn ephemeral(text: impl Into<String>) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(text)
            .ephemeral(true),
    )
}

impl DiscordBot {
    pub(super) async fn on_command(
        &self,
        http: &Http,
        c: &CommandInteraction,
    ) -> anyhow::Result<()> {
        let name = c.data.name.as_str();
        let place = self.place(c.guild_id, c.channel_id).await?;
        // /forget and /help work everywhere: anyone can always delete what is stored about
        // them, wherever the bot answers or not.
        let answer = if !matches!(name, "forget" | "help") && !self.allowed(place, c.channel_id) {
            ephemeral(if place == Place::Dm {
                text::NO_DMS
            } else {
                text::NOT_HERE
            })
        } else {
            match name {
                "help" => ephemeral(text::DISCORD_HELP),
                "reset" => {
                    let db = &self.core.db;
                    let (chat, thread) = match place {
                        Place::Thread { chat, .. } => {
                            (Some(chat), Some(c.channel_id.get().to_string()))
                        }
                        _ => {
                            let row = db
                                .chat_row(Platform::Discord, &c.channel_id.get().to_string())
                                .await?;
                            (row, None)
                        }
                    };
                    if let Some(chat) = chat {
                        let assistant = self.assistant(place, c.channel_id).await?;
                        db.close_conversations(chat, thread.as_deref(), Some(assistant.id))
                            .await?;
                    }
                    ephemeral(text::NEW_CONVERSATION)
                }
                "forget" => CreateInteractionResponse::Message(
                    CreateInteractionResponseMessage::new()
                        .content(text::FORGET_QUESTION)
                        .ephemeral(true)
                        .components(vec![CreateActionRow::Buttons(vec![
                            CreateButton::new(format!("forget:{}", c.user.id))
                                .label(text::FORGET_BUTTON)
                                .style(ButtonStyle::Danger),
                        ])]),
                ),
                "status" => {
                    // Discord waits 3 s for the first answer; the roles are fetched after
                    // it (deferred: "thinking…", only to that member), then it is edited.
                    retry("interaction response", || c.defer_ephemeral(http)).await?;
                    let text = match self.status(http, c).await {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!("discord: /status: {e:#}");
                            text::STATUS_FAILED.to_string()
                        }
                    };
                    retry("edit interaction response", || {
                        c.edit_response(http, EditInteractionResponse::new().content(&text))
                    })
                    .await?;
                    return Ok(());
                }
                other => ephemeral(format!(
                    "I don't know /{other}. /help lists what I understand."
                )),
            }
        };
        retry("interaction response", || {
            c.create_response(http, answer.clone())
        })
        .await?;
        Ok(())
    }

    /// `/status`, for members with the configured admin role.
    pub(super) async fn status(
        &self,
        http: &Http,
        c: &CommandInteraction,
    ) -> anyhow::Result<String> {
        let Some(role_name) = &self.core.config.raw.discord.admin_role else {
            return Ok(text::STATUS_NO_ROLE.into());
        };
        let (Some(guild), Some(member)) = (c.guild_id, c.member.as_ref()) else {
            return Ok(text::STATUS_NOT_IN_SERVER.into());
        };
        // A role id is the one role; a name matches any role of that name in the server.
        let admin = match role_name.trim().parse::<u64>() {
            Ok(id) if id > 0 => member.roles.contains(&RoleId::new(id)),
            _ => {
                let roles = retry("guild roles", || guild.roles(http)).await?;
                roles
                    .values()
                    .filter(|r| &r.name == role_name)
                    .any(|r| member.roles.contains(&r.id))
            }
        };
        if !admin {
            return Ok(text::status_not_admin(role_name));
        }
        let active = self.core.engine.active_adapter();
        let job = self
            .core
            .db
            .list_jobs(None, 20)
            .await?
            .into_iter()
            .find(|j| j.state == "running" || j.state == "queued");
        let job = match job {
            Some(j) => match j.total_steps {
                Some(t) => format!("job {} is {} (step {} of {t})", j.id, j.state, j.step),
                None => format!("job {} is {}", j.id, j.state),
            },
            None => "no job running".to_string(),
        };
        Ok(format!(
            "Model: {}\nActive adapter: {}\nTraining: {job}",
            self.core.model.name,
            active.map_or_else(|| "none (base model)".to_string(), |t| t.name)
        ))
    }

    pub(super) async fn on_component(
        &self,
        http: &Http,
        c: &ComponentInteraction,
    ) -> anyhow::Result<()> {
        let answer = match c.data.custom_id.strip_prefix("forget:") {
            Some(who) if who == c.user.id.get().to_string() => {
                // Acknowledged first (Discord waits 3 s), then the question is replaced by
                // the outcome.
                retry("interaction response", || {
                    c.create_response(http, CreateInteractionResponse::Acknowledge)
                })
                .await?;
                let deleted = async {
                    let user = self.user_row(c.user.id, Some(&c.user)).await?;
                    crate::forget::forget(&self.core, Platform::Discord, user).await
                }
                .await;
                let text = match deleted {
                    Ok(f) => text::forgotten(f.messages),
                    Err(e) => {
                        tracing::error!("discord: /forget failed: {e:#}");
                        text::FORGET_FAILED.to_string()
                    }
                };
                retry("edit interaction response", || {
                    c.edit_response(
                        http,
                        EditInteractionResponse::new()
                            .content(&text)
                            .components(vec![]),
                    )
                })
                .await?;
                return Ok(());
            }
            Some(_) => ephemeral(text::ONLY_THAT_USER),
            None => ephemeral(text::UNKNOWN_BUTTON),
        };
        retry("interaction response", || {
            c.create_response(http, answer.clone())
        })
        .await?;
        Ok(())
    }
}
