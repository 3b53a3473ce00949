//! Every sentence the bots show their users, in one place.

// Both bots.
pub const CONVERSATION_TOO_LONG: &str =
    "That conversation got too long for me; /reset starts a new one.";
pub const CANNOT_ANSWER: &str = "Sorry, I could not answer that.";
/// The engine's line is full; the bot answers this message later by itself.
pub const BUSY: &str = "⏳ So many people are chatting right now that I can't take this yet; I'll answer it in a minute.";
pub const MODEL_FAILED: &str = "Sorry, I could not answer that (the model failed).";
/// Shown while a reply waits for the model (the engine is busy with others).
pub fn in_line(place: usize) -> String {
    if place == 1 {
        "⏳ Lots of people are chatting right now; you're next in line.".to_string()
    } else {
        format!("⏳ Lots of people are chatting right now; you're number {place} in line.")
    }
}
pub const NON_TEXT: &str = "Sorry, I only understand text messages.";
pub const SLOW_DOWN: &str =
    "You're sending messages faster than I can answer; please wait a minute.";
/// A mention with nothing else in it.
pub const EMPTY_MENTION: &str = "Yes?";
pub const NEW_CONVERSATION: &str = "Started a new conversation.";
pub const FORGET_QUESTION: &str = "This deletes your messages and ratings and keeps you out of every future training dataset. Sure?";
pub const FORGET_BUTTON: &str = "Yes, delete everything about me";
pub const ONLY_THAT_USER: &str = "Only that user can confirm this.";
pub const UNKNOWN_BUTTON: &str = "Unknown button.";

pub fn forgotten(messages: u64) -> String {
    format!("Done: {messages} message(s) deleted, and you are excluded from training.")
}

// Telegram.
pub const TELEGRAM_START: &str = "Hello! I'm an assistant that runs on a small language model and learns from conversations.\n\nWrite to me and I'll answer. Rate my replies with 👍 / 👎: your ratings (and the conversations) may be used to improve the assistant.\n\n/reset starts a new conversation, /forget deletes everything stored about you, /help shows this again.";
pub const NOT_ALLOWED: &str =
    "Sorry, this assistant is private and you are not on its list of users.";
pub const UNKNOWN_COMMAND: &str = "I don't know that command. /help lists what I understand.";
pub const BUTTON_FAILED: &str = "Sorry, that did not work.";
pub const RATED_UP: &str = "Thanks! 👍 recorded.";
pub const RATED_DOWN: &str = "Thanks! 👎 recorded.";

// Discord.
pub const DISCORD_HELP: &str = "I'm an assistant that runs on a small language model and learns from conversations.\n\nWrite to me in a direct message, or mention me in a server: I answer in a thread, and everything in that thread is one conversation. Rate my replies with 👍 / 👎 reactions: your ratings (and the conversations) may be used to improve the assistant.\n\n/reset starts a new conversation here, /forget deletes everything stored about you, /help shows this again.";
pub const NOT_HERE: &str = "Sorry, this assistant does not answer in this channel.";
pub const NO_DMS: &str = "Sorry, this assistant does not answer direct messages.";
pub const STATUS_FAILED: &str = "Sorry, /status failed (see the server's log).";
pub const STATUS_NO_ROLE: &str = "Not allowed: no admin role is configured (`discord.admin_role`).";
pub const STATUS_NOT_IN_SERVER: &str = "Not allowed: /status works in a server, for its admins.";
pub const FORGET_FAILED: &str = "Sorry, deleting failed; please try again later.";

pub fn status_not_admin(role: &str) -> String {
    format!("Not allowed: /status is for members with the {role} role.")
}

/// The title of the thread a mention starts.
pub fn thread_title(author: &str) -> String {
    format!("Conversation with {author}")
}
