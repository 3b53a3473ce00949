//! Activating adapters: check an adapter against the served model, load it (once; loaded
//! adapters are cached), record the activation, swap it into the engine. One activation
//! at a time: a second request while one runs is a conflict and changes nothing.

use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;
use crate::service::adapter_cache::AdapterCache;
use crate::service::model_info::ModelInfo;
use crate::storage::{Adapter, Assistant, Db, RollbackStep};
use loraloop_model::engine::{ActiveAdapter, AdapterChoice, Engine};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct AdapterService {
    db: Db,
    engine: Engine,
    model: Arc<ModelInfo>,
    /// The default assistant: the engine's own active adapter is its (other assistants'
    /// turns name their adapter).
    assistant: Assistant,
    metrics: Arc<Metrics>,
    /// Held for the whole of an activation or rollback.
    activation: tokio::sync::Mutex<()>,
    /// Loaded adapters by database id, least recently used out first under a cap.
    loaded: Mutex<AdapterCache>,
    /// Engine activation version -> adapter id, to tell which adapter wrote a reply.
    by_version: Mutex<HashMap<u64, i64>>,
    /// What this process's engine runs: None before the first swap, then the adapter id
    /// (Some(None): the base model).
    current: Mutex<Option<Option<i64>>>,
}

/// The adapter now active (None: the base model).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Activation {
    pub adapter_id: Option<i64>,
    pub adapter_name: Option<String>,
    /// Milliseconds from the request to the swap (loading the adapter included).
    pub took_ms: f64,
}

