//! The Discord bot: serenity's gateway client (no cache, no framework) in front of the same
//! chat service and storage as the Telegram bot.
//!
//! Where it answers: every direct message; in a server, a message that mentions the bot or
//! replies to one of its messages. A mention in a server channel starts a thread on the
//! message (when the bot may create threads there; otherwise it answers in the channel),
//! and every later message in a thread the bot started is answered: one conversation per
//! thread.
//!
//! Every message the bot is going to answer is stored in `inbound_updates` (keyed by its
//! Discord id) before it is handled, and the handlers work from the stored rows: a message
//! that Discord delivers twice (a RESUME replay, a redelivery) is answered once, and one
//! stored but not answered when the process died is answered on the next READY. Each
//! channel's messages are handled in order, channels in parallel.
//!
//! Replies stream: the first words are sent as soon as they exist and the message is edited
//! as tokens arrive (at most one edit per [`streaming::EDIT_INTERVAL`] per reply, within Discord's 5
//! edits per 5 s per channel); the final text arrives complete, split at Discord's
//! 2,000-character limit, and the bot adds 👍 and 👎 to it: a user's 👍/👎 reaction on
//! the reply's first message is a rating, removing the reaction removes the rating.

use crate::queue::{UpdateHandler, UpdateQueue};
use crate::rate_limit::RateLimiter;
use crate::streaming::{self, split_message};
use crate::text;
use loraloop_core::Services;
use loraloop_core::storage::{PendingUpdate, Platform};
use secrecy::{ExposeSecret, SecretString};
use serenity::all::{
    ButtonStyle, ChannelId, Command, CommandInteraction, ComponentInteraction, Context,
    CreateActionRow, CreateAllowedMentions, CreateButton, CreateCommand, CreateInteractionResponse,
    CreateInteractionResponseMessage, CreateMessage, CreateThread, EditInteractionResponse,
    EditMessage, EventHandler, GatewayIntents, GuildId, Http, HttpBuilder, Interaction, Message,
    MessageId, MessageType, Nonce, Reaction, ReactionType, Ready, ResumedEvent, RoleId, UserId,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Discord's limit on a message's content.
pub const MAX_MESSAGE_CHARS: usize = 2000;
const THUMBS_UP: &str = "👍";
const THUMBS_DOWN: &str = "👎";

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

/// How long a burst of messages is given to be stored before the dispatcher reads the
/// pending ones: serenity handles each gateway event in its own task, so messages sent
/// together can be stored out of order.
const SETTLE: Duration = Duration::from_millis(150);
/// On stop, replies being generated get this long to finish; then they are cut off (and
/// answered after the next start).
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// A refusal (channel not allowed, DMs off) goes to a channel at most once per this long.
const REFUSAL_INTERVAL: Duration = Duration::from_secs(3600);
/// Discord's error code for a second thread on one message.
const THREAD_ALREADY_CREATED: isize = 160004;

/// Run the bot until `stop` is notified.
pub async fn run(
    core: Services,
    token: SecretString,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let result = run_bot(core, token, stop).await;
    if let Err(e) = &result {
        // Logged now: the caller only sees the result when the server stops.
        tracing::error!("discord: the bot stopped: {e:#}");
    }
    result
}

async fn run_bot(
    core: Services,
    token: SecretString,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let cfg = &core.config.raw.discord;
    let mut http = HttpBuilder::new(token.expose_secret())
        .default_allowed_mentions(CreateAllowedMentions::new().replied_user(false));
    if let Some(url) = &cfg.api_url {
        // serenity sends to a proxy only with its own rate limiter off; the proxy limits.
        http = http
            .proxy(url.trim_end_matches('/'))
            .ratelimiter_disabled(true);
    }
    let http = http.build();
    // The bot's own user before any event: a message right after READY is not dropped for
    // want of knowing who "me" is.
    let me = tokio::select! {
        u = retry("get the bot's user", || http.get_current_user()) => {
            u.map_err(|e| anyhow::anyhow!("discord: cannot get the bot's user: {e}{}", hint(&e)))?
        }
        _ = stop.notified() => return Ok(()),
    };
    let rate = RateLimiter::new(cfg.rate_limit_per_minute);
    let queue = Arc::new(UpdateQueue::new(Platform::Discord, core.db.clone()));
    let bot = Arc::new(DiscordBot {
        core,
        queue,
        me: me.id,
        http: OnceLock::new(),
        threads: Mutex::new(HashMap::new()),
        rate,
        wake: tokio::sync::Notify::new(),
        refused: Mutex::new(HashMap::new()),
    });
    let builder = serenity::all::ClientBuilder::new_with_http(http, intents())
        .event_handler(Handler(bot.clone()));
    let mut client = tokio::select! {
        c = builder => c.map_err(|e| anyhow::anyhow!("discord: {e}"))?,
        _ = stop.notified() => return Ok(()),
    };
    let _ = bot.http.set(client.http.clone());
    let shards = client.shard_manager.clone();
    let dispatcher = tokio::spawn(bot.clone().dispatcher());
    let mut gateway = tokio::spawn(async move { client.start().await });
    let result = tokio::select! {
        r = &mut gateway => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("discord gateway: {e}{}", hint(&e))),
            Err(e) => Err(anyhow::anyhow!("discord gateway task: {e}")),
        },
        _ = stop.notified() => Ok(()),
    };
    // No new work; replies in progress finish (within the deadline) while the gateway
    // connection closes (close frame 1000).
    dispatcher.abort();
    let _ = dispatcher.await;
    let gateway_closed = async {
        if !gateway.is_finished() {
            shards.shutdown_all().await;
            if tokio::time::timeout(Duration::from_secs(10), &mut gateway)
                .await
                .is_err()
            {
                tracing::warn!("discord: the gateway did not stop in 10 s");
                gateway.abort();
            }
        }
    };
    tokio::join!(gateway_closed, bot.queue.stop(STOP_DEADLINE));
    tracing::info!("discord: stopped");
    result
}

