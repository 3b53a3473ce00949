//! `/api/v1/assistants`: the assistants on the served model (name, system prompt,
//! generation settings, activation policy, active adapter) and their routes. Endpoints
//! that act on one assistant's adapters or canary take `?assistant=NAME` (default: the
//! default assistant).

use crate::error::{ApiError, ErrorBody};
use crate::path_params::AssistantName;
use crate::state::AppState;
use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use loraloop_core::service::AssistantForm;
use loraloop_core::storage::{Assistant, Route};
use serde::{Deserialize, Serialize};

/// `?assistant=NAME` on the endpoints that act on one assistant.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AssistantQuery {
    /// The assistant (default: the default assistant, `assistant.name` in the config).
    pub assistant: Option<String>,
}

/// The assistant a request names (the default one when it names none).
pub async fn assistant_named(
    state: &AppState,
    name: Option<&str>,
    param: &str,
) -> Result<Assistant, ApiError> {
    let a = &state.core.assistants;
    Ok(match name.map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => a.named(n, param).await?,
        None => a.default_assistant().await?,
    })
}

/// [`assistant_named`] from the `?assistant=` query.
pub async fn query_assistant(
    state: &AppState,
    q: Result<Query<AssistantQuery>, QueryRejection>,
) -> Result<Assistant, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    assistant_named(state, q.assistant.as_deref(), "assistant").await
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RouteView {
    pub id: i64,
    /// `telegram` or `discord`.
    pub platform: String,
    /// Telegram: `bot` or `chat`; Discord: `application`, `guild` or `channel`.
    pub scope: String,
    /// The bot, chat, application, server or channel id.
    pub key: String,
}

impl From<Route> for RouteView {
    fn from(r: Route) -> Self {
        Self {
            id: r.id,
            platform: r.platform,
            scope: r.scope,
            key: r.key,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Assistant)]
pub struct AssistantView {
    pub object: &'static str,
    pub id: i64,
    /// Also the OpenAI endpoint's `model` for this assistant.
    pub name: String,
    /// True for the assistant that answers wherever no route names another.
    pub default: bool,
    pub system_prompt: String,
    /// The settings it sets itself (over the config's `generation:`).
    #[schema(value_type = Object)]
    pub generation: serde_json::Value,
    /// What it generates with: its settings over the config's.
    #[schema(value_type = Object)]
    pub effective_generation: serde_json::Value,
    /// `manual`, `gate` or `canary`: what happens to its jobs' adapters.
    pub activation: &'static str,
    /// True when the policy is its own (false: the config's `assistant.activation`).
    pub activation_set: bool,
    pub active_adapter_id: Option<i64>,
    pub active_adapter: Option<String>,
    pub routes: Vec<RouteView>,
}

pub async fn assistant_view(state: &AppState, a: Assistant) -> Result<AssistantView, ApiError> {
    let core = &state.core;
    let routes = core
        .assistants
        .routes()
        .await?
        .into_iter()
        .filter(|r| r.assistant_id == a.id)
        .map(RouteView::from)
        .collect();
    let active_adapter = match a.active_adapter_id {
        Some(id) => core.db.adapter(id).await.ok().map(|r| r.name),
        None => None,
    };
    Ok(AssistantView {
        object: "assistant",
        id: a.id,
        default: a.name == core.assistants.default_name(),
        system_prompt: a.system_prompt.clone(),
        generation: serde_json::from_str(&a.generation).unwrap_or_default(),
        effective_generation: serde_json::to_value(core.assistants.generation(&a))
            .unwrap_or_default(),
        activation: core.assistants.policy(&a).as_str(),
        activation_set: a.activation.is_some(),
        active_adapter_id: a.active_adapter_id,
        active_adapter,
        routes,
        name: a.name,
    })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantList {
    pub object: &'static str,
    pub data: Vec<AssistantView>,
}

/// Every assistant, the default one first, with its routes.
#[utoipa::path(get, path = "/api/v1/assistants",
    responses((status = 200, body = AssistantList), (status = 401, body = ErrorBody)))]
pub async fn list_assistants(
    State(state): State<AppState>,
) -> Result<Json<AssistantList>, ApiError> {
    let mut data = Vec::new();
    let mut all = state.core.assistants.list().await?;
    let default = state.core.assistants.default_name().to_string();
    all.sort_by_key(|a| (a.name != default, a.id));
    for a in all {
        data.push(assistant_view(&state, a).await?);
    }
    Ok(Json(AssistantList {
        object: "list",
        data,
    }))
}

