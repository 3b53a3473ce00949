//! How a training run fails.

use crate::config::TrainConfig;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the loss became {loss} at step {step}; training stopped (lower the learning rate); the last good checkpoint is {last_checkpoint}"
    )]
    NonFiniteLoss {
        step: usize,
        loss: f64,
        last_checkpoint: String,
    },
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
    #[error(transparent)]
    Adapter(#[from] loraloop_model::lora::AdapterError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}", oom_message(.detail, .micro_batch_size, .gradient_checkpointing))]
    OutOfMemory {
        /// The device's own error text.
        detail: String,
        micro_batch_size: usize,
        gradient_checkpointing: bool,
    },
}

fn oom_message(detail: &str, micro_batch_size: &usize, gradient_checkpointing: &bool) -> String {
    let (micro_batch_size, gradient_checkpointing) = (*micro_batch_size, *gradient_checkpointing);
    let mut fixes = Vec::new();
    if micro_batch_size > 1 {
        fixes.push(format!(
            "a smaller micro_batch_size (now {micro_batch_size}; raise gradient_accumulation_steps to keep the effective batch)"
        ));
    }
    if !gradient_checkpointing {
        fixes.push("gradient_checkpointing: true".to_string());
    }
    fixes.push("a shorter sequence_len".to_string());
    format!(
        "the GPU ran out of memory during training ({detail}); try {}. The server and the active adapter are not affected",
        fixes.join(", or ")
    )
}

/// Whether a candle error is the device running out of memory: the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` (cudarc's `DriverError` prints as
/// `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`), cuBLAS's
/// `CUBLAS_STATUS_ALLOC_FAILED` and cuRAND's `CURAND_STATUS_ALLOCATION_FAILED` (both print
/// their status name).
pub fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string();
    [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CURAND_STATUS_ALLOCATION_FAILED",
    ]
    .iter()
    .any(|k| text.contains(k))
}

impl TrainError {
    /// A device out-of-memory error as `OutOfMemory` (with what to change), others as they are.
    pub fn classify_oom(self, c: &TrainConfig) -> Self {
        match self {
            Self::Candle(e) if is_out_of_memory(&e) => Self::OutOfMemory {
                detail: e.to_string().lines().next().unwrap_or_default().to_string(),
                micro_batch_size: c.micro_batch_size,
                gradient_checkpointing: c.gradient_checkpointing,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with the text cudarc gives a failed allocation: `DriverError`'s `Display`
    /// is its `Debug`, `DriverError(<CUresult name>, "<cuGetErrorString text>")`
    /// (cudarc 0.19 `src/driver/result.rs`), wrapped by candle as `Error::Cuda`.
    #[derive(Debug)]
    struct FakeDriverError;
    impl std::fmt::Display for FakeDriverError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
        }
    }
    impl std::error::Error for FakeDriverError {}

    fn config(micro: usize, gc: bool) -> TrainConfig {
        let yaml = format!("micro_batch_size: {micro}\ngradient_checkpointing: {gc}\n");
        crate::config::TrainFile::parse(&yaml, "test")
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_cuda_out_of_memory_error_says_so_and_what_to_change() {
        let e = TrainError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError)));
        let msg = e.classify_oom(&config(8, false)).to_string();
        assert!(
            msg.starts_with("the GPU ran out of memory during training"),
            "{msg}"
        );
        assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{msg}");
        assert!(msg.contains("micro_batch_size (now 8"), "{msg}");
        assert!(msg.contains("gradient_checkpointing: true"), "{msg}");
        assert!(msg.contains("not affected"), "{msg}");

        // Checkpointing already on and one row per batch: only what is left to change.
        let e = TrainError::Candle(candle_core::Error::Cuda(Box::new(FakeDriverError)));
        let msg = e.classify_oom(&config(1, true)).to_string();
        assert!(!msg.contains("micro_batch_size") && !msg.contains("gradient_checkpointing"));
        assert!(msg.contains("shorter sequence_len"), "{msg}");

        // cuBLAS's failed workspace allocation (its status name is its Display).
        let e = TrainError::Candle(candle_core::Error::Msg(
            "CublasError(CUBLAS_STATUS_ALLOC_FAILED)".into(),
        ));
        assert!(matches!(
            e.classify_oom(&config(4, false)),
            TrainError::OutOfMemory { .. }
        ));
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        let e = TrainError::Candle(candle_core::Error::Msg("shape mismatch in matmul".into()));
        let msg = e.classify_oom(&config(4, false)).to_string();
        assert_eq!(msg, "shape mismatch in matmul");
        let e = TrainError::Invalid("lora_r 999 is larger".into());
        assert!(matches!(
            e.classify_oom(&config(4, false)),
            TrainError::Invalid(_)
        ));
    }
}
