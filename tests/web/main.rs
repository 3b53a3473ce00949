//! The web surface end to end: the real server (`loraloop::serve::start`) on port 0 with a
//! fresh database and a tiny random model, driven over HTTP, by the official OpenAI client
//! and by a browser.

#[path = "../support/mod.rs"]
mod support;

mod api;
mod api_chats;
mod backup;
mod browser;
mod classifiers;
mod console_data;
mod console_model;
mod dataset_urls;
mod export;
mod limits;
mod openai_client;
mod openai_fine_tuning;
mod sweeps;