/// A new assistant's settings, or a change to one (unset fields keep their value).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssistantRequest {
    /// Required to create; a name cannot change.
    pub name: Option<String>,
    pub system_prompt: Option<String>,
    /// Generation settings over the config's: temperature, top_p, top_k,
    /// repetition_penalty, max_new_tokens, seed, stop.
    #[schema(value_type = Option<Object>)]
    pub generation: Option<serde_json::Value>,
    /// `manual`, `gate` or `canary`; empty: the config's `assistant.activation`.
    pub activation: Option<String>,
    /// Routes to add: each `{platform, scope, key}`.
    pub routes: Option<Vec<RouteRequest>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    /// `telegram` or `discord`.
    pub platform: String,
    /// Telegram: `bot` (the part of its token before the colon) or `chat`; Discord:
    /// `application`, `guild` or `channel`.
    pub scope: String,
    /// The id, as a string or a number.
    #[schema(value_type = String)]
    pub key: serde_json::Value,
    /// Take the route from the assistant it sends its chats to now (without it, that is
    /// a 409 that changes nothing).
    #[serde(default, rename = "move")]
    pub take_over: bool,
}

impl RouteRequest {
    fn key(&self) -> Result<String, ApiError> {
        match &self.key {
            serde_json::Value::String(s) => Ok(s.trim().to_string()),
            serde_json::Value::Number(n) if n.is_i64() => Ok(n.to_string()),
            _ => Err(ApiError::invalid("key", "an id: a string or an integer")),
        }
    }
}

fn form(req: &AssistantRequest, old: Option<&Assistant>) -> AssistantForm {
    AssistantForm {
        system_prompt: req
            .system_prompt
            .clone()
            .or_else(|| old.map(|a| a.system_prompt.clone()))
            .unwrap_or_else(|| loraloop_core::config::DEFAULT_SYSTEM_PROMPT.to_string()),
        generation: req.generation.clone().unwrap_or_else(|| {
            old.and_then(|a| serde_json::from_str(&a.generation).ok())
                .unwrap_or_else(|| serde_json::json!({}))
        }),
        activation: match &req.activation {
            Some(p) => Some(p.clone()),
            None => old.and_then(|a| a.activation.clone()),
        },
    }
}

/// Each route's key, checked before anything is stored (a request with a bad route
/// changes nothing).
fn checked_routes(routes: &[RouteRequest]) -> Result<Vec<String>, ApiError> {
    let mut keys = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let key = r
            .key()
            .map_err(|e| e.with_param(format!("routes.{i}.key")))?;
        loraloop_core::storage::validate_route(&r.platform, &r.scope, &key)
            .map_err(|e| ApiError::from(e).with_param(format!("routes.{i}")))?;
        keys.push(key);
    }
    Ok(keys)
}

/// A 409 when a route sends its chats to another assistant and does not say `move`
/// (`a`: the assistant the routes are for, None when it is not created yet).
async fn check_routes_free(
    state: &AppState,
    a: Option<&Assistant>,
    routes: &[RouteRequest],
    keys: &[String],
) -> Result<(), ApiError> {
    for (i, (r, key)) in routes.iter().zip(keys).enumerate() {
        if !r.take_over {
            state
                .core
                .assistants
                .check_route_free(a, &r.platform, &r.scope, key)
                .await
                .map_err(|e| ApiError::from(e).with_param(format!("routes.{i}")))?;
        }
    }
    Ok(())
}

async fn add_routes(
    state: &AppState,
    a: &Assistant,
    routes: &[RouteRequest],
    keys: &[String],
) -> Result<(), ApiError> {
    for (i, (r, key)) in routes.iter().zip(keys).enumerate() {
        state
            .core
            .assistants
            .set_route(a, &r.platform, &r.scope, key, r.take_over)
            .await
            .map_err(|e| ApiError::from(e).with_param(format!("routes.{i}")))?;
    }
    Ok(())
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError::invalid("body", e.body_text()))
}