/// What a swap writes to the activation history.
enum Record {
    /// Nothing: the engine catches up with the database.
    None,
    Activation,
    Rollback(RollbackStep),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AdapterService {
    pub fn new(
        db: Db,
        engine: Engine,
        model: Arc<ModelInfo>,
        assistant: Assistant,
        metrics: Arc<Metrics>,
        cache_bytes: usize,
    ) -> Self {
        Self {
            db,
            engine,
            model,
            assistant,
            metrics,
            activation: Default::default(),
            loaded: Mutex::new(AdapterCache::new(cache_bytes)),
            by_version: Default::default(),
            current: Default::default(),
        }
    }

    /// The adapter id behind an engine activation version.
    pub fn adapter_id_of_version(&self, version: u64) -> Option<i64> {
        lock(&self.by_version).get(&version).copied()
    }

    /// Why `adapter` cannot run on the served model, if it cannot.
    pub fn mismatch(&self, adapter: &Adapter) -> Option<String> {
        let m = &self.model;
        let checks = [
            ("base model", &adapter.base_model_hash, &m.hash),
            ("tokenizer", &adapter.tokenizer_hash, &m.tokenizer_hash),
            (
                "chat template",
                &adapter.chat_template_hash,
                &m.chat_template_hash,
            ),
        ];
        checks.iter().find(|(_, a, b)| a != b).map(|(what, _, _)| {
            format!(
                "adapter {} was trained against a different {what} than the served model {} ({}); activating it would produce garbage",
                adapter.name, m.name, adapter.base_model
            )
        })
    }

    /// Load (or take from the cache) the adapter with this id, checked against the model.
    pub async fn load(&self, adapter: &Adapter) -> Result<Arc<ActiveAdapter>> {
        if let Some(a) = lock(&self.loaded).get(adapter.id) {
            return Ok(a);
        }
        if let Some(why) = self.mismatch(adapter) {
            return Err(ServiceError::Conflict(why));
        }
        let mut lora = self
            .engine
            .load_adapter(PathBuf::from(&adapter.path))
            .await
            .map_err(|e| {
                ServiceError::Conflict(format!("adapter {} cannot be loaded: {e}", adapter.name))
            })?;
        lora.name = adapter.name.clone();
        let prepared = self.engine.prepare_adapter(lora);
        lock(&self.by_version).insert(prepared.version, adapter.id);
        let evicted = lock(&self.loaded).insert(adapter.id, prepared.clone());
        if !evicted.is_empty() {
            let (n, bytes) = lock(&self.loaded).usage();
            tracing::info!(
                ?evicted,
                held = n,
                mib = bytes >> 20,
                "adapter cache full: least recently used adapters unloaded"
            );
        }
        Ok(prepared)
    }

    /// What the engine runs for `adapter_id` (None: the base model), loaded if needed.
    pub async fn choice_of(&self, adapter_id: Option<i64>) -> Result<AdapterChoice> {
        match adapter_id {
            None => Ok(AdapterChoice::Base),
            Some(id) => {
                let row = self.db.adapter(id).await?;
                Ok(AdapterChoice::Fixed(self.load(&row).await?))
            }
        }
    }

    /// Forget a loaded adapter (its row was deleted).
    pub fn evict(&self, adapter_id: i64) {
        lock(&self.loaded).remove(adapter_id);
    }

    fn busy() -> ServiceError {
        ServiceError::Conflict(
            "another activation is in progress; try again when it has finished".into(),
        )
    }

    /// Activate `adapter_id` (None: back to the base model) for the assistant. A running
    /// canary ends: promoted when this is its adapter, cancelled otherwise.
    pub async fn activate(
        &self,
        assistant_id: i64,
        adapter_id: Option<i64>,
        by: &str,
    ) -> Result<Activation> {
        let start = std::time::Instant::now();
        let _guard = self.activation.try_lock().map_err(|_| Self::busy())?;
        let a = self
            .swap(assistant_id, adapter_id, by, start, Record::Activation)
            .await?;
        if let Some(c) = self.db.running_canary(assistant_id).await? {
            let (outcome, reason) = if adapter_id == Some(c.adapter_id) {
                ("promoted", format!("activated by {by}"))
            } else {
                ("cancelled", format!("{by} activated another adapter"))
            };
            self.db.end_canary(c.id, outcome, &reason).await?;
        }
        Ok(a)
    }

    /// Activate a canary's candidate once the canary has been ended as promoted (waits for
    /// an activation in progress instead of refusing).
    pub async fn promote(
        &self,
        assistant_id: i64,
        adapter_id: i64,
        by: &str,
    ) -> Result<Activation> {
        let start = std::time::Instant::now();
        let _guard = self.activation.lock().await;
        self.swap(
            assistant_id,
            Some(adapter_id),
            by,
            start,
            Record::Activation,
        )
        .await
    }

    /// Undo the newest activation still in force: each rollback goes one step further back
    /// in the history. A running canary is cancelled (what it was compared with changed).
    pub async fn rollback(&self, assistant_id: i64, by: &str) -> Result<Activation> {
        let start = std::time::Instant::now();
        let _guard = self.activation.try_lock().map_err(|_| Self::busy())?;
        let step = self.db.rollback_step(assistant_id).await?.ok_or_else(|| {
            ServiceError::Conflict("nothing to roll back to: no earlier activation".into())
        })?;
        let a = self
            .swap(assistant_id, step.to, by, start, Record::Rollback(step))
            .await?;
        if let Some(c) = self.db.running_canary(assistant_id).await? {
            self.db
                .end_canary(
                    c.id,
                    "cancelled",
                    &format!("{by} rolled the active adapter back"),
                )
                .await?;
        }
        Ok(a)
    }

    /// Make the engine run what the database says is active (at startup).
    pub async fn restore(&self) -> Result<Option<String>> {
        let assistant = self.db.assistant(&self.assistant.name).await?;
        match assistant.active_adapter_id {
            None => {
                *lock(&self.current) = Some(None);
                Ok(None)
            }
            Some(id) => {
                let a = self
                    .swap(
                        self.assistant.id,
                        Some(id),
                        "startup",
                        std::time::Instant::now(),
                        Record::None,
                    )
                    .await?;
                Ok(a.adapter_name)
            }
        }
    }

    /// Swap in what the database says is active when that is not what the engine runs
    /// (an activation made by another process). Returns the new activation, if any.
    /// `serve` calls this every second: the look happens without the activation lock,
    /// which is taken only when there is something to swap, so an operator's activation
    /// or rollback is not refused as "in progress" because of the look.
    pub async fn follow(&self) -> Result<Option<Activation>> {
        let active = self.active_in_db().await?;
        if *lock(&self.current) == Some(active) {
            return Ok(None);
        }
        let Ok(guard) = self.activation.try_lock() else {
            return Ok(None);
        };
        self.follow_locked(guard).await
    }

    /// [`Self::follow`] now, waiting for an activation under way: the gate in this
    /// process calls it so that its adapter answers before its job says it succeeded
    /// (following the database each second made replies lag the job by up to a second).
    pub async fn follow_now(&self) -> Result<Option<Activation>> {
        let guard = self.activation.lock().await;
        self.follow_locked(guard).await
    }

    async fn follow_locked(
        &self,
        _guard: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<Option<Activation>> {
        // Under the lock: an activation may have ended since the caller looked.
        let active = self.active_in_db().await?;
        if *lock(&self.current) == Some(active) {
            return Ok(None);
        }
        let by = "another process";
        let start = std::time::Instant::now();
        Ok(Some(
            self.swap(self.assistant.id, active, by, start, Record::None)
                .await?,
        ))
    }

    /// The adapter the database says this assistant runs (None: the base model).
    async fn active_in_db(&self) -> Result<Option<i64>> {
        Ok(self
            .db
            .assistant(&self.assistant.name)
            .await?
            .active_adapter_id)
    }

    async fn swap(
        &self,
        assistant_id: i64,
        adapter_id: Option<i64>,
        by: &str,
        start: std::time::Instant,
        record: Record,
    ) -> Result<Activation> {
        let (prepared, name) = match adapter_id {
            None => (None, None),
            Some(id) => {
                let row = self.db.adapter(id).await?;
                // An assistant's adapters are its own and the uploaded ones (tied to none):
                // another's would answer there while no adapter list showed it active.
                if matches!(record, Record::Activation)
                    && let Some(owner) = row.assistant_id.filter(|&o| o != assistant_id)
                {
                    let owner = match self.db.assistant_by_id(owner).await {
                        Ok(a) => format!("assistant {:?}", a.name),
                        Err(_) => "another assistant".to_string(),
                    };
                    return Err(ServiceError::Conflict(format!(
                        "adapter {} was trained for {owner}: an assistant activates its own adapters and uploaded ones",
                        row.name
                    )));
                }
                (Some(self.load(&row).await?), Some(row.name))
            }
        };
        // The storage writes the audit entry with the swap, in one transaction.
        match record {
            Record::None => {}
            Record::Activation => {
                self.db
                    .activate_adapter(assistant_id, adapter_id, by)
                    .await?;
            }
            Record::Rollback(step) => self.db.record_rollback(assistant_id, &step, by).await?,
        }
        // Other assistants' turns name their active adapter when they start (the router
        // reads it from the database); only the default assistant's is the engine's own.
        if assistant_id == self.assistant.id {
            self.engine.set_prepared_adapter(prepared);
            *lock(&self.current) = Some(adapter_id);
        }
        self.metrics.adapter_swapped();
        Ok(Activation {
            adapter_id,
            adapter_name: name,
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// What a request asking for `model` runs on (see also [`reserved_model_name`]): the default assistant's name (or
    /// empty) is the engine's active adapter, another assistant's name that assistant's
    /// active adapter, `base` the base model, anything else an adapter by name.
    pub async fn choice(&self, model: &str) -> Result<AdapterChoice> {
        if model.is_empty() || model == self.assistant.name {
            return Ok(AdapterChoice::Active);
        }
        if model == "base" || model == self.model.name {
            return Ok(AdapterChoice::Base);
        }
        if let Ok(a) = self.db.assistant(model).await {
            return self.choice_of(a.active_adapter_id).await;
        }
        match self.db.adapter_named(model).await? {
            Some(a) => Ok(AdapterChoice::Fixed(self.load(&a).await?)),
            None => Err(ServiceError::NotFound {
                message: format!(
                    "model {model:?} does not exist: use an assistant's name ({:?} is the default one), \"base\", or an adapter name from GET /v1/models",
                    self.assistant.name
                ),
                param: Some("model".into()),
            }),
        }
    }
}

/// Names no adapter or assistant may take: [`AdapterService::choice`] reads `base` and the
/// base model's name as the base model before it looks for one, and the console's
/// playground and compare page read `active` as the assistant's active adapter.
pub fn reserved_model_name(name: &str, base_model: &str) -> bool {
    matches!(name, "base" | "active") || name == base_model
}
