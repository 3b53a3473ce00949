//! The bots end to end: the real server with its Telegram and Discord bots against fake
//! platform servers (the outside world, faked; everything of ours is real).

#[path = "../support/mod.rs"]
mod support;

mod assistants;
mod canary;
mod discord;
mod feedback;
mod telegram;
