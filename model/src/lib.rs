//! loraloop's model layer. For now: local model files, their GGUF headers, and fetching
//! the embedded default model. The llama-family architecture, LoRA layers, tokenizer,
//! chat templates and the inference engine land here next (see the README's architecture).

pub mod engine;
pub mod fetch;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod q4_1;
pub mod registry;
pub mod sampling;
pub mod template;
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use fetch::{DEFAULT_MODEL_FILE, DefaultModel};
pub use gguf::{GgufSummary, ModelError};
