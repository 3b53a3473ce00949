//! What the chat bots (Telegram, Discord) share: answering a message through the chat
//! service, streaming the reply into a platform message, splitting long replies at a
//! platform's length limit, and recording how a stored update ended.

use crate::text;
use loraloop_core::service::Turn;
use loraloop_core::storage::{Db, Platform, StoredMessage};
use loraloop_core::{ServiceError, Services};
use loraloop_model::engine::{Event, Finished};
use std::future::Future;
use std::time::{Duration, Instant};

/// Edits of a streamed reply, at most one per this interval (per reply; Telegram allows
/// about one a second per chat, Discord five per 5 s per channel).
pub const EDIT_INTERVAL: Duration = Duration::from_secs(1);

/// What the user is told when a reply cannot start.
pub fn start_failure_notice(e: &ServiceError) -> &'static str {
    match e {
        // The prompt is too long for the model (the conversation grew, or one long message).
        ServiceError::Prompt(_) => text::CONVERSATION_TOO_LONG,
        // The reply is tried again later (see `finish_update`).
        ServiceError::Busy(_) => text::BUSY,
        _ => text::CANNOT_ANSWER,
    }
}

/// A chat where a reply is streamed: a platform's messages in one chat or channel.
pub trait ReplyChannel: Sync {
    type Id: Copy + Send + Sync;
    const PLATFORM: Platform;
    /// The platform's limit on a message's characters.
    const MAX_CHARS: usize;
    /// "typing…" lapses after this long and is shown again while nothing is visible yet.
    const TYPING_INTERVAL: Duration;
    /// A new message; its id.
    fn send(&self, text: &str) -> impl Future<Output = anyhow::Result<Self::Id>> + Send;
    /// Replace a message's text; a failure only loses one intermediate version.
    fn edit(&self, id: Self::Id, text: &str) -> impl Future<Output = ()> + Send;
    /// Show "typing…".
    fn typing(&self) -> impl Future<Output = ()> + Send;
    /// Send a stored reply's final text, split at the platform's limit with its rating
    /// controls (the first part edits `reply.sent`, the message it streamed into, when
    /// there is one); the platform's id of the first part.
    fn deliver(
        &self,
        reply: &ToDeliver<Self::Id>,
        slot: &ReplySlot<'_>,
    ) -> impl Future<Output = anyhow::Result<Option<Self::Id>>> + Send;
    /// A message id as stored, and back.
    fn id_text(id: Self::Id) -> String;
    fn parse_id(s: &str) -> Option<Self::Id>;
}

/// How long a reply that keeps failing for a passing reason is tried again, from when
/// its update arrived: an outage shorter than this loses no reply.
pub const RETRY_FOR: Duration = Duration::from_secs(24 * 3600);

/// The wait before try number `attempts + 1` of a reply: 5 s doubling to 5 minutes.
pub fn retry_wait(attempts: i64) -> Duration {
    loraloop_core::supervisor::doubling(
        Duration::from_secs(5),
        attempts.clamp(0, 16) as u32,
        Duration::from_secs(300),
    )
}

/// Record how handling a stored update ended: done; failed with the error (logged and
/// kept on the row); or, when `retryable` says the failure was passing (the platform or
/// the network down, a busy database), still pending and tried again after a wait, for
/// up to [`RETRY_FOR`].
pub async fn finish_update(
    db: &Db,
    platform: Platform,
    key: &str,
    outcome: &anyhow::Result<()>,
    retryable: bool,
) {
    let name = platform.as_str();
    let error = match outcome {
        Ok(()) => None,
        Err(e) => Some(format!("{e:#}")),
    };
    if let Some(error) = &error
        && retryable
    {
        match db.update_age(platform, key).await {
            Ok(Some((age, attempts))) if age < RETRY_FOR.as_secs_f64() => {
                let wait = retry_wait(attempts);
                tracing::warn!(
                    "{name}: update {key} failed ({error}); trying again in {}s",
                    wait.as_secs()
                );
                match db
                    .postpone_update(platform, key, error, wait.as_secs_f64())
                    .await
                {
                    Ok(_) => return,
                    Err(e) => tracing::error!("{name}: cannot postpone update {key}: {e}"),
                }
            }
            Ok(_) => tracing::warn!(
                "{name}: update {key} kept failing for {}h; given up",
                RETRY_FOR.as_secs() / 3600
            ),
            Err(e) => tracing::error!("{name}: cannot read update {key}: {e}"),
        }
    }
    if let Some(error) = &error {
        tracing::warn!("{name}: update {key} failed: {error}");
    }
    if let Err(e) = db.finish_update(platform, key, error.as_deref()).await {
        tracing::error!("{name}: cannot record update {key}: {e}");
    }
}

/// A failure on our side worth another try: the database (busy, locked, I/O) or the
/// engine's line full.
pub fn passing_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<loraloop_core::storage::StorageError>(),
            Some(loraloop_core::storage::StorageError::Sqlx(_))
        ) || matches!(
            c.downcast_ref::<ServiceError>(),
            Some(ServiceError::Busy(_))
        )
    })
}

