//! The assistants on the served model: the default one (the config's `assistant:`), those
//! the config's `assistants:` declares and those made in the console or the API; which one
//! a bot message is routed to; each one's generation settings and activation policy.

use crate::assistant_settings::{AssistantEntry, GenerationOverrides};
use crate::config::GenerationConfig;
use crate::error::{Result, ServiceError};
use crate::gate::ActivationPolicy;
use crate::service::adapters::reserved_model_name;
use crate::storage::{Assistant, AssistantSettings, Db, Route};
use loraloop_model::sampling::SamplingParams;

pub struct AssistantService {
    pub(super) db: Db,
    /// The default assistant's name: it answers wherever no route names another.
    pub(super) default_name: String,
    /// The model file name new assistants record (they all run the served model).
    pub(super) base_model: String,
    /// `generation:` in the config, under every assistant's own settings.
    pub(super) generation: GenerationConfig,
    /// `assistant.activation`: the policy of an assistant that sets none.
    pub(super) default_policy: ActivationPolicy,
}

/// What a console form or an API request sets on an assistant.
#[derive(Debug, Clone, Default)]
pub struct AssistantForm {
    pub system_prompt: String,
    /// A JSON object of generation settings (`{}`: the config's).
    pub generation: serde_json::Value,
    /// `manual`, `gate` or `canary`; None: the config's `assistant.activation`.
    pub activation: Option<String>,
}

impl AssistantService {
    pub fn default_name(&self) -> &str {
        &self.default_name
    }

    /// The default assistant as stored now.
    pub async fn default_assistant(&self) -> Result<Assistant> {
        Ok(self.db.assistant(&self.default_name).await?)
    }

