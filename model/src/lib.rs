//! loraloop's model layer: the llama-family model in candle (`llama`), LoRA adapters in
//! PEFT format (`lora`), the tokenizer, chat templates, sampling, the inference engine,
//! the training graph and its CPU path (`train`), the Q4_1 and Q8_0 kernels, device selection,
//! model files and the default model fetch, and tiny random models for tests.

pub mod classify;
pub mod device;
pub mod engine;
pub mod export;
pub mod fetch;
pub mod fetch_folder;
pub mod gguf;
mod kernels;
pub mod llama;
pub mod lora;
pub mod q4_1;
pub mod q8_0;
pub mod registry;
pub mod sampling;
pub mod template;
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use fetch::{DEFAULT_MODEL_FILE, DefaultModel};

/// candle's CPU matmul asks how many threads to use on every call, and unless
/// `RAYON_NUM_THREADS` is set the answer comes from parsing `/proc/cpuinfo` again each
/// time: `perf` put a quarter of all CPU time of the bot load test in the kernel's
/// `show_cpuinfo` and `vsnprintf`. This asks once and sets the variable to candle's own
/// answer, which keeps its choice and makes each later call an environment lookup.
///
/// # Safety
/// It changes the process environment: call it first thing in `main`, before any other
/// thread exists (no thread may read the environment meanwhile).
#[allow(unsafe_code)]
pub unsafe fn pin_candle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
pub use gguf::{GgufSummary, ModelError};
