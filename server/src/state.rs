//! The shared state every handler sees: database, engine, configuration, services.

use crate::adapters::AdapterService;
use crate::metrics::Metrics;
use loraloop_core::storage::Assistant;
use loraloop_core::{Config, Db};
use loraloop_model::engine::Engine;
use secrecy::SecretString;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What the served model is, and the fingerprints an adapter must have been trained
/// against to be activated on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The model's name (file name without extension, or folder name).
    pub name: String,
    /// What jobs name as their base model (the configured `model` value).
    pub config_name: String,
    pub path: PathBuf,
    pub hash: String,
    pub tokenizer_hash: String,
    pub chat_template_hash: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub layers: usize,
    pub context_length: usize,
}

pub struct Inner {
    pub db: Db,
    pub config: Config,
    pub engine: Engine,
    pub model: ModelInfo,
    pub assistant: Assistant,
    pub adapters: AdapterService,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<SecretString>,
    /// Where training jobs write adapters and where uploaded adapters are unpacked.
    pub adapters_dir: PathBuf,
    /// Largest accepted upload (datasets, adapters), from `server.max_upload_mb`.
    pub max_upload_bytes: u64,
    pub started: Instant,
    /// Telegram updates from the webhook route to the running bot.
    pub telegram_inbox: crate::telegram::Inbox,
}

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
