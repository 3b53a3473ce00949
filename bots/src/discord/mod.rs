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
//! stored but not answered when the process died is answered on the next READY, and the
//! messages sent while the bot was down are read from each channel's history (see
//! `catch_up`). Each channel's messages are handled in order, channels in parallel.
//!
//! Replies stream: the first words are sent as soon as they exist and the message is edited
//! as tokens arrive (at most one edit per [`crate::streaming::EDIT_INTERVAL`] per reply, within Discord's 5
//! edits per 5 s per channel); the final text arrives complete, split at Discord's
//! 2,000-character limit, and the bot adds 👍 and 👎 to it: a user's 👍/👎 reaction on
//! the reply's first message is a rating, removing the reaction removes the rating.

mod bot;
mod calls;
mod catch_up;
mod commands;
mod gateway;
mod inbound;
mod ratings;
mod reply;
mod unread;

pub use bot::DiscordBot;
pub use calls::retry;
pub use commands::commands;
pub use gateway::intents;
pub use reply::MAX_MESSAGE_CHARS;

use self::gateway::Handler;
use crate::queue::UpdateQueue;
use crate::rate_limit::RateLimiter;
use loraloop_core::Services;
use loraloop_core::storage::Platform;
use secrecy::{ExposeSecret, SecretString};
use serenity::all::{CreateAllowedMentions, HttpBuilder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// On stop, replies being generated get this long to finish; then they are cut off (and
/// answered after the next start).
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
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
        application: OnceLock::new(),
        http: OnceLock::new(),
        threads: Mutex::new(HashMap::new()),
        rate,
        wake: tokio::sync::Notify::new(),
        refused: Mutex::new(HashMap::new()),
        unread: Mutex::new(Default::default()),
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
