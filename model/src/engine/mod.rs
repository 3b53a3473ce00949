//! The inference engine: one owner thread runs the model, callers hold a cloneable
//! handle. Each request gets its own channel of streamed events; dropping the receiver
//! cancels the generation.
//!
//! Several requests are served at once by continuous batching (`scheduler`): every
//! running sequence, each with its own attention cache and adapter, advances by one token
//! per step in one batched forward pass; new ones join between steps, prompts run in
//! chunks, and what does not fit waits in a fair line (`EngineLimits`).
//!
//! Hot swap: the active adapter sits in an `ArcSwapOption`. A sequence takes a snapshot
//! when it is admitted and keeps it to the end; `set_adapter` only affects sequences
//! admitted afterwards. No lock is held while generating.

mod limits;
mod prefix;
mod scheduler;
mod sequence;

pub use limits::EngineLimits;

use crate::llama::{Llama, ModelLoadError, ModelSource};
use crate::lora::{AdapterError, LoraAdapter};
use crate::sampling::SamplingParams;
use crate::template::{ChatTemplate, TemplateError, TemplateMessage};
use crate::tokenizer::{Tokenizer, TokenizerError};
use arc_swap::ArcSwapOption;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use tokio::sync::mpsc as tmpsc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] ModelLoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt needs {tokens} tokens but the context window leaves {budget} (context {context}, {reserved} reserved for the reply); shorten the last message"
    )]
    PromptTooLong {
        tokens: usize,
        budget: usize,
        context: usize,
        reserved: usize,
    },
    #[error(
        "{in_flight} replies are running or waiting, the most the engine takes; try again shortly"
    )]
    Busy { in_flight: usize },
    #[error("the inference engine has stopped")]
    Stopped,
}

