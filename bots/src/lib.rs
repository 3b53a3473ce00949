//! loraloop's chat bots. Each bot turns its platform's updates into turns of the core chat
//! service and streams the replies back; what they share (reply streaming, the rate limit,
//! the texts users see) lives beside them. A bot holds no business logic of its own: the
//! conversation, the prompt and the adapter are the chat service's.

pub mod backoff;
pub mod discord;
pub mod forget;
pub mod mention;
pub mod queue;
pub mod rate_limit;
pub mod streaming;
pub mod telegram;
pub mod text;

/// A mutex's guard, also after a panic elsewhere poisoned it (the state it guards stays
/// consistent: every holder only inserts or removes whole entries).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
