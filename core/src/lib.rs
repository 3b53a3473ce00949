//! loraloop's core: configuration, SQLite storage, the platform-neutral domain types, and
//! the chat and adapter services that the bots and the web both call.
//!
//! Dependencies point one way: `loraloop-model` <- `loraloop-core` <- {trainer, bots, web}
//! <- the `loraloop` binary.

pub mod assistant_settings;
pub mod canary;
pub mod config;
pub mod domain;
pub mod error;
pub mod gate;
pub mod inbox;
pub mod keywords;
pub mod metrics;
pub mod preference;
pub mod service;
pub mod storage;
pub mod supervisor;
pub mod token;

pub use config::Config;
pub use error::ServiceError;
pub use loraloop_model::DEFAULT_MODEL_FILE;
pub use service::Services;
pub use storage::Db;