/// Where a reply to a stored update is streamed: the platform message is recorded as
/// soon as it exists, so a replay after a crash finishes that message (edits it) instead
/// of sending a second one.
pub struct ReplySlot<'a> {
    pub db: &'a Db,
    pub platform: Platform,
    pub update_key: &'a str,
}

impl ReplySlot<'_> {
    /// The message an earlier attempt started, if any.
    pub async fn started<C: ReplyChannel>(&self) -> Option<C::Id> {
        match self.db.update_reply(self.platform, self.update_key).await {
            Ok(id) => id.and_then(|s| C::parse_id(&s)),
            Err(e) => {
                tracing::warn!("cannot read the reply of update {}: {e}", self.update_key);
                None
            }
        }
    }

    /// Record the message the reply is in (once it exists).
    pub async fn record<C: ReplyChannel>(&self, id: C::Id) {
        if let Err(e) = self
            .db
            .record_update_reply(self.platform, self.update_key, &C::id_text(id))
            .await
        {
            tracing::warn!("cannot record the reply of update {}: {e}", self.update_key);
        }
    }
}

/// A user's platform message in its stored conversation.
pub struct Incoming<'a> {
    pub conversation_id: i64,
    pub user_id: i64,
    pub text: &'a str,
    pub platform_message_id: &'a str,
    /// The key of the update it came in (the reply's slot, see [`ReplySlot`]).
    pub update_key: &'a str,
}

/// A reply to deliver: its final text, the stored reply's id and the platform message it
/// was streamed into, if any (delivering edits that one).
pub struct ToDeliver<Id> {
    pub sent: Option<Id>,
    pub text: String,
    pub stored_id: i64,
}

/// Answer a platform message once. A replayed message (the process died before marking
/// its update done) whose reply was stored is not generated again: nothing is sent when
/// the platform took that reply, else the stored text. Otherwise: "typing…", then
/// [`answer`]. The final text is delivered and the platform id of its first part stored.
/// `channel` makes the chat to stream into, given the message an earlier attempt started
/// (Discord derives the first message's nonce from it).
pub async fn answer_once<C: ReplyChannel>(
    core: &Services,
    incoming: &Incoming<'_>,
    channel: impl FnOnce(Option<C::Id>) -> C,
) -> anyhow::Result<()> {
    let slot = &ReplySlot {
        db: &core.db,
        platform: C::PLATFORM,
        update_key: incoming.update_key,
    };
    let earlier = slot
        .db
        .stored_reply_to(incoming.conversation_id, incoming.platform_message_id)
        .await?;
    let started = slot.started::<C>().await;
    let ch = channel(started);
    let reply = match earlier {
        Some(earlier) if earlier.platform_message_id.is_some() => return Ok(()),
        Some(earlier) => ToDeliver {
            sent: started,
            text: earlier.content,
            stored_id: earlier.id,
        },
        None => {
            ch.typing().await;
            let (sent, finished, stored) = answer(core, incoming, &ch, slot, started).await?;
            ToDeliver {
                sent,
                text: finished.text,
                stored_id: stored.id,
            }
        }
    };
    if let Some(first) = ch.deliver(&reply, slot).await? {
        slot.db
            .set_platform_message_id(reply.stored_id, &C::id_text(first))
            .await?;
    }
    Ok(())
}

/// Answer a platform message: store it in its conversation, generate the reply with the
/// conversation's adapter (its pin, the canary's or the active one) and stream it into
/// `ch` (a reply that cannot start is told to the user), then store the reply. Returns
/// the streamed message, if any, the finished generation and the stored reply; the
/// caller sends the final text. `started` is the message an earlier attempt started
/// (`slot.started()`, which the caller has read): the reply goes into it.
async fn answer<C: ReplyChannel>(
    core: &Services,
    incoming: &Incoming<'_>,
    ch: &C,
    slot: &ReplySlot<'_>,
    started: Option<C::Id>,
) -> anyhow::Result<(Option<C::Id>, Finished, StoredMessage)> {
    let &Incoming {
        conversation_id,
        user_id,
        text,
        platform_message_id,
        ..
    } = incoming;
    let mut turn = match core
        .chat
        .start_routed_turn(
            conversation_id,
            Some(user_id),
            text,
            Some(platform_message_id),
        )
        .await
    {
        Ok(t) => t,
        Err(e) => {
            match started {
                Some(id) => ch.edit(id, start_failure_notice(&e)).await,
                None => {
                    slot.record::<C>(ch.send(start_failure_notice(&e)).await?)
                        .await
                }
            }
            return Err(anyhow::Error::new(e).context("cannot start the reply"));
        }
    };
    let (sent, finished) = stream_reply(&mut turn, ch, started, slot).await?;
    turn.in_flight
        .finished(finished.completion_tokens, finished.decode_secs);
    drop(turn.in_flight);
    let stored = core.chat.store_reply(conversation_id, &finished).await?;
    Ok((sent, finished, stored))
}

/// How long a reply may wait for the engine before the user is told their place in line
/// (shorter waits only show "typing…").
pub const QUEUE_NOTICE_AFTER: Duration = Duration::from_secs(2);

