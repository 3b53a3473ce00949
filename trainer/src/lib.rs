//! loraloop's trainer: dataset formats and validation, tokenization with loss weights,
//! batching and packing, the training loop (AdamW, schedules, gradient accumulation and
//! clipping, evaluation, early stopping), checkpoints in PEFT format, and evaluation.

pub mod batch;
pub mod bench;
pub mod card;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod dataset;
pub mod error;
pub mod evaluate;
pub mod events;
pub mod fingerprint;
pub mod generate;
pub mod job_card;
pub mod job_events;
pub mod lease;
pub mod optim;
pub mod plan;
pub mod preference;
pub mod replay;
pub mod run;
pub mod sweep;
pub mod tokenize;
pub mod topk;
pub mod trainable;
pub mod training_loop;
pub mod worker;
pub mod yield_to;
