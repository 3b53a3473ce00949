//! Activating adapters: check an adapter against the served model, load it (once; loaded
//! adapters are cached), record the activation, swap it into the engine. One activation
//! at a time: a second request while one runs gets a 409 and changes nothing.

use crate::error::ApiError;
use crate::state::Inner;
use loraloop_core::storage::Adapter;
use loraloop_model::engine::{ActiveAdapter, AdapterChoice};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct AdapterService {
    /// Held for the whole of an activation or rollback.
    activation: tokio::sync::Mutex<()>,
    /// Loaded adapters by database id.
    loaded: Mutex<HashMap<i64, Arc<ActiveAdapter>>>,
    /// Engine activation version -> adapter id, to tell which adapter wrote a reply.
    by_version: Mutex<HashMap<u64, i64>>,
    /// What this process's engine runs: None before the first swap, then the adapter id
    /// (Some(None): the base model).
    current: Mutex<Option<Option<i64>>>,
}

/// The adapter now active (None: the base model).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Activation {
    pub adapter_id: Option<i64>,
    pub adapter_name: Option<String>,
    /// Milliseconds from the request to the swap (loading the adapter included).
    pub took_ms: f64,
}

impl AdapterService {
    /// The adapter id behind an engine activation version.
    pub fn adapter_id_of_version(&self, version: u64) -> Option<i64> {
        self.by_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
            .copied()
    }

    /// Why `adapter` cannot run on the served model, if it cannot.
    pub fn mismatch(state: &Inner, adapter: &Adapter) -> Option<String> {
        let m = &state.model;
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
    pub async fn load(
        &self,
        state: &Inner,
        adapter: &Adapter,
    ) -> Result<Arc<ActiveAdapter>, ApiError> {
        if let Some(a) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&adapter.id)
        {
            return Ok(a.clone());
        }
        if let Some(why) = Self::mismatch(state, adapter) {
            return Err(ApiError::conflict(why));
        }
        let mut lora = state
            .engine
            .load_adapter(PathBuf::from(&adapter.path))
            .await
            .map_err(|e| {
                ApiError::conflict(format!("adapter {} cannot be loaded: {e}", adapter.name))
            })?;
        lora.name = adapter.name.clone();
        let prepared = state.engine.prepare_adapter(lora);
        self.by_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(prepared.version, adapter.id);
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(adapter.id, prepared.clone());
        Ok(prepared)
    }

    /// Forget a loaded adapter (its row was deleted).
    pub fn evict(&self, adapter_id: i64) {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&adapter_id);
    }

    /// Activate `adapter_id` (None: back to the base model) for the assistant.
    pub async fn activate(
        &self,
        state: &Inner,
        adapter_id: Option<i64>,
        by: &str,
    ) -> Result<Activation, ApiError> {
        let start = std::time::Instant::now();
        let _guard = self.activation.try_lock().map_err(|_| {
            ApiError::conflict("another activation is in progress; try again when it has finished")
        })?;
        self.swap(state, adapter_id, by, start, true).await
    }

    /// Go back to the adapter active before the current one.
    pub async fn rollback(&self, state: &Inner, by: &str) -> Result<Activation, ApiError> {
        let start = std::time::Instant::now();
        let _guard = self.activation.try_lock().map_err(|_| {
            ApiError::conflict("another activation is in progress; try again when it has finished")
        })?;
        let history: Vec<(Option<i64>,)> = sqlx::query_as(
            "select adapter_id from adapter_activations where assistant_id = ? order by id desc limit 2",
        )
        .bind(state.assistant.id)
        .fetch_all(state.db.pool())
        .await
        .map_err(ApiError::internal)?;
        // Before the first activation the assistant ran the base model.
        let previous = match history.as_slice() {
            [] | [(None,)] => {
                return Err(ApiError::conflict(
                    "nothing to roll back to: no earlier activation",
                ));
            }
            [_] => None,
            [_, (p,), ..] => *p,
        };
        self.swap(state, previous, by, start, true).await
    }

    /// Make the engine run what the database says is active (at startup).
    pub async fn restore(&self, state: &Inner) -> Result<Option<String>, ApiError> {
        let assistant = state.db.assistant(&state.assistant.name).await?;
        match assistant.active_adapter_id {
            None => {
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(None);
                Ok(None)
            }
            Some(id) => {
                let a = self
                    .swap(state, Some(id), "startup", std::time::Instant::now(), false)
                    .await?;
                Ok(a.adapter_name)
            }
        }
    }

    /// Swap in what the database says is active when that is not what the engine runs
    /// (an activation made by another process). Returns the new activation, if any.
    pub async fn follow(&self, state: &Inner) -> Result<Option<Activation>, ApiError> {
        let Ok(_guard) = self.activation.try_lock() else {
            return Ok(None);
        };
        let active = state
            .db
            .assistant(&state.assistant.name)
            .await?
            .active_adapter_id;
        let current = *self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current == Some(active) {
            return Ok(None);
        }
        let by = "another process";
        let start = std::time::Instant::now();
        Ok(Some(self.swap(state, active, by, start, false).await?))
    }

    async fn swap(
        &self,
        state: &Inner,
        adapter_id: Option<i64>,
        by: &str,
        start: std::time::Instant,
        record: bool,
    ) -> Result<Activation, ApiError> {
        let (prepared, name) = match adapter_id {
            None => (None, None),
            Some(id) => {
                let row = adapter_row(state, id).await?;
                (Some(self.load(state, &row).await?), Some(row.name))
            }
        };
        if record {
            state
                .db
                .activate_adapter(state.assistant.id, adapter_id, by)
                .await?;
        }
        state.engine.set_prepared_adapter(prepared);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(adapter_id);
        state.metrics.adapter_swapped();
        Ok(Activation {
            adapter_id,
            adapter_name: name,
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// What a request asking for `model` runs on: the assistant's name (or empty) is the
    /// active adapter, `base` the base model, anything else an adapter by name.
    pub async fn choice(&self, state: &Inner, model: &str) -> Result<AdapterChoice, ApiError> {
        if model.is_empty() || model == state.assistant.name {
            return Ok(AdapterChoice::Active);
        }
        if model == "base" || model == state.model.name {
            return Ok(AdapterChoice::Base);
        }
        let row: Option<Adapter> = state
            .db
            .list_adapters()
            .await?
            .into_iter()
            .find(|a| a.name == model);
        match row {
            Some(a) => Ok(AdapterChoice::Fixed(self.load(state, &a).await?)),
            None => Err(ApiError::not_found(format!(
                "model {model:?} does not exist: use {:?} (the active adapter), \"base\", or an adapter name from GET /v1/models",
                state.assistant.name
            ))
            .with_param("model")),
        }
    }
}

pub async fn adapter_row(state: &Inner, id: i64) -> Result<Adapter, ApiError> {
    Ok(state.db.adapter(id).await?)
}
