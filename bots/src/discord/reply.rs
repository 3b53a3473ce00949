//! Answering a stored message: the conversation (a thread for a mention), the streamed reply, the final text split at Discord's limit with the rating reactions.

use super::bot::{DiscordBot, Place, THUMBS_DOWN, THUMBS_UP};
use super::calls::{error_code, new_nonce, reply_nonce, retry};
use crate::lock;
use crate::streaming::{self, split_message};
use crate::text;
use loraloop_core::storage::Platform;
use serenity::all::{
    ChannelId, CreateMessage, CreateThread, EditMessage, Http, Message, MessageId, Nonce,
    ReactionType, UserId,
};
use std::sync::Mutex;
use std::time::Duration;

/// Discord's limit on a message's content.
pub const MAX_MESSAGE_CHARS: usize = 2000;
/// Discord's error code for a second thread on one message.
pub(super) const THREAD_ALREADY_CREATED: isize = 160004;

/// A Discord channel (or thread) as the place a reply streams to.
pub(super) struct DiscordChannel<'a> {
    bot: &'a DiscordBot,
    channel: ChannelId,
    /// The nonce of the reply's recorded message while this attempt has not sent it: its
    /// first send is that message (see `streaming`); None when an earlier attempt's is
    /// recorded, or once it is sent.
    reply_nonce: Mutex<Option<String>>,
}

impl streaming::ReplyChannel for DiscordChannel<'_> {
    type Id = MessageId;
    const PLATFORM: Platform = Platform::Discord;
    const MAX_CHARS: usize = MAX_MESSAGE_CHARS;
    /// Discord shows "typing" for about 10 s after each trigger.
    const TYPING_INTERVAL: Duration = Duration::from_secs(8);

    async fn send(&self, text: &str) -> anyhow::Result<MessageId> {
        let nonce = lock(&self.reply_nonce).take().unwrap_or_else(new_nonce);
        Ok(self.bot.say_once(self.channel, text, nonce).await?.id)
    }

    async fn edit(&self, id: MessageId, text: &str) {
        let _ = retry("edit message", || {
            self.channel
                .edit_message(self.bot.http(), id, EditMessage::new().content(text))
        })
        .await;
    }

    async fn typing(&self) {
        let _ = self.channel.broadcast_typing(self.bot.http()).await;
    }

    /// The rating reactions go on the first part.
    async fn deliver(
        &self,
        reply: &streaming::ToDeliver<MessageId>,
        slot: &streaming::ReplySlot<'_>,
    ) -> anyhow::Result<Option<MessageId>> {
        let (bot, channel) = (self.bot, self.channel);
        let full = streaming::shown_text(&reply.text);
        let mut first = None;
        for (i, part) in split_message(&full, MAX_MESSAGE_CHARS).iter().enumerate() {
            let id = match (i, reply.sent) {
                (0, Some(id)) => {
                    retry("edit message", || {
                        channel.edit_message(bot.http(), id, EditMessage::new().content(part))
                    })
                    .await?;
                    id
                }
                (0, None) => {
                    let nonce = reply_nonce(slot.update_key, 0);
                    let id = bot.say_once(channel, part, nonce).await?.id;
                    slot.record::<DiscordChannel>(id).await;
                    id
                }
                _ => {
                    let nonce = reply_nonce(slot.update_key, i);
                    bot.say_once(channel, part, nonce).await?.id
                }
            };
            first.get_or_insert(id);
        }
        let Some(first) = first else {
            return Ok(None);
        };
        for emoji in [THUMBS_UP, THUMBS_DOWN] {
            if let Err(e) = retry("add reaction", || {
                channel.create_reaction(bot.http(), first, ReactionType::Unicode(emoji.to_string()))
            })
            .await
            {
                // A missing permission must not fail the reply: people can still react.
                tracing::info!("discord: cannot add {emoji} to a reply: {e}");
            }
        }
        Ok(Some(first))
    }

    fn id_text(id: MessageId) -> String {
        id.get().to_string()
    }

    fn parse_id(s: &str) -> Option<MessageId> {
        s.parse::<u64>()
            .ok()
            .filter(|n| *n != 0)
            .map(MessageId::new)
    }
}

/// A message's content without mentions of `me`.
pub(super) fn without_mention(content: &str, me: UserId) -> String {
    content
        .replace(&format!("<@{me}>"), "")
        .replace(&format!("<@!{me}>"), "")
        .trim()
        .to_string()
}

/// A thread name from the first words of a message (Discord allows 100 characters).
pub(super) fn thread_name(text: &str, author: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return text::thread_title(author);
    }
    let mut name: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        name.push('…');
    }
    name
}

impl DiscordBot {
    pub(super) fn http(&self) -> &Http {
        self.http
            .get()
            .expect("`run` sets the HTTP client before it starts the gateway")
    }

    /// Send a message; a retry after an error that Discord may have acted on (a 5xx, a
    /// lost answer) carries the same nonce, so Discord returns the first copy.
    pub(super) async fn say(&self, channel: ChannelId, text: &str) -> anyhow::Result<Message> {
        self.say_once(channel, text, new_nonce()).await
    }