/// What to do about an error that stops the bot, for the log.
fn hint(e: &serenity::Error) -> &'static str {
    use serenity::gateway::GatewayError;
    use serenity::http::HttpError;
    match e {
        serenity::Error::Gateway(GatewayError::DisallowedGatewayIntents) => {
            " (close code 4014: enable the MESSAGE CONTENT intent for the bot in the Discord \
             developer portal, Bot > Privileged Gateway Intents)"
        }
        serenity::Error::Gateway(GatewayError::InvalidGatewayIntents) => {
            " (close code 4013: the intents asked for are invalid)"
        }
        serenity::Error::Gateway(GatewayError::InvalidAuthentication) => {
            " (close code 4004: Discord refused the token; check DISCORD_BOT_TOKEN, or reset the \
             token under Bot in the developer portal)"
        }
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) if r.status_code == 401 => {
            " (Discord refused the token; check DISCORD_BOT_TOKEN, or reset the token under Bot \
             in the developer portal)"
        }
        _ => "",
    }
}

/// Retry a Discord call on transient errors (429, 5xx, network) with backoff; a permanent
/// error (missing permission, unknown channel, bad request) returns at once. (With a proxy
/// serenity's own rate limiter is off, so a 429 reaches this; serenity does not hand over
/// the answer's `retry_after` or `Retry-After`, so a 429 waits at least a second.)
pub async fn retry<T, F, Fut>(what: &str, mut call: F) -> serenity::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = serenity::Result<T>>,
{
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 8 && transient(&e) => {
                let wait = if status(&e) == Some(429) {
                    delay.max(Duration::from_secs(1))
                } else {
                    delay
                };
                tracing::debug!("discord {what}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            Err(e) => return Err(e),
        }
    }
}

fn status(e: &serenity::Error) -> Option<u16> {
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            Some(r.status_code.as_u16())
        }
        _ => None,
    }
}

/// Discord's JSON error code of a refused request.
fn error_code(e: &serenity::Error) -> Option<isize> {
    match e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => {
            Some(r.error.code)
        }
        _ => None,
    }
}

fn transient(e: &serenity::Error) -> bool {
    use serenity::http::HttpError;
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
            r.status_code.as_u16() == 429 || r.status_code.is_server_error()
        }
        serenity::Error::Http(HttpError::Request(_)) | serenity::Error::Io(_) => true,
        _ => false,
    }
}

/// A nonce for one message to send (Discord allows 25 characters): with `enforce_nonce`
/// a retried send that Discord had already taken returns that message instead of a copy.
fn new_nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    format!(
        "ll{now:x}{:x}",
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// Where a message or a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
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
    core: Services,
    /// The bot's user, fetched before the gateway starts.
    me: UserId,
    /// serenity's client, set once it is built (before the gateway starts and any event).
    http: OnceLock<Arc<Http>>,
    /// The stored messages, by conversation target (a DM channel, a thread, or for a
    /// mention that starts a thread the message id, which becomes the thread's id): a
    /// conversation's messages run in order, different ones in parallel.
    queue: Arc<UpdateQueue<u64>>,
    /// The bot's threads: thread id -> (parent chat row, parent channel id).
    threads: Mutex<HashMap<u64, (i64, u64)>>,
    rate: RateLimiter,
    /// Rung when a message is stored (and on READY): the dispatcher looks for pending ones.
    wake: tokio::sync::Notify,
    /// When each channel last got a refusal.
    refused: Mutex<HashMap<u64, Instant>>,
}

