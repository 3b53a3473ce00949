//! The services the bots and the web both call: the chat service (a turn of a stored
//! conversation) and the adapter service (which adapter the engine runs), over the one
//! database, engine and assistant of this process.

pub mod adapter_cache;
pub mod adapters;
pub mod assistants;
pub mod canary;
pub mod chat;
pub mod model_info;
pub mod routing;
pub mod transcripts;

pub use adapters::{Activation, AdapterService};
pub use assistants::{AssistantForm, AssistantService};
pub use canary::{CanaryService, CanaryStatus};
pub use chat::{ChatService, Turn};
pub use model_info::ModelInfo;
pub use routing::Router;

use crate::Config;
use crate::metrics::Metrics;
use crate::storage::{Assistant, Db};
use loraloop_model::engine::Engine;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What the services are built from (the binary opens, loads and starts these).
pub struct Parts {
    pub db: Db,
    pub config: Config,
    pub engine: Engine,
    pub model: ModelInfo,
    pub assistant: Assistant,
    /// Where training jobs write adapters and where uploaded adapters are unpacked.
    pub adapters_dir: PathBuf,
}

pub struct Inner {
    pub db: Db,
    pub config: Config,
    pub engine: Engine,
    pub model: Arc<ModelInfo>,
    /// The default assistant, as it was at start-up (its id and name do not change).
    pub assistant: Assistant,
    pub assistants: Arc<AssistantService>,
    pub adapters: Arc<AdapterService>,
    pub chat: ChatService,
    pub canary: CanaryService,
    pub metrics: Arc<Metrics>,
    pub adapters_dir: PathBuf,
    pub started: Instant,
    /// The state of the bots and the worker, for `/healthz`.
    pub health: Arc<crate::supervisor::Health>,
}

/// The process's services: cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Services(Arc<Inner>);

impl Deref for Services {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Services {
    pub fn new(p: Parts) -> Self {
        let metrics = Arc::new(Metrics::default());
        let model = Arc::new(p.model);
        let adapters = Arc::new(AdapterService::new(
            p.db.clone(),
            p.engine.clone(),
            model.clone(),
            p.assistant.clone(),
            metrics.clone(),
            p.config.raw.engine.adapter_cache_mib << 20,
        ));
        let assistants = Arc::new(AssistantService {
            db: p.db.clone(),
            default_name: p.assistant.name.clone(),
            base_model: p.config.raw.model.clone(),
            generation: p.config.raw.generation.clone(),
            default_policy: p.config.raw.assistant.activation,
        });
        let router = Router {
            db: p.db.clone(),
            adapters: adapters.clone(),
            pin_idle_secs: p.config.raw.assistant.pin_idle_minutes * 60.0,
        };
        let chat = ChatService {
            db: p.db.clone(),
            engine: p.engine.clone(),
            assistants: assistants.clone(),
            adapters: adapters.clone(),
            router,
            metrics: metrics.clone(),
        };
        let canary = CanaryService {
            db: p.db.clone(),
            adapters: adapters.clone(),
            config: p.config.raw.canary.clone(),
        };
        Self(Arc::new(Inner {
            db: p.db,
            config: p.config,
            engine: p.engine,
            model,
            assistant: p.assistant,
            assistants,
            adapters,
            chat,
            canary,
            metrics,
            adapters_dir: p.adapters_dir,
            started: Instant::now(),
            health: Arc::default(),
        }))
    }
}