/// Create an assistant on the served model. Its `name` is also the OpenAI endpoint's
/// `model`; routes send Telegram or Discord chats to it.
#[utoipa::path(post, path = "/api/v1/assistants", request_body = AssistantRequest,
    responses((status = 201, body = AssistantView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_assistant(
    State(state): State<AppState>,
    b: Result<Json<AssistantRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AssistantView>), ApiError> {
    let req = body(b)?;
    let name = req
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid("name", "an assistant needs a name"))?;
    let routes = req.routes.as_deref().unwrap_or_default();
    let keys = checked_routes(routes)?;
    check_routes_free(&state, None, routes, &keys).await?;
    let a = state
        .core
        .assistants
        .create(name, &form(&req, None))
        .await?;
    add_routes(&state, &a, routes, &keys).await?;
    crate::audit::record(&state, crate::audit::API, "create assistant", &a.name).await;
    Ok((StatusCode::CREATED, Json(assistant_view(&state, a).await?)))
}

/// One assistant.
#[utoipa::path(get, path = "/api/v1/assistants/{name}", params(("name" = String, Path)),
    responses((status = 200, body = AssistantView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_assistant(
    State(state): State<AppState>,
    AssistantName(name): AssistantName,
) -> Result<Json<AssistantView>, ApiError> {
    let a = state.core.assistants.named(&name, "name").await?;
    Ok(Json(assistant_view(&state, a).await?))
}

/// Change an assistant's system prompt, generation settings or activation policy, or add
/// routes. The next reply uses the new settings.
#[utoipa::path(patch, path = "/api/v1/assistants/{name}", params(("name" = String, Path)), request_body = AssistantRequest,
    responses((status = 200, body = AssistantView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_assistant(
    State(state): State<AppState>,
    AssistantName(name): AssistantName,
    b: Result<Json<AssistantRequest>, JsonRejection>,
) -> Result<Json<AssistantView>, ApiError> {
    let old = state.core.assistants.named(&name, "name").await?;
    let req = body(b)?;
    if req.name.as_deref().is_some_and(|n| n != old.name) {
        return Err(ApiError::invalid(
            "name",
            "a name cannot change (conversations, clients and routes know it): create another assistant",
        ));
    }
    let routes = req.routes.as_deref().unwrap_or_default();
    let keys = checked_routes(routes)?;
    check_routes_free(&state, Some(&old), routes, &keys).await?;
    let a = state
        .core
        .assistants
        .update(old.id, &form(&req, Some(&old)))
        .await?;
    add_routes(&state, &a, routes, &keys).await?;
    crate::audit::record(&state, crate::audit::API, "update assistant", &a.name).await;
    Ok(Json(assistant_view(&state, a).await?))
}

/// Delete an assistant without conversations (never the default one). Its jobs, datasets
/// and adapters stay, tied to no assistant.
#[utoipa::path(delete, path = "/api/v1/assistants/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn delete_assistant(
    State(state): State<AppState>,
    AssistantName(name): AssistantName,
) -> Result<StatusCode, ApiError> {
    let a = state.core.assistants.named(&name, "name").await?;
    state.core.assistants.delete(&a).await?;
    crate::audit::record(&state, crate::audit::API, "delete assistant", &a.name).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Send a Telegram bot or chat, or a Discord application, server or channel to this
/// assistant (a route already sending it elsewhere moves only with `"move": true`).
#[utoipa::path(post, path = "/api/v1/assistants/{name}/routes", params(("name" = String, Path)), request_body = RouteRequest,
    responses((status = 201, body = RouteView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn add_route(
    State(state): State<AppState>,
    AssistantName(name): AssistantName,
    b: Result<Json<RouteRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<RouteView>), ApiError> {
    let a = state.core.assistants.named(&name, "name").await?;
    let r = body(b)?;
    let key = r.key()?;
    let route = state
        .core
        .assistants
        .set_route(&a, &r.platform, &r.scope, &key, r.take_over)
        .await?;
    Ok((StatusCode::CREATED, Json(route.into())))
}

/// Remove a route: what it sent here goes to the next matching route, or the default
/// assistant.
#[utoipa::path(delete, path = "/api/v1/assistants/{name}/routes/{id}", params(("name" = String, Path), ("id" = i64, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_route(
    State(state): State<AppState>,
    p: Result<Path<(String, i64)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path((name, id)) = p.map_err(|e| ApiError::not_found(e.body_text()))?;
    let a = state.core.assistants.named(&name, "name").await?;
    state.core.assistants.delete_route(&a, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
