//! What a training run reports while it runs and how it ended.

use loraloop_model::train::PassStats;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the trainer reports while it runs (the CLI prints it; the job worker stores it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        train_examples: usize,
        eval_examples: usize,
        truncated: usize,
        dropped: usize,
        trainable_params: usize,
        resumed_from_step: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: f64,
        loss: f64,
        learning_rate: f64,
        grad_norm: f64,
        tokens_per_sec: f64,
        eta_secs: f64,
        /// The share of scored tokens the model's argmax predicted in this step's batches
        /// (OpenAI's `train_mean_token_accuracy`); None for preference objectives.
        accuracy: Option<f64>,
    },
    Eval {
        step: usize,
        eval_loss: f64,
        perplexity: f64,
        accuracy: f64,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
    EarlyStop {
        step: usize,
        best_eval_loss: f64,
    },
    Message {
        text: String,
    },
}

/// Loss, perplexity and mean token accuracy of a model on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    pub tokens: usize,
}

impl From<PassStats> for EvalMetrics {
    fn from(s: PassStats) -> Self {
        Self {
            loss: s.loss(),
            perplexity: s.loss().exp(),
            accuracy: s.accuracy(),
            tokens: s.scored,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Finished,
    EarlyStopped,
    Cancelled,
}
