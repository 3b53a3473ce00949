//! What the served model is.

use std::path::PathBuf;

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