    /// Send a message with `nonce`: while Discord remembers it, a second send with it
    /// returns the first message.
    async fn say_once(
        &self,
        channel: ChannelId,
        text: &str,
        nonce: String,
    ) -> anyhow::Result<Message> {
        Ok(retry("send message", || {
            channel.send_message(
                self.http(),
                CreateMessage::new()
                    .content(text)
                    .nonce(Nonce::String(nonce.clone()))
                    .enforce_nonce(true),
            )
        })
        .await?)
    }

    pub(super) async fn on_message(&self, m: Message) -> anyhow::Result<()> {
        let me = self.me;
        let mut channel = m.channel_id;
        let mut place = self.place(m.guild_id, channel).await?;
        if !self.allowed(place, channel) {
            // Stored before the allowlists changed.
            self.refuse(channel, place).await;
            return Ok(());
        }
        let (ok, notice) = self.rate.check(m.author.id.get());
        if !ok {
            if notice {
                self.say(channel, text::SLOW_DOWN).await?;
            }
            return Ok(());
        }
        let text = without_mention(&m.content, me);
        if text.is_empty() {
            self.say(
                channel,
                if m.attachments.is_empty() && m.sticker_items.is_empty() {
                    text::EMPTY_MENTION
                } else {
                    text::NON_TEXT
                },
            )
            .await?;
            return Ok(());
        }
        let db = &self.core.db;
        let user = db
            .upsert_platform_user(
                Platform::Discord,
                &m.author.id.get().to_string(),
                Some(&m.author.name),
                m.author.global_name.as_deref(),
            )
            .await?;
        // A mention in a server channel: a thread on the message holds the conversation.
        // A thread started from a message has that message's id.
        if let Place::Channel { guild } = place
            && !self.replied_to_me(&m)
        {
            let on_message = ChannelId::new(m.id.get());
            if let Some((chat, parent)) = self.bot_thread(on_message).await? {
                // Replayed after a restart: the thread was started, its conversation stored.
                place = Place::Thread {
                    guild,
                    chat,
                    parent,
                };
                channel = on_message;
            } else {
                let chat = db
                    .upsert_chat(
                        Platform::Discord,
                        &channel.get().to_string(),
                        "channel",
                        None,
                    )
                    .await?;
                // Known as the bot's thread before it exists: a quick follow-up in it is
                // stored (and waits for this reply: its worker is this message's).
                lock(&self.threads).insert(on_message.get(), (chat, channel.get()));
                let name = thread_name(&text, &m.author.name);
                let started = match retry("start thread", || {
                    channel.create_thread_from_message(self.http(), m.id, CreateThread::new(&name))
                })
                .await
                {
                    Ok(thread) => Some(thread.id),
                    // Started before a restart, nothing stored yet: it is this message's id.
                    Err(e) if error_code(&e) == Some(THREAD_ALREADY_CREATED) => Some(on_message),
                    Err(e) => {
                        tracing::info!(
                            "discord: cannot start a thread in channel {channel} ({e}); answering there"
                        );
                        None
                    }
                };
                match started {
                    Some(thread) => {
                        lock(&self.threads).insert(thread.get(), (chat, channel.get()));
                        // The thread is a channel whose history a catch-up reads from its
                        // start (every message in it comes after the one it was made on).
                        if let Err(e) = db
                            .advance_cursor(
                                Platform::Discord,
                                &thread.get().to_string(),
                                Some(&guild.get().to_string()),
                                i64::try_from(thread.get())?,
                            )
                            .await
                        {
                            tracing::warn!("discord: cannot record thread {thread}'s cursor: {e}");
                        }
                        place = Place::Thread {
                            guild,
                            chat,
                            parent: channel.get(),
                        };
                        channel = thread;
                    }
                    None => {
                        lock(&self.threads).remove(&on_message.get());
                    }
                }
            }
        }
        let (chat, thread) = match place {
            Place::Thread { chat, .. } => (chat, Some(channel.get().to_string())),
            Place::Dm | Place::Channel { .. } => {
                let kind = if matches!(place, Place::Dm) {
                    "private"
                } else {
                    "channel"
                };
                let chat = db
                    .upsert_chat(Platform::Discord, &channel.get().to_string(), kind, None)
                    .await?;
                (chat, None)
            }
        };
        let assistant = self.assistant(place, channel).await?;
        let conv = db
            .current_conversation(assistant.id, chat, thread.as_deref(), Some(user.id))
            .await?;
        let message_id = m.id.get().to_string();
        streaming::answer_once(
            &self.core,
            &streaming::Incoming {
                conversation_id: conv.id,
                user_id: user.id,
                text: &text,
                platform_message_id: &message_id,
                // The update's key is the message's id (see `receive`).
                update_key: &message_id,
            },
            |started: Option<MessageId>| DiscordChannel {
                bot: self,
                channel,
                reply_nonce: Mutex::new(started.is_none().then(|| reply_nonce(&message_id, 0))),
            },
        )
        .await
    }
}