/// A Discord channel (or thread) as the place a reply streams to.
struct DiscordChannel<'a> {
    bot: &'a DiscordBot,
    channel: ChannelId,
}

impl streaming::ReplyChannel for DiscordChannel<'_> {
    type Id = MessageId;
    /// Discord shows "typing" for about 10 s after each trigger.
    const TYPING_INTERVAL: Duration = Duration::from_secs(8);

    async fn send(&self, text: &str) -> anyhow::Result<MessageId> {
        Ok(self.bot.say(self.channel, text).await?.id)
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
}

struct Handler(Arc<DiscordBot>);

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        tracing::info!(
            "discord: connected as {} ({} server(s))",
            ready.user.name,
            ready.guilds.len()
        );
        // Messages stored by an earlier run and not answered.
        self.0.wake.notify_one();
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
        if let Err(e) = self.0.receive(m).await {
            tracing::error!("discord: cannot store a message: {e:#}");
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

fn ephemeral(text: impl Into<String>) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(text)
            .ephemeral(true),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message's content without mentions of `me`.
fn without_mention(content: &str, me: UserId) -> String {
    content
        .replace(&format!("<@{me}>"), "")
        .replace(&format!("<@!{me}>"), "")
        .trim()
        .to_string()
}

/// A thread name from the first words of a message (Discord allows 100 characters).
fn thread_name(text: &str, author: &str) -> String {
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
    /// The bot's thread this channel is, if it is one (memory, then the database).
    async fn bot_thread(&self, channel: ChannelId) -> anyhow::Result<Option<(i64, u64)>> {
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

    async fn place(&self, guild: Option<GuildId>, channel: ChannelId) -> anyhow::Result<Place> {
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
    fn allowed(&self, place: Place, channel: ChannelId) -> bool {
        let cfg = &self.core.config.raw.discord;
        let (guild, channel) = match place {
            Place::Dm => return cfg.direct_messages,
            Place::Channel { guild } => (guild.get(), channel.get()),
            Place::Thread { guild, parent, .. } => (guild.get(), parent),
        };
        (cfg.allowed_guild_ids.is_empty() || cfg.allowed_guild_ids.contains(&guild))
            && (cfg.allowed_channel_ids.is_empty() || cfg.allowed_channel_ids.contains(&channel))
    }

    fn replied_to_me(&self, m: &Message) -> bool {
        m.referenced_message
            .as_ref()
            .is_some_and(|r| r.author.id == self.me)
    }

    /// A message from the gateway: store it if the bot is to answer it, then wake the
    /// dispatcher. Outside the allowlists nothing is stored and the channel gets a refusal
    /// (at most one an hour).
    async fn receive(&self, m: Message) -> anyhow::Result<()> {
        let me = self.me;
        if m.author.bot || m.author.id == me {
            return Ok(());
        }
        // System messages (a member added to a thread, a pin, ...) are nobody talking.
        if !matches!(m.kind, MessageType::Regular | MessageType::InlineReply) {
            return Ok(());
        }
        let thread = self.bot_thread(m.channel_id).await?;
        let addressed = m.guild_id.is_none()
            || m.mentions.iter().any(|u| u.id == me)
            || self.replied_to_me(&m)
            || thread.is_some();
        if !addressed {
            return Ok(());
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
            return Ok(());
        }
        let payload = serde_json::to_string(&m)?;
        let key = m.id.get().to_string();
        // A failed store loses the message (Discord does not send it again): retry a few
        // times (a busy or briefly unavailable database) before giving up.
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
        if stored {
            self.wake.notify_one();
        } else {
            tracing::debug!("discord: message {} was delivered again", m.id);
        }
        Ok(())
    }

    /// Tell a channel the bot does not answer there, at most once per
    /// [`REFUSAL_INTERVAL`].
    async fn refuse(&self, channel: ChannelId, place: Place) {
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
    async fn target(&self, m: &Message) -> u64 {
        if m.guild_id.is_none()
            || self.replied_to_me(m)
            || !matches!(self.bot_thread(m.channel_id).await, Ok(None))
        {
            return m.channel_id.get();
        }
        m.id.get()
    }

    /// Hand every pending message to its conversation's worker, in message order.
    async fn dispatcher(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(SETTLE).await;
            let pending = match self.core.db.pending_updates(Platform::Discord).await {
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

    fn http(&self) -> &Http {
        self.http
            .get()
            .expect("`run` sets the HTTP client before it starts the gateway")
    }

    /// Send a message; a retry after an error that Discord may have acted on (a 5xx, a
    /// lost answer) carries the same nonce, so Discord returns the first copy.
    async fn say(&self, channel: ChannelId, text: &str) -> anyhow::Result<Message> {
        let nonce = new_nonce();
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

    async fn on_message(&self, m: Message) -> anyhow::Result<()> {
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
            Place::Dm => (
                db.upsert_chat(
                    Platform::Discord,
                    &channel.get().to_string(),
                    "private",
                    None,
                )
                .await?,
                None,
            ),
            Place::Channel { .. } => (
                db.upsert_chat(
                    Platform::Discord,
                    &channel.get().to_string(),
                    "channel",
                    None,
                )
                .await?,
                None,
            ),
            Place::Thread { chat, .. } => (chat, Some(channel.get().to_string())),
        };
        let conv = db
            .current_conversation(
                self.core.assistant.id,
                chat,
                thread.as_deref(),
                Some(user.id),
            )
            .await?;
        let message_id = m.id.get().to_string();
        // A replayed message (the process died before marking it done): a stored reply is
        // not generated again; if Discord took it, nothing is left to do, otherwise the
        // stored text is sent.
        if let Some(earlier) = db.stored_reply_to(conv.id, &message_id).await? {
            if earlier.platform_message_id.is_none() {
                self.deliver(channel, None, &earlier.content, earlier.id)
                    .await?;
            }
            return Ok(());
        }
        let _ = channel.broadcast_typing(self.http()).await;
        let ch = DiscordChannel { bot: self, channel };
        let (sent, finished, stored) = streaming::answer(
            &self.core,
            conv.id,
            user.id,
            &text,
            &message_id,
            &ch,
            MAX_MESSAGE_CHARS,
        )
        .await?;
        self.deliver(channel, sent, &finished.text, stored.id).await
    }

    /// Send a stored reply's final text (editing the streamed message `sent` when there is
    /// one), split at the length limit; add the rating reactions to its first part and
    /// record that part's Discord id.
    async fn deliver(
        &self,
        channel: ChannelId,
        sent: Option<MessageId>,
        text: &str,
        stored_id: i64,
    ) -> anyhow::Result<()> {
        let full = streaming::shown_text(text);
        let mut first = None;
        for (i, part) in split_message(&full, MAX_MESSAGE_CHARS).iter().enumerate() {
            let id = match (i, sent) {
                (0, Some(id)) => {
                    retry("edit message", || {
                        channel.edit_message(self.http(), id, EditMessage::new().content(part))
                    })
                    .await?;
                    id
                }
                _ => self.say(channel, part).await?.id,
            };
            first.get_or_insert(id);
        }
        let Some(first) = first else {
            return Ok(());
        };
        self.core
            .db
            .set_platform_message_id(stored_id, &first.get().to_string())
            .await?;
        for emoji in [THUMBS_UP, THUMBS_DOWN] {
            if let Err(e) = retry("add reaction", || {
                channel.create_reaction(
                    self.http(),
                    first,
                    ReactionType::Unicode(emoji.to_string()),
                )
            })
            .await
            {
                // A missing permission must not fail the reply: people can still react.
                tracing::info!("discord: cannot add {emoji} to a reply: {e}");
            }
        }
        Ok(())
    }

    /// A 👍/👎 added to or removed from one of the bot's replies.
    async fn on_reaction(&self, r: Reaction, added: bool) -> anyhow::Result<()> {
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
    async fn user_row(
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

    async fn on_command(&self, http: &Http, c: &CommandInteraction) -> anyhow::Result<()> {
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
                        db.close_conversations(chat, thread.as_deref()).await?;
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
    async fn status(&self, http: &Http, c: &CommandInteraction) -> anyhow::Result<String> {
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

    async fn on_component(&self, http: &Http, c: &ComponentInteraction) -> anyhow::Result<()> {
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
                    anyhow::Ok(self.core.db.forget_user(user).await?)
                }
                .await;
                let text = match deleted {
                    Ok(n) => text::forgotten(n),
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

impl UpdateHandler for DiscordBot {
    async fn handle(&self, update: &PendingUpdate) -> anyhow::Result<()> {
        let m: Message = serde_json::from_str(&update.payload)
            .map_err(|e| anyhow::anyhow!("unreadable message: {e}"))?;
        self.on_message(m).await
    }
}
