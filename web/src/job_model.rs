//! What a fine-tune's `model_id` names: every name `GET /v1/models` lists (an
//! assistant, `base`, an adapter) and a model file in the models folder.

use crate::error::ApiError;
use crate::state::AppState;
use loraloop_core::storage::Adapter;
use serde_json::{Map, Value};

/// The base a job trains and where it starts from.
#[derive(Debug, Default)]
pub struct JobModel {
    /// The model file (the served model's configured name, or a file in the models folder).
    pub file: String,
    /// The assistant `model_id` named (its name), when it named one.
    pub assistant: Option<String>,
    /// The adapter training continues from, when `model_id` named one.
    pub init_adapter: Option<Adapter>,
}

impl JobModel {
    /// Make `settings` (a job's training keys) continue from the adapter the model id
    /// named, if it named one. Only a LoRA fine-tune on chat examples can: anything else
    /// is refused, `param` naming the request's model field.
    pub fn continue_from_adapter(
        &self,
        settings: &mut Map<String, Value>,
        param: &str,
    ) -> Result<(), ApiError> {
        let Some(a) = &self.init_adapter else {
            return Ok(());
        };
        let trains_lora = settings.get("rl").is_none()
            && settings
                .get("finetuning_type")
                .is_none_or(|m| m.as_str() == Some("lora"));
        if !trains_lora {
            return Err(ApiError::invalid(
                param,
                format!(
                    "only a LoRA fine-tune (sft) continues from adapter {:?}; dpo, kto, full and freeze runs start from the base model ({param} \"base\" or an assistant's name)",
                    a.name
                ),
            ));
        }
        settings.insert("lora_model_dir".into(), Value::from(a.path.clone()));
        Ok(())
    }
}

/// Resolve `model_id` (None: the served model); errors name the request's field `param`
/// (`model_id` in the REST API, `model` in OpenAI's).
pub async fn job_model(
    state: &AppState,
    model_id: Option<&str>,
    param: &'static str,
) -> Result<JobModel, ApiError> {
    let served = &state.core.model;
    let served_file = || served.config_name.clone();
    let Some(id) = model_id.map(str::trim).filter(|m| !m.is_empty()) else {
        return Ok(JobModel {
            file: served_file(),
            ..Default::default()
        });
    };
    if id == served.config_name || id == "base" || id == served.name {
        return Ok(JobModel {
            file: served_file(),
            ..Default::default()
        });
    }
    if let Ok(a) = state.core.db.assistant(id).await {
        return Ok(JobModel {
            file: served_file(),
            assistant: Some(a.name),
            init_adapter: None,
        });
    }
    if let Some(a) = state.core.db.adapter_named(id).await? {
        if let Some(why) = state.core.adapters.mismatch(&a) {
            return Err(ApiError::invalid(
                param,
                format!("adapter {id:?} does not fit the served model: {why}"),
            ));
        }
        let assistant = match a.assistant_id {
            Some(aid) => Some(state.core.db.assistant_by_id(aid).await?.name),
            None => None,
        };
        return Ok(JobModel {
            file: served_file(),
            assistant,
            init_adapter: Some(a),
        });
    }
    let file_ok = crate::files::safe_file_name(id).is_ok();
    let models_dir = &state.core.config.models_dir;
    if file_ok && models_dir.join(id).exists() {
        return Ok(JobModel {
            file: id.to_string(),
            ..Default::default()
        });
    }
    let message = format!(
        "{param} {id:?} is not a model here; accepted: {}",
        accepted(state).await?.join(", ")
    );
    Err(if file_ok {
        ApiError::not_found(message).with_param(param)
    } else {
        ApiError::invalid(param, message)
    })
}

/// Every name `model_id` accepts, in the order `GET /v1/models` lists them, then the
/// model files in the models folder.
async fn accepted(state: &AppState) -> Result<Vec<String>, ApiError> {
    let adapters = state.core.db.list_adapters().await?;
    let mut names: Vec<String> = state
        .core
        .assistants
        .list()
        .await?
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.push("base".into());
    names.extend(
        adapters
            .iter()
            .filter(|a| state.core.adapters.mismatch(a).is_none())
            .map(|a| a.name.clone()),
    );
    let mut files: Vec<String> = std::fs::read_dir(&state.core.config.models_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| crate::files::safe_file_name(n).is_ok())
        .collect();
    files.sort();
    names.extend(files);
    names.dedup();
    Ok(names.into_iter().map(|n| format!("{n:?}")).collect())
}
