//! 👍/👎 reactions on a reply: the user's rating.

use super::bot::{DiscordBot, THUMBS_DOWN, THUMBS_UP};
use loraloop_core::storage::Platform;
use serenity::all::{Reaction, ReactionType, UserId};

impl DiscordBot {
    /// A 👍/👎 added to or removed from one of the bot's replies.
    pub(super) async fn on_reaction(&self, r: Reaction, added: bool) -> anyhow::Result<()> {
        let me = self.me;
        let Some(user_id) = r.user_id else {
            return Ok(());
        };
        // The bot's own 👍/👎, and reactions on messages that are not the bot's (Discord
        // names the author on an added reaction), are no ratings.
        if user_id == me || (added && r.message_author_id.is_some_and(|a| a != me)) {
            return Ok(());
        }
        let rating = match &r.emoji {
            ReactionType::Unicode(e) if e.as_str() == THUMBS_UP => 1,
            ReactionType::Unicode(e) if e.as_str() == THUMBS_DOWN => -1,
            _ => return Ok(()),
        };
        let db = &self.core.db;
        let Some(reply) = db
            .reply_by_platform_id(Platform::Discord, &r.message_id.get().to_string())
            .await?
        else {
            return Ok(());
        };
        let rater = format!("discord:{user_id}");
        if added {
            let user = self
                .user_row(user_id, r.member.as_ref().map(|m| &m.user))
                .await?;
            db.set_feedback(reply.id, &rater, Some(user), Some(rating), None)
                .await?;
        } else {
            // Only the rating that reaction gave: 👍 removed after 👎 was added keeps 👎
            // (checked in the statement itself, whatever order the two events run in).
            db.remove_rating(reply.id, &rater, rating).await?;
        }
        Ok(())
    }

    /// The stored user's row id, created when first seen (names from `user` when known).
    pub(super) async fn user_row(
        &self,
        id: UserId,
        user: Option<&serenity::all::User>,
    ) -> anyhow::Result<i64> {
        let db = &self.core.db;
        if user.is_none() {
            let known = db
                .platform_user_row(Platform::Discord, &id.get().to_string())
                .await?;
            if let Some(row) = known {
                return Ok(row);
            }
        }
        Ok(db
            .upsert_platform_user(
                Platform::Discord,
                &id.get().to_string(),
                user.map(|u| u.name.as_str()),
                user.and_then(|u| u.global_name.as_deref()),
            )
            .await?
            .id)
    }
}