/// Stream `turn`'s reply into `ch`: "typing…" until there is text (and, when the engine is
/// busy for longer than [`QUEUE_NOTICE_AFTER`], a message with the place in line, which
/// the reply then replaces), the first words as soon as they exist, then an edit at most
/// every [`EDIT_INTERVAL`] while the text fits in one message (`C::MAX_CHARS`). Returns the
/// streamed message (None when nothing was shown) and the finished generation; the
/// caller sends the final text. A failed generation is told to the user and returned as
/// an error.
async fn stream_reply<C: ReplyChannel>(
    turn: &mut Turn,
    ch: &C,
    started: Option<C::Id>,
    slot: &ReplySlot<'_>,
) -> anyhow::Result<(Option<C::Id>, Finished)> {
    let mut reply = String::new();
    // A message an earlier attempt started (then crashed) is overwritten, not repeated.
    let mut sent: Option<C::Id> = started;
    // `sent` shows the place in line (or an earlier attempt's text), not this reply's.
    let mut placeholder = started.is_some();
    let mut waiting: Option<(usize, Instant)> = None;
    let mut told_place: Option<usize> = None;
    let mut last_edit = Instant::now();
    let mut last_typing = Instant::now();
    loop {
        // None: nothing for a while (keep "typing…" up).
        let event = tokio::time::timeout(C::TYPING_INTERVAL, turn.generation.next())
            .await
            .ok();
        if let Some((place, since)) = waiting
            && (sent.is_none() || placeholder)
            && since.elapsed() >= QUEUE_NOTICE_AFTER
            && told_place != Some(place)
        {
            let notice = text::in_line(place);
            match sent {
                None => {
                    let id = ch.send(&notice).await?;
                    slot.record::<C>(id).await;
                    sent = Some(id);
                }
                Some(id) => ch.edit(id, &notice).await,
            }
            placeholder = true;
            told_place = Some(place);
        }
        let Some(event) = event else {
            if sent.is_none() || placeholder {
                ch.typing().await;
                last_typing = Instant::now();
            }
            continue;
        };
        match event {
            Some(Event::Queued { position }) => {
                waiting = Some((position, waiting.map_or_else(Instant::now, |(_, t)| t)));
                if last_typing.elapsed() >= C::TYPING_INTERVAL {
                    ch.typing().await;
                    last_typing = Instant::now();
                }
            }
            Some(Event::Started { .. }) => waiting = None,
            Some(Event::Text(t)) => {
                reply.push_str(&t);
                let shown = reply.trim();
                if shown.is_empty() || shown.chars().count() > C::MAX_CHARS {
                    if (sent.is_none() || placeholder)
                        && last_typing.elapsed() >= C::TYPING_INTERVAL
                    {
                        ch.typing().await;
                        last_typing = Instant::now();
                    }
                    continue;
                }
                match sent {
                    None => {
                        let id = ch.send(shown).await?;
                        slot.record::<C>(id).await;
                        sent = Some(id);
                        last_edit = Instant::now();
                    }
                    Some(id) if placeholder || last_edit.elapsed() >= EDIT_INTERVAL => {
                        ch.edit(id, shown).await;
                        placeholder = false;
                        last_edit = Instant::now();
                    }
                    Some(_) => {}
                }
            }
            Some(Event::Finished(f)) => return Ok((sent, f)),
            Some(Event::Failed(e)) => {
                turn.in_flight.failed();
                match sent {
                    Some(id) if placeholder => ch.edit(id, text::MODEL_FAILED).await,
                    _ => {
                        let id = ch.send(text::MODEL_FAILED).await?;
                        if sent.is_none() {
                            slot.record::<C>(id).await;
                        }
                    }
                }
                anyhow::bail!("generation failed: {e}");
            }
            None => anyhow::bail!("the engine stopped"),
        }
    }
}

/// The text a reply is shown as: trimmed, and never empty (Telegram and Discord refuse
/// empty messages).
pub fn shown_text(text: &str) -> String {
    if text.trim().is_empty() {
        "…".to_string()
    } else {
        text.trim().to_string()
    }
}

/// `text` in pieces of at most `max` characters, split at a line or word break when one
/// is near the end.
pub fn split_message(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.chars().count() > max {
        let cut = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let head = &rest[..cut];
        let at = head
            .rfind('\n')
            .or_else(|| head.rfind(' '))
            .filter(|&i| i > cut / 2)
            .map_or(cut, |i| i + 1);
        out.push(rest[..at].to_string());
        rest = &rest[at..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_replies_are_split_at_breaks_within_the_limit() {
        let text = format!("{}\n{}", "a".repeat(3000), "b ".repeat(1500));
        let parts = split_message(&text, 4096);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.chars().count() <= 4096));
        assert_eq!(parts.concat(), text);
        assert_eq!(parts[0], format!("{}\n", "a".repeat(3000)));
        // No break anywhere: a hard cut, on a character boundary.
        let emoji = "😀".repeat(5000);
        let parts = split_message(&emoji, 4096);
        assert_eq!(
            parts.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            vec![4096, 904]
        );
        assert_eq!(split_message("", 10), vec![String::new()]);
    }
}
