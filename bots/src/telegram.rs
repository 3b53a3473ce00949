//! The Telegram bot. Its own `getUpdates` loop (teloxide's `Bot` for the API calls)
//! stores every update in the database *before* its offset is confirmed to Telegram, and
//! the handlers work from the stored updates: an update read but not answered when the
//! process dies is answered after the restart. Each update is marked done once its reply
//! is sent; a kill between Telegram accepting a reply and that mark can repeat one reply
//! (at most one duplicate per update), never lose one.
//!
//! Replies stream: the first words are sent as soon as they exist and the message is
//! edited as tokens arrive (at most once a second per chat); the final text always
//! arrives complete, split at Telegram's 4,096-character limit, with 👍/👎 buttons.

use crate::backoff::{self, Wait};
use crate::mention;
use crate::queue::{UpdateHandler, UpdateQueue};
use crate::rate_limit::RateLimiter;
use crate::streaming::{self, split_message};
use crate::text;
use loraloop_core::Services;
use loraloop_core::inbox::Inbox;
use loraloop_core::storage::{PendingUpdate, Platform};
use loraloop_core::token::random_token;
use secrecy::{ExposeSecret, SecretString};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use teloxide_core::payloads::setters::*;
use teloxide_core::prelude::Requester;
use teloxide_core::types::{
    BotCommand, ChatAction, ChatId, InlineKeyboardButton, InlineKeyboardMarkup, Me, Message,
    MessageId, Update, UpdateKind,
};
use teloxide_core::{ApiError as TgError, Bot, RequestError};

/// Telegram's limit on a message's text.
pub const MAX_MESSAGE_CHARS: usize = 4096;

pub struct TelegramBot {
    core: Services,
    /// Updates stored by the webhook route (webhook mode).
    inbox: Arc<Inbox>,
    bot: Bot,
    me: Me,
    /// The stored updates, by chat: a chat's updates are handled in order, chats in
    /// parallel.
    queue: Arc<UpdateQueue<i64>>,
    rate: RateLimiter,
}

/// How long a stop waits for the replies being generated to be sent.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Run the bot until `stop` is notified.
pub async fn run(
    core: Services,
    inbox: Arc<Inbox>,
    token: SecretString,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let api = reqwest::Url::parse(&core.config.raw.telegram.api_url)?;
    let bot = Bot::new(token.expose_secret()).set_api_url(api);
    let me = tokio::select! {
        me = retry("getMe", || bot.get_me()) => me.map_err(|e| anyhow::anyhow!("telegram getMe: {e}"))?,
        _ = stop.notified() => return Ok(()),
    };
    let commands = [
        BotCommand::new("start", "What this bot does"),
        BotCommand::new("reset", "Start a new conversation"),
        BotCommand::new("forget", "Delete everything stored about you"),
        BotCommand::new("help", "How to use this bot"),
    ];
    if let Err(e) = retry("setMyCommands", || bot.set_my_commands(commands.clone())).await {
        tracing::warn!("telegram: setMyCommands failed: {e}");
    }
    let rate = RateLimiter::new(core.config.raw.telegram.rate_limit_per_minute);
    let webhook = core.config.raw.telegram.webhook_url.clone();
    let queue = Arc::new(UpdateQueue::new(Platform::Telegram, core.db.clone()));
    let tb = Arc::new(TelegramBot {
        core,
        inbox,
        bot,
        me,
        queue,
        rate,
    });
    // Updates are stored under the bot's id (several bots may share the database); those
    // stored before keys had one were this bot's.
    let adopted = tb
        .core
        .db
        .adopt_unscoped_updates(Platform::Telegram, &tb.source())
        .await?;
    if adopted > 0 {
        tracing::info!("telegram: {adopted} updates stored by an earlier version are this bot's");
    }
    // Updates stored by an earlier run and not answered.
    tb.clone().dispatch_pending().await?;
    let outcome = match webhook {
        Some(url) => tb.clone().webhook(&url, stop).await,
        None => tb.clone().poll(stop).await,
    };
    // Finish the replies in progress (within a grace period); queued updates stay pending.
    tb.queue.stop(STOP_GRACE).await;
    tracing::info!("telegram: stopped");
    outcome
}