/// The dtype dense (safetensors) weights are loaded in on `device`: bf16 on CUDA (half
/// the memory, tensor-core matmuls; what the trainer runs a LoRA base in there, so a
/// training job shares these tensors), f32 on the CPU (candle has no fast bf16 CPU matmul).
pub fn dense_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A model with its tokenizer and chat template, ready to run.
pub struct LoadedModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub source: ModelSource,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("source", &self.source)
            .field("config", &self.llama.config)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Load a `.gguf` file or a Hugging Face model folder on `device`. GGUF weights stay
    /// quantized (candle's quantized matmul on CUDA); a folder's dense weights are loaded
    /// in [`dense_dtype`] for the device.
    pub fn load(path: &Path, device: &Device) -> Result<Self, EngineError> {
        let source = ModelSource::detect(path)?;
        match &source {
            ModelSource::Gguf(p) => {
                let (mut llama, content) = crate::llama::load::load_gguf(p, device)?;
                // Served like llama.cpp serves the file: an f16 attention cache.
                llama.kv_f16 = true;
                let tokenizer = Tokenizer::from_gguf(&content)?;
                let template =
                    ChatTemplate::from_gguf(&content, tokenizer.bos_str(), tokenizer.eos_str())?;
                Ok(Self {
                    llama,
                    tokenizer,
                    template,
                    source,
                })
            }
            ModelSource::HfDir(dir) => {
                let llama = crate::llama::load::load_hf_dir(dir, device, dense_dtype(device))?;
                let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
                let cfg_path = dir.join("tokenizer_config.json");
                let template = if cfg_path.exists() {
                    ChatTemplate::from_tokenizer_config(&cfg_path)?
                } else {
                    ChatTemplate::new(None, tokenizer.bos_str(), tokenizer.eos_str())?
                };
                Ok(Self {
                    llama,
                    tokenizer,
                    template,
                    source,
                })
            }
        }
    }

    /// Short display name: the file or folder name.
    pub fn name(&self) -> String {
        self.source
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn context_length(&self) -> usize {
        self.llama.config.max_position_embeddings
    }

    /// Render and tokenize a conversation, dropping the oldest turns (never a system
    /// message, never the last message) until it fits the context window with
    /// `reserve` tokens left for the reply. Returns the ids and how many messages were
    /// dropped.
    pub fn chat_prompt(
        &self,
        messages: &[TemplateMessage],
        reserve: usize,
    ) -> Result<(Vec<u32>, usize), EngineError> {
        if messages.is_empty() || messages.last().is_some_and(|m| m.content.trim().is_empty()) {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.context_length();
        let reserve = reserve.min(context / 2);
        let budget = context - reserve;
        // Dropping goes in steps: the oldest turn after the system messages, then any
        // assistant turns that would come first after them (never the last message). Step
        // `k` leaves the non-system messages from `kept_from[k]` on. The fewest steps that
        // fit are found by bisection: a thousand-message conversation is rendered and
        // tokenized about ten times, not once per dropped message.
        let last = messages.len() - 1;
        let turns: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role != "system")
            .collect();
        let mut kept_from = vec![0];
        let mut r = 0;
        while r < turns.len() && turns[r] < last {
            r += 1;
            while r < turns.len() && messages[turns[r]].role == "assistant" && turns[r] < last {
                r += 1;
            }
            kept_from.push(r);
        }
        let tokens = |k: usize| -> Result<Vec<u32>, EngineError> {
            let cut: Vec<usize> = turns[..kept_from[k]].to_vec();
            let msgs: Vec<TemplateMessage> = (0..messages.len())
                .filter(|i| cut.binary_search(i).is_err())
                .map(|i| messages[i].clone())
                .collect();
            let text = self.template.render(&msgs, true)?;
            Ok(self.tokenizer.encode(&text, false)?)
        };
        let ids = tokens(0)?;
        if ids.len() <= budget {
            return Ok((ids, 0));
        }
        let most = kept_from.len() - 1;
        let mut fitting = tokens(most)?;
        if most == 0 || fitting.len() > budget {
            return Err(EngineError::PromptTooLong {
                tokens: fitting.len(),
                budget,
                context,
                reserved: reserve,
            });
        }
        // Step `lo` does not fit, step `hi` does.
        let (mut lo, mut hi) = (0, most);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let ids = tokens(mid)?;
            if ids.len() <= budget {
                (hi, fitting) = (mid, ids);
            } else {
                lo = mid;
            }
        }
        Ok((fitting, kept_from[hi]))
    }
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<TemplateMessage>),
    /// Raw text, tokenized as is (no template).
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub adapter: AdapterChoice,
    /// Who is asking (a chat user, an API caller's `user`): replies are shared fairly
    /// between users and capped per user ([`EngineLimits::max_per_user`]). `None`: no cap.
    pub user: Option<String>,
}

/// Which adapter a generation runs on. The choice is resolved when the engine admits the
/// request, and the sequence keeps it to the end.
#[derive(Debug, Clone, Default)]
pub enum AdapterChoice {
    /// Whatever is active when the request is admitted.
    #[default]
    Active,
    /// The base model, whatever is active.
    Base,
    /// A specific adapter (prepared with [`Engine::prepare_adapter`]), whatever is active.
    Fixed(Arc<ActiveAdapter>),
}

/// Which adapter produced a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterTag {
    /// Increases with every `set_adapter`; identifies one activation.
    pub version: u64,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context window was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub text: String,
    /// The generated token ids (without the end-of-sequence token).
    pub token_ids: Vec<u32>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub adapter: Option<AdapterTag>,
    /// Seconds spent on the prompt (prefill) and on decoding.
    pub prompt_secs: f64,
    pub decode_secs: f64,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The engine is busy: the request waits in line at `position` (1: next). Sent again
    /// when the place changes.
    Queued {
        position: usize,
    },
    /// Admitted: the reply runs on `adapter` (None: the base model).
    Started {
        adapter: Option<AdapterTag>,
    },
    /// A piece of text (whole characters).
    Text(String),
    Finished(Finished),
    Failed(String),
}

/// The receiving end of one generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct Generation {
    rx: tmpsc::UnboundedReceiver<Event>,
    /// Counts the generation as in flight until it is dropped ([`Engine::busy`]).
    _in_flight: InFlight,
    /// Tokens in the prompt after truncation.
    pub prompt_tokens: usize,
    /// Messages dropped from the start of the conversation to fit the context window.
    pub dropped_messages: usize,
}

