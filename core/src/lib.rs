//! loraloop's core: configuration, SQLite storage and the platform-neutral domain types.
//!
//! Dependencies point one way: `loraloop-model` <- `loraloop-core` <- {trainer, bots, web}
//! <- the `loraloop` binary.

pub mod config;
pub mod domain;
pub mod storage;

pub use config::Config;
pub use loraloop_model::DEFAULT_MODEL_FILE;
pub use storage::Db;