impl TelegramBot {
    /// The prefix of this bot's update keys in `inbound_updates` (its user id).
    fn source(&self) -> String {
        self.me.id.0.to_string()
    }

    /// The assistant that answers in `chat`: the chat's route, else this bot's, else the
    /// default assistant.
    async fn assistant(
        &self,
        chat: ChatId,
    ) -> loraloop_core::error::Result<loraloop_core::storage::Assistant> {
        let (chat, bot) = (chat.0.to_string(), self.me.id.0.to_string());
        self.core
            .assistants
            .routed("telegram", &[("chat", &chat), ("bot", &bot)])
            .await
    }

    /// Long polling: store each batch of updates, then confirm it with the next offset.
    async fn poll(self: Arc<Self>, stop: Arc<tokio::sync::Notify>) -> anyhow::Result<()> {
        // getUpdates is refused while a webhook is set (from an earlier webhook-mode run).
        if let Err(e) = retry("deleteWebhook", || self.bot.delete_webhook()).await {
            tracing::warn!("telegram: deleteWebhook failed: {e}");
        }
        tracing::info!("telegram: polling as @{}", self.me.username());
        let mut offset = self
            .core
            .db
            .last_update_id(Platform::Telegram, &self.source())
            .await?
            .map(|u| u + 1);
        loop {
            let mut req = self.bot.get_updates().timeout(25);
            if let Some(o) = offset {
                req = req.offset(o as i32);
            }
            let updates = tokio::select! {
                u = req.into_future() => u,
                _ = stop.notified() => return Ok(()),
            };
            let updates = match updates {
                Ok(u) => u,
                Err(RequestError::RetryAfter(s)) => {
                    tokio::time::sleep(s.duration()).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("telegram: getUpdates failed: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.notified() => return Ok(()),
                    }
                }
            };
            for u in &updates {
                let payload = serde_json::to_string(u)?;
                self.core
                    .db
                    .store_update(
                        Platform::Telegram,
                        &format!("{}:{}", self.source(), u.id.0),
                        &payload,
                    )
                    .await?;
                offset = Some(offset.unwrap_or(0).max(i64::from(u.id.0) + 1));
            }
            // Also without new updates: replies that failed for a passing reason are
            // due again after their wait.
            self.clone().dispatch_pending().await?;
        }
    }

    /// Webhook mode: register `url` with a fresh secret token, then handle what the
    /// webhook route stores. The webhook stays registered after a stop, so Telegram keeps
    /// the updates that come meanwhile and delivers them after the restart.
    async fn webhook(
        self: Arc<Self>,
        url: &str,
        stop: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<()> {
        let secret = random_token(32);
        let parsed = reqwest::Url::parse(url)?;
        retry("setWebhook", || {
            self.bot
                .set_webhook(parsed.clone())
                .secret_token(secret.clone())
        })
        .await
        .map_err(|e| anyhow::anyhow!("telegram setWebhook: {e}"))?;
        self.inbox.set_secret(secret, self.source());
        tracing::info!(
            "telegram: webhook registered for @{} at {}",
            self.me.username(),
            parsed.path()
        );
        loop {
            tokio::select! {
                _ = self.inbox.wait() => {}
                // Also now and then, for updates whose handling failed to start.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.notified() => return Ok(()),
            }
            self.clone().dispatch_pending().await?;
        }
    }
}

/// Retry a Telegram call on transient errors (429 with `retry_after`, network, 5xx) with
/// backoff; a permanent error (blocked, chat not found, bad request) returns at once.
pub async fn retry<T, F, Fut>(what: &str, call: F) -> Result<T, RequestError>
where
    F: FnMut() -> Fut,
    Fut: IntoFuture<Output = Result<T, RequestError>>,
{
    backoff::retry("telegram", what, call, |e| match e {
        RequestError::RetryAfter(s) => Some(Wait::Exactly(s.duration())),
        e => transient(e).then_some(Wait::Backoff {
            at_least: Duration::ZERO,
        }),
    })
    .await
}

fn transient(e: &RequestError) -> bool {
    match e {
        RequestError::Network(_) | RequestError::Io(_) | RequestError::InvalidJson { .. } => true,
        // Telegram's 5xx answers have no specific error kind.
        RequestError::Api(TgError::Unknown(_)) => true,
        _ => false,
    }
}

/// A Telegram chat as the place a reply streams to.
struct TgChat<'a> {
    bot: &'a Bot,
    chat: ChatId,
}