impl Generation {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Wait for the end; the whole reply.
    pub async fn finish(mut self) -> Result<Finished, String> {
        while let Some(e) = self.next().await {
            match e {
                Event::Finished(f) => return Ok(f),
                Event::Failed(m) => return Err(m),
                _ => {}
            }
        }
        Err("the engine stopped".into())
    }
}

/// One generation held by a caller: counted in [`Engine::busy`] until dropped.
#[derive(Debug)]
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.last_done_ms.store(now, Ordering::SeqCst);
    }
}

/// After a reply, chat counts as busy this long: the next request of a conversation or
/// a script usually follows within it, and a training step started in between would
/// hold that request up.
pub const BUSY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The active adapter with its activation version.
#[derive(Debug)]
pub struct ActiveAdapter {
    pub version: u64,
    pub adapter: LoraAdapter,
}

impl ActiveAdapter {
    pub fn tag(&self) -> AdapterTag {
        AdapterTag {
            version: self.version,
            name: self.adapter.name.clone(),
        }
    }
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: AdapterChoice,
    user: Option<String>,
    events: tmpsc::UnboundedSender<Event>,
}

struct Shared {
    model: Arc<LoadedModel>,
    adapter: ArcSwapOption<ActiveAdapter>,
    versions: AtomicU64,
    limits: EngineLimits,
    stats: Counters,
    /// Generations whose callers still hold them.
    in_flight: std::sync::atomic::AtomicUsize,
    started: std::time::Instant,
    /// When the last generation was dropped, in ms after `started` (0: none yet).
    last_done_ms: AtomicU64,
}