    /// The assistant with this name; the error names `param` and lists the names there are.
    pub async fn named(&self, name: &str, param: &str) -> Result<Assistant> {
        match self.db.assistant(name).await {
            Ok(a) => Ok(a),
            Err(crate::storage::StorageError::NotFound { .. }) => {
                let names: Vec<String> = self
                    .db
                    .list_assistants()
                    .await?
                    .into_iter()
                    .map(|a| a.name)
                    .collect();
                Err(ServiceError::NotFound {
                    message: format!(
                        "there is no assistant {name:?}; there are: {}",
                        names.join(", ")
                    ),
                    param: Some(param.into()),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list(&self) -> Result<Vec<Assistant>> {
        Ok(self.db.list_assistants().await?)
    }

    pub async fn routes(&self) -> Result<Vec<Route>> {
        Ok(self.db.routes().await?)
    }

    /// The assistant that answers a message on `platform` from `places` (scope, id), most
    /// specific first; the default assistant when no route matches.
    pub async fn routed(&self, platform: &str, places: &[(&str, &str)]) -> Result<Assistant> {
        match self.db.routed_assistant(platform, places).await? {
            Some(a) => Ok(a),
            None => self.default_assistant().await,
        }
    }

    /// The assistant's generation settings: its own over the config's.
    pub fn generation(&self, a: &Assistant) -> GenerationConfig {
        GenerationOverrides::stored(&a.generation).over(&self.generation)
    }

    pub fn sampling(&self, a: &Assistant) -> SamplingParams {
        self.generation(a).sampling_params()
    }

    /// How the assistant's finished jobs' adapters reach its users.
    pub fn policy(&self, a: &Assistant) -> ActivationPolicy {
        a.activation
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or(self.default_policy)
    }

    fn checked<'a>(&self, form: &'a AssistantForm) -> Result<(serde_json::Value, Option<&'a str>)> {
        let overrides = GenerationOverrides::from_json(&form.generation, &self.generation)
            .map_err(|(field, message)| {
                let param = if field.is_empty() {
                    "generation".to_string()
                } else {
                    format!("generation.{field}")
                };
                ServiceError::invalid(param, message)
            })?;
        let activation = form.activation.as_deref().filter(|p| !p.is_empty());
        if let Some(p) = activation
            && p.parse::<ActivationPolicy>().is_err()
        {
            return Err(ServiceError::invalid(
                "activation",
                format!("{p:?}: use manual, gate or canary (or nothing: the config's)"),
            ));
        }
        if form.system_prompt.len() > 20_000 {
            return Err(ServiceError::invalid(
                "system_prompt",
                "at most 20000 bytes: the prompt is sent with every reply",
            ));
        }
        Ok((overrides.to_json(), activation))
    }

    pub async fn create(&self, name: &str, form: &AssistantForm) -> Result<Assistant> {
        let (generation, activation) = self.checked(form)?;
        // The OpenAI endpoint's `model` names assistants, adapters and the base model
        // alike (a taken assistant name is the storage's conflict).
        let taken = reserved_model_name(name, &self.base_model)
            || self.db.adapter_named(name).await?.is_some();
        if taken {
            return Err(ServiceError::invalid(
                "name",
                format!(
                    "{name:?} already names an adapter or the base model (the OpenAI endpoint's model names both)"
                ),
            ));
        }
        Ok(self
            .db
            .create_assistant(
                name,
                &self.base_model,
                &AssistantSettings {
                    system_prompt: &form.system_prompt,
                    generation: &generation,
                    activation,
                },
            )
            .await?)
    }

    pub async fn update(&self, id: i64, form: &AssistantForm) -> Result<Assistant> {
        let (generation, activation) = self.checked(form)?;
        Ok(self
            .db
            .update_assistant(
                id,
                &AssistantSettings {
                    system_prompt: &form.system_prompt,
                    generation: &generation,
                    activation,
                },
            )
            .await?)
    }

    /// Delete an assistant that has no conversations; never the default one.
    pub async fn delete(&self, a: &Assistant) -> Result<()> {
        if a.name == self.default_name {
            return Err(ServiceError::Conflict(format!(
                "{} is the default assistant (assistant.name in the config): it answers wherever no route names another",
                a.name
            )));
        }
        self.db.delete_assistant(a.id).await.map_err(|e| match e {
            crate::storage::StorageError::Invalid { message, .. } => {
                ServiceError::Conflict(format!("{} cannot be deleted: {message}", a.name))
            }
            other => other.into(),
        })
    }

    /// Route `platform`/`scope`/`key` to `a`. A route to another assistant moves only when
    /// `take_over` (it changes who answers those chats); otherwise it is a conflict.
    pub async fn set_route(
        &self,
        a: &Assistant,
        platform: &str,
        scope: &str,
        key: &str,
        take_over: bool,
    ) -> Result<Route> {
        let key = key.trim();
        match self
            .db
            .set_route(a.id, platform, scope, key, take_over)
            .await?
        {
            Some(route) => Ok(route),
            None => {
                let owner = self.db.route_owner(platform, scope, key).await?;
                Err(routed_elsewhere(platform, scope, key, owner.as_deref()))
            }
        }
    }

    /// An error when `platform`/`scope`/`key` routes to an assistant other than `a` (or
    /// to any, for an assistant not created yet).
    pub async fn check_route_free(
        &self,
        a: Option<&Assistant>,
        platform: &str,
        scope: &str,
        key: &str,
    ) -> Result<()> {
        let key = key.trim();
        match self.db.route_owner(platform, scope, key).await? {
            Some(owner) if a.is_none_or(|a| a.name != owner) => {
                Err(routed_elsewhere(platform, scope, key, Some(&owner)))
            }
            _ => Ok(()),
        }
    }

    pub async fn delete_route(&self, a: &Assistant, route_id: i64) -> Result<()> {
        Ok(self.db.delete_route(a.id, route_id).await?)
    }

    /// Create or update the config's `assistants:` and their routes (at start-up).
    pub async fn sync_config(&self, entries: &[AssistantEntry]) -> Result<()> {
        for e in entries {
            let generation = e.generation.to_json();
            let activation = e.activation.map(ActivationPolicy::as_str);
            let a = self
                .db
                .upsert_assistant(
                    &e.name,
                    &self.base_model,
                    &AssistantSettings {
                        system_prompt: &e.system_prompt,
                        generation: &generation,
                        activation,
                    },
                )
                .await?;
            for (platform, scope, key) in e.routes.all() {
                // The config says where its routes go: one routed elsewhere moves here.
                self.db
                    .set_route(a.id, platform, scope, &key, true)
                    .await
                    .map_err(|err| {
                        ServiceError::invalid(
                            format!("assistants.{}.routes", e.name),
                            err.to_string(),
                        )
                    })?;
            }
        }
        Ok(())
    }
}

fn routed_elsewhere(platform: &str, scope: &str, key: &str, owner: Option<&str>) -> ServiceError {
    let owner = owner.map_or("another assistant".to_string(), |o| {
        format!("assistant {o:?}")
    });
    ServiceError::Conflict(format!(
        "{platform} {scope} {key} is routed to {owner}: moving it changes who answers there, so it moves only when asked (the API: \"move\": true with the route; the console: tick \"move it here\")"
    ))
}