impl streaming::ReplyChannel for TgChat<'_> {
    type Id = MessageId;
    const PLATFORM: Platform = Platform::Telegram;
    const MAX_CHARS: usize = MAX_MESSAGE_CHARS;
    /// Telegram shows "typing…" for 5 seconds.
    const TYPING_INTERVAL: Duration = Duration::from_secs(4);

    async fn send(&self, text: &str) -> anyhow::Result<MessageId> {
        Ok(
            retry("sendMessage", || self.bot.send_message(self.chat, text))
                .await?
                .id,
        )
    }

    async fn edit(&self, id: MessageId, text: &str) {
        let _ = retry("editMessageText", || {
            self.bot.edit_message_text(self.chat, id, text)
        })
        .await;
    }

    async fn typing(&self) {
        let _ = self
            .bot
            .send_chat_action(self.chat, ChatAction::Typing)
            .await;
    }

    /// The rating buttons go on the last part.
    async fn deliver(
        &self,
        reply: &streaming::ToDeliver<MessageId>,
        slot: &streaming::ReplySlot<'_>,
    ) -> anyhow::Result<Option<MessageId>> {
        let chat = self.chat;
        let parts = split_message(&streaming::shown_text(&reply.text), MAX_MESSAGE_CHARS);
        let last = parts.len() - 1;
        let mut first_id = None;
        for (i, part) in parts.iter().enumerate() {
            let kb = (i == last).then(|| rating_keyboard(reply.stored_id));
            let id = match (i, reply.sent) {
                (0, Some(id)) => {
                    let r = retry("editMessageText", || {
                        let req = self.bot.edit_message_text(chat, id, part.as_str());
                        match &kb {
                            Some(k) => req.reply_markup(k.clone()),
                            None => req,
                        }
                    })
                    .await;
                    match r {
                        Ok(_) => {}
                        // The text did not change since the last edit: only the buttons are new.
                        Err(RequestError::Api(TgError::MessageNotModified)) => {
                            if let Some(k) = &kb {
                                retry("editMessageReplyMarkup", || {
                                    self.bot
                                        .edit_message_reply_markup(chat, id)
                                        .reply_markup(k.clone())
                                })
                                .await?;
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                    id
                }
                _ => {
                    let id = retry("sendMessage", || {
                        let req = self.bot.send_message(chat, part.as_str());
                        match &kb {
                            Some(k) => req.reply_markup(k.clone()),
                            None => req,
                        }
                    })
                    .await?
                    .id;
                    if i == 0 {
                        slot.record::<TgChat>(id).await;
                    }
                    id
                }
            };
            first_id.get_or_insert(id);
        }
        Ok(first_id)
    }

    fn id_text(id: MessageId) -> String {
        id.0.to_string()
    }

    fn parse_id(s: &str) -> Option<MessageId> {
        s.parse().ok().map(MessageId)
    }
}

fn rating_keyboard(message_id: i64) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new([[
        InlineKeyboardButton::callback("👍", format!("rate:{message_id}:1")),
        InlineKeyboardButton::callback("👎", format!("rate:{message_id}:-1")),
    ]])
}

impl TelegramBot {
    /// Hand every pending update not already handed out to its chat's worker: chats in
    /// parallel, each chat's updates in the order they came.
    async fn dispatch_pending(self: Arc<Self>) -> anyhow::Result<()> {
        let source = self.source();
        for p in self
            .core
            .db
            .pending_updates(Platform::Telegram, Some(&source))
            .await?
        {
            if !self.queue.claim(&p.update_key) {
                continue;
            }
            let chat = match serde_json::from_str::<Update>(&p.payload) {
                Ok(u) => u.chat().map_or(0, |c| c.id.0),
                Err(e) => {
                    self.core
                        .db
                        .finish_update(
                            Platform::Telegram,
                            &p.update_key,
                            Some(&format!("unreadable update: {e}")),
                        )
                        .await?;
                    continue;
                }
            };
            self.queue.push(chat, p, &self);
        }
        Ok(())
    }

    async fn on_update(&self, update: Update, key: &str) -> anyhow::Result<()> {
        match update.kind {
            UpdateKind::Message(m) => self.on_message(m, key).await,
            UpdateKind::CallbackQuery(q) => {
                let data = q.data.clone().unwrap_or_default();
                // The chat the button was pressed in (none for an inline message).
                let chat = q.message.as_ref().map(|m| m.chat().id);
                let answer = self.on_callback(&q.from, chat, &data).await;
                let text = match &answer {
                    Ok(t) => t.clone(),
                    Err(e) => {
                        tracing::warn!("telegram: callback {data:?}: {e:#}");
                        text::BUTTON_FAILED.to_string()
                    }
                };
                retry("answerCallbackQuery", || {
                    self.bot
                        .answer_callback_query(q.id.clone())
                        .text(text.clone())
                })
                .await?;
                answer.map(|_| ())
            }
            _ => Ok(()),
        }
    }

    fn allowed(&self, user_id: u64) -> bool {
        let list = &self.core.config.raw.telegram.allowed_user_ids;
        list.is_empty() || list.iter().any(|&u| u as u64 == user_id)
    }

    async fn say(&self, chat: ChatId, text: &str) -> anyhow::Result<Message> {
        Ok(retry("sendMessage", || self.bot.send_message(chat, text)).await?)
    }

    async fn on_message(&self, m: Message, key: &str) -> anyhow::Result<()> {
        let Some(from) = m.from.clone() else {
            return Ok(());
        };
        if from.is_bot {
            return Ok(());
        }
        let chat = m.chat.id;
        let private = m.chat.is_private();
        let text = m.text().map(str::to_string);
        let unmentioned = text
            .as_deref()
            .and_then(|t| mention::strip(t, self.me.username()));
        // In groups: only when mentioned or replied to.
        if !private {
            let replied_to_me = m
                .reply_to_message()
                .and_then(|r| r.from.as_ref())
                .is_some_and(|u| u.id == self.me.id);
            if !replied_to_me && unmentioned.is_none() {
                return Ok(());
            }
        }
        if !self.allowed(from.id.0) {
            self.say(chat, text::NOT_ALLOWED).await?;
            return Ok(());
        }
        let (ok, notice) = self.rate.check(from.id.0);
        if !ok {
            if notice {
                self.say(chat, text::SLOW_DOWN).await?;
            }
            return Ok(());
        }
        let Some(text) = unmentioned.or(text) else {
            self.say(chat, text::NON_TEXT).await?;
            return Ok(());
        };
        let text = text.trim().to_string();
        let db = &self.core.db;
        let user = self.user_row(&from).await?;
        let kind = if private { "private" } else { "group" };
        let chat_row = db
            .upsert_chat(
                Platform::Telegram,
                &chat.0.to_string(),
                kind,
                m.chat.title(),
            )
            .await?;
        let thread = m.thread_id.map(|t| t.0.0.to_string());
        // Commands (in groups they may carry the bot's name: /reset@name).
        if let Some(cmd) = text.strip_prefix('/') {
            let cmd = cmd.split_whitespace().next().unwrap_or("");
            let cmd = cmd.split('@').next().unwrap_or("");
            match cmd {
                "start" | "help" => {
                    self.say(chat, text::TELEGRAM_START).await?;
                    return Ok(());
                }
                "reset" => {
                    let assistant = self.assistant(chat).await?;
                    db.close_conversations(chat_row, thread.as_deref(), Some(assistant.id))
                        .await?;
                    self.say(chat, text::NEW_CONVERSATION).await?;
                    return Ok(());
                }
                "forget" => {
                    let kb = InlineKeyboardMarkup::new([[InlineKeyboardButton::callback(
                        text::FORGET_BUTTON,
                        format!("forget:{}", from.id.0),
                    )]]);
                    retry("sendMessage", || {
                        self.bot
                            .send_message(chat, text::FORGET_QUESTION)
                            .reply_markup(kb.clone())
                    })
                    .await?;
                    return Ok(());
                }
                _ => {
                    self.say(chat, text::UNKNOWN_COMMAND).await?;
                    return Ok(());
                }
            }
        }
        if text.is_empty() {
            self.say(chat, text::EMPTY_MENTION).await?;
            return Ok(());
        }
        let assistant = self.assistant(chat).await?;
        let conv = db
            .current_conversation(assistant.id, chat_row, thread.as_deref(), Some(user.id))
            .await?;
        // A replayed update whose reply Telegram did not confirm is sent its stored text
        // (the user may see it twice: the one duplicate a kill at that moment can cause).
        streaming::answer_once(
            &self.core,
            &streaming::Incoming {
                conversation_id: conv.id,
                user_id: user.id,
                text: &text,
                platform_message_id: &m.id.0.to_string(),
                update_key: key,
            },
            |_| TgChat {
                bot: &self.bot,
                chat,
            },
        )
        .await
    }

    /// The stored user for a Telegram user, created on first sight, names refreshed.
    async fn user_row(
        &self,
        from: &teloxide_core::types::User,
    ) -> anyhow::Result<loraloop_core::storage::PlatformUser> {
        Ok(self
            .core
            .db
            .upsert_platform_user(
                Platform::Telegram,
                &from.id.0.to_string(),
                from.username.as_deref(),
                Some(&from.full_name()),
            )
            .await?)
    }

    /// A button press: the toast text to show.
    async fn on_callback(
        &self,
        from: &teloxide_core::types::User,
        chat: Option<ChatId>,
        data: &str,
    ) -> anyhow::Result<String> {
        let db = &self.core.db;
        let user = self.user_row(from).await?;
        if let Some(rest) = data.strip_prefix("rate:") {
            // A modified client can send any data for a button: only a reply in the chat
            // the button is in may be rated, and only up or down.
            let parsed = rest
                .split_once(':')
                .and_then(|(m, r)| Some((m.parse::<i64>().ok()?, r.parse::<i64>().ok()?)));
            let Some((msg, rating)) = parsed.filter(|(_, r)| *r == 1 || *r == -1) else {
                return Ok(text::UNKNOWN_BUTTON.to_string());
            };
            let here = match chat {
                Some(c) => {
                    db.message_in_chat(msg, Platform::Telegram, &c.0.to_string())
                        .await?
                }
                None => false,
            };
            if !here {
                return Ok(text::UNKNOWN_BUTTON.to_string());
            }
            db.set_feedback(
                msg,
                &format!("telegram:{}", from.id.0),
                Some(user.id),
                Some(rating),
                None,
            )
            .await?;
            return Ok(if rating > 0 {
                text::RATED_UP
            } else {
                text::RATED_DOWN
            }
            .to_string());
        }
        if let Some(who) = data.strip_prefix("forget:") {
            if who != from.id.0.to_string() {
                return Ok(text::ONLY_THAT_USER.to_string());
            }
            let f = crate::forget::forget(&self.core, Platform::Telegram, user.id).await?;
            return Ok(text::forgotten(f.messages));
        }
        Ok(text::UNKNOWN_BUTTON.to_string())
    }
}

impl UpdateHandler for TelegramBot {
    async fn handle(&self, update: &PendingUpdate) -> anyhow::Result<()> {
        let key = &update.update_key;
        let update: Update = serde_json::from_str(&update.payload)
            .map_err(|e| anyhow::anyhow!("unreadable update: {e}"))?;
        self.on_update(update, key).await
    }

    fn retryable(&self, error: &anyhow::Error) -> bool {
        streaming::passing_failure(error)
            || error.chain().any(|c| {
                c.downcast_ref::<RequestError>()
                    .is_some_and(|e| matches!(e, RequestError::RetryAfter(_)) || transient(e))
            })
    }
}