impl Shared {
    fn new(model: LoadedModel, limits: EngineLimits) -> Self {
        Self {
            model: Arc::new(model),
            adapter: ArcSwapOption::empty(),
            versions: AtomicU64::new(0),
            limits,
            stats: Counters::default(),
            in_flight: Default::default(),
            started: std::time::Instant::now(),
            last_done_ms: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// What the engine thread has done, counted as it goes.
#[derive(Default)]
struct Counters {
    decode_steps: AtomicU64,
    decoded_rows: AtomicU64,
    largest_batch: AtomicU64,
    reused_prompt_tokens: AtomicU64,
    parked: AtomicU64,
}

/// The engine's work so far: decode steps, the rows they ran (tokens generated), the
/// most rows one step ran together, the prompt tokens that started from a cached
/// prefix instead of running, and the times a sequence gave up its cache for older ones
/// (it reads what it had again when resumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    pub decode_steps: u64,
    pub decoded_rows: u64,
    pub largest_batch: u64,
    pub reused_prompt_tokens: u64,
    pub parked: u64,
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.model)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Start the engine thread with the default limits. It stops when every handle is
    /// dropped.
    pub fn start(model: LoadedModel) -> Self {
        Self::start_with(model, EngineLimits::default())
    }

    /// Start the engine thread with `limits`.
    pub fn start_with(model: LoadedModel, limits: EngineLimits) -> Self {
        let shared = Arc::new(Shared::new(model, limits));
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("loraloop-engine".into())
            .spawn(move || scheduler::run(&worker, rx))
            .expect("the OS can start a thread");
        Self { shared, jobs: tx }
    }

    pub fn model(&self) -> &LoadedModel {
        &self.shared.model
    }

    /// The engine's model, to share its weights (a training job on the same device
    /// trains on them instead of loading the file again).
    pub fn shared_model(&self) -> Arc<LoadedModel> {
        Arc::clone(&self.shared.model)
    }

    /// Load and validate an adapter folder against this engine's model (blocking work,
    /// done off the async workers). The active adapter is not changed.
    pub async fn load_adapter(&self, dir: PathBuf) -> Result<LoraAdapter, EngineError> {
        let model = Arc::clone(&self.shared.model);
        tokio::task::spawn_blocking(move || {
            LoraAdapter::load(&dir, &model.llama.config, &model.llama.device)
        })
        .await
        .map_err(|_| EngineError::Stopped)?
        .map_err(EngineError::from)
    }

    /// Swap the active adapter (None: the base model). Generations already running finish
    /// on the adapter they started with. Returns the new activation's tag.
    pub fn set_adapter(&self, adapter: Option<LoraAdapter>) -> Option<AdapterTag> {
        self.set_prepared_adapter(adapter.map(|a| self.prepare_adapter(a)))
    }

    /// Give a loaded adapter its version tag, ready for [`Self::set_prepared_adapter`] or
    /// [`AdapterChoice::Fixed`]. Preparing is cheap; the adapter's tensors are shared.
    pub fn prepare_adapter(&self, adapter: LoraAdapter) -> Arc<ActiveAdapter> {
        Arc::new(ActiveAdapter {
            version: self.shared.versions.fetch_add(1, Ordering::SeqCst) + 1,
            adapter,
        })
    }

    /// Swap in an adapter that is already prepared (None: the base model): one atomic
    /// pointer store, nothing loaded or copied.
    pub fn set_prepared_adapter(&self, active: Option<Arc<ActiveAdapter>>) -> Option<AdapterTag> {
        let tag = active.as_ref().map(|a| a.tag());
        self.shared.adapter.store(active);
        tracing::info!(adapter = ?tag.as_ref().map(|t| &t.name), "active adapter swapped");
        tag
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.shared.limits
    }

    /// Whether replies are being made or waiting, or one ended less than [`BUSY_GRACE`]
    /// ago: work that a training job in the same process gives way to.
    pub fn busy(&self) -> bool {
        let s = &self.shared;
        if s.in_flight.load(Ordering::SeqCst) > 0 {
            return true;
        }
        let last = s.last_done_ms.load(Ordering::SeqCst);
        last > 0 && s.started.elapsed().as_millis() as u64 <= last + BUSY_GRACE.as_millis() as u64
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.stats;
        EngineStats {
            decode_steps: c.decode_steps.load(Ordering::Relaxed),
            decoded_rows: c.decoded_rows.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            reused_prompt_tokens: c.reused_prompt_tokens.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
        }
    }

    pub fn active_adapter(&self) -> Option<AdapterTag> {
        self.shared.adapter.load().as_ref().map(|a| a.tag())
    }

    /// [`Engine::generate`] on a blocking thread, for async callers: rendering and
    /// tokenizing a long conversation takes long enough to stall the other tasks of an
    /// async worker thread (a server's other requests).
    pub async fn generate_off_thread(
        &self,
        req: GenerateRequest,
    ) -> Result<Generation, EngineError> {
        let engine = self.clone();
        match tokio::task::spawn_blocking(move || engine.generate(req)).await {
            Ok(result) => result,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(EngineError::Stopped),
            },
        }
    }

    /// Queue a generation. Prompt errors (empty, too long) are returned here; the reply
    /// streams through the returned [`Generation`].
    pub fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        let model = &self.shared.model;
        let reserve = req.params.max_new_tokens;
        let (prompt, dropped) = match req.prompt {
            Prompt::Chat(messages) => model.chat_prompt(&messages, reserve)?,
            Prompt::Text(text) => {
                if text.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                (model.tokenizer.encode(&text, false)?, 0)
            }
            Prompt::Tokens(ids) => (ids, 0),
        };
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = model.context_length();
        if prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                budget: context - 1,
                context,
                reserved: 1,
            });
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "conversation longer than the context window: oldest messages left out"
            );
        }
        let (tx, rx) = tmpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        let in_flight = self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if in_flight >= self.shared.limits.max_in_flight {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Busy { in_flight });
        }
        let in_flight = InFlight(Arc::clone(&self.shared));
        self.jobs
            .send(Job {
                prompt,
                params: req.params,
                adapter: req.adapter,
                user: req.user,
                events: tx,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(Generation {
            rx,
            _in_flight: in_flight,
            prompt_tokens,
            dropped_messages: dropped,
        })
    }
}
