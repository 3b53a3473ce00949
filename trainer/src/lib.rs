//! loraloop's trainer: dataset formats and validation (the training loop comes later).

pub mod dataset;
