//! The assistants page: every assistant on the served model with its system prompt,
//! generation settings, activation policy, active adapter and routes; forms to create,
//! change and delete assistants and to add and remove routes (the same service the API's
//! `/api/v1/assistants` uses).

use super::{fail, field};
use crate::assistant_api::{AssistantView, assistant_view};
use crate::auth::AdminSession;
use crate::console::{Console, FormPairs, QueryPairs, csrf_field, layout};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::extract::Path;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use loraloop_core::gate::ActivationPolicy;
use loraloop_core::service::AssistantForm;
use loraloop_core::storage::ROUTE_SCOPES;
use maud::{Markup, html};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/assistants", get(list).post(create))
        .route("/assistants/{name}", post(update))
        .route("/assistants/{name}/delete", post(delete))
        .route("/assistants/{name}/routes", post(add_route))
        .route("/assistants/{name}/routes/{id}/delete", post(delete_route))
}

/// What the last action did, by a fixed code.
fn notice(code: &str) -> Option<&'static str> {
    match code {
        "created" => Some(
            "The assistant was created. Add a route to send chats to it, or call it by name on /v1/chat/completions.",
        ),
        "saved" => Some("Saved: the next reply uses these settings."),
        "deleted" => Some("The assistant was deleted."),
        "routed" => Some("Route added: new messages there go to this assistant."),
        "unrouted" => Some("Route removed."),
        _ => None,
    }
}

async fn list(Console { state, session }: Console, QueryPairs(pairs): QueryPairs) -> Response {
    page(&state, &session, notice(field(&pairs, "ok")), None).await
}

async fn page(
    state: &AppState,
    session: &AdminSession,
    ok: Option<&str>,
    error: Option<&ApiError>,
) -> Response {
    let default = state.core.assistants.default_name().to_string();
    let mut rows = match state.core.assistants.list().await {
        Ok(a) => a,
        Err(e) => return fail(session, &e.into()),
    };
    rows.sort_by_key(|a| (a.name != default, a.id));
    let mut views = Vec::new();
    for a in rows {
        match assistant_view(state, a).await {
            Ok(v) => views.push(v),
            Err(e) => return fail(session, &e),
        }
    }
    let mut resp = layout(
        "Assistants",
        Some(session),
        "/assistants",
        html! {
            h1 { "Assistants" }
            p.hint {
                "Each assistant runs the served model " (state.core.model.name)
                " with its own system prompt, generation settings, adapters and activation policy. "
                "Routes send a Telegram bot or chat, or a Discord application, server or channel to one; "
                "everything else goes to the default assistant. On /v1/chat/completions, model names an assistant."
            }
            @if let Some(m) = ok { p.ok role="status" id="assistant-notice" { (m) } }
            @if let Some(e) = error { p.error role="alert" id="assistant-error" { (e.message) } }
            @for v in &views { (assistant_card(session, v)) }
            section.card id="new-assistant" {
                h2 { "New assistant" }
                form method="post" action="/assistants" id="new-assistant-form" {
                    (csrf_field(session))
                    label { "Name" input name="name" id="new-assistant-name" required maxlength="64" pattern="[A-Za-z0-9_.\\-]+"; span.hint { "Letters, digits, '-', '_', '.': also its model name on the OpenAI endpoint." } }
                    (settings_fields(None))
                    button type="submit" { "Create" }
                }
            }
        },
    );
    if let Some(e) = error {
        *resp.status_mut() = e.status;
    }
    resp
}

/// The fields an assistant's settings are edited with (empty for a new one).
fn settings_fields(v: Option<&AssistantView>) -> Markup {
    let prompt = v.map_or(loraloop_core::config::DEFAULT_SYSTEM_PROMPT, |v| {
        v.system_prompt.as_str()
    });
    let generation = v.map_or("{}".to_string(), |v| v.generation.to_string());
    let policy = v.filter(|v| v.activation_set).map_or("", |v| v.activation);
    html! {
        label { "System prompt" textarea name="system_prompt" rows="3" { (prompt) } }
        label {
            "Generation settings (JSON)"
            input name="generation" value=(generation) class="mono";
            span.hint { "Over the config's generation: temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, stop. {} keeps the config's." }
        }
        label {
            "Activation of its jobs' adapters"
            select name="activation" {
                option value="" selected[policy.is_empty()] { "The config's (assistant.activation)" }
                @for p in ActivationPolicy::ALL.map(ActivationPolicy::as_str) {
                    option value=(p) selected[policy == p] { (p) }
                }
            }
        }
    }
}

fn assistant_card(session: &AdminSession, v: &AssistantView) -> Markup {
    let base = format!("/assistants/{}", v.name);
    html! {
        section.card.assistant id=(format!("assistant-{}", v.name)) data-name=(v.name) {
            h2 {
                (v.name)
                @if v.default { " " span.badge { "default" } }
            }
            p {
                "Answers with " strong.active-adapter { (v.active_adapter.as_deref().unwrap_or("the base model")) }
                " · activation " strong { (v.activation) }
                " · " a href=(format!("/adapters?assistant={}", v.name)) { "adapters" }
                " · " a href=(format!("/playground?assistant={}", v.name)) { "playground" }
            }
            form method="post" action=(base.clone()) class="assistant-settings" {
                (csrf_field(session))
                (settings_fields(Some(v)))
                button type="submit" { "Save" }
            }
            h3 { "Routes" }
            @if v.routes.is_empty() {
                p.muted { @if v.default { "None needed: it answers wherever no route names another assistant." } @else { "No routes yet: only the OpenAI endpoint reaches it." } }
            } @else {
                table.routes {
                    thead { tr { th { "Platform" } th { "Scope" } th { "Id" } th { "" } } }
                    tbody {
                        @for r in &v.routes {
                            tr data-route=(r.id) {
                                td { (r.platform) } td { (r.scope) } td.mono { (r.key) }
                                td {
                                    form.inline method="post" action=(format!("{base}/routes/{}/delete", r.id)) {
                                        (csrf_field(session))
                                        button.secondary type="submit" { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            form.inline method="post" action=(format!("{base}/routes")) class="add-route" {
                (csrf_field(session))
                select name="route" aria-label="What to route" {
                    @for (platform, scopes) in ROUTE_SCOPES {
                        @for scope in scopes.iter() {
                            option value=(format!("{platform}:{scope}")) { (platform) " " (scope) }
                        }
                    }
                }
                input name="key" placeholder="id" required maxlength="64" aria-label="Id" class="mono";
                label { input type="checkbox" name="move" value="1"; " move it here" }
                button type="submit" { "Add route" }
            }
            @if !v.default {
                form.inline method="post" action=(format!("{base}/delete")) {
                    (csrf_field(session))
                    button.secondary.danger type="submit" { "Delete assistant" }
                }
            }
        }
    }
}

fn form_of(pairs: &[(String, String)]) -> Result<AssistantForm, ApiError> {
    let generation = match field(pairs, "generation").trim() {
        "" => serde_json::json!({}),
        text => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                "generation",
                format!("the generation settings are not JSON: {e}"),
            )
        })?,
    };
    Ok(AssistantForm {
        system_prompt: field(pairs, "system_prompt").to_string(),
        generation,
        activation: Some(field(pairs, "activation").to_string()).filter(|p| !p.is_empty()),
    })
}

/// Back to the page with the notice `ok`, or the page again with the error.
async fn finish<T>(
    state: &AppState,
    session: &AdminSession,
    result: Result<T, ApiError>,
    ok: &str,
) -> Response {
    match result {
        Ok(_) => Redirect::to(&format!("/assistants?ok={ok}")).into_response(),
        Err(e) => page(state, session, None, Some(&e)).await,
    }
}

async fn create(Console { state, session }: Console, FormPairs(pairs): FormPairs) -> Response {
    let result = async {
        let form = form_of(&pairs)?;
        let a = state
            .core
            .assistants
            .create(field(&pairs, "name").trim(), &form)
            .await?;
        crate::audit::record(&state, crate::audit::CONSOLE, "create assistant", &a.name).await;
        Ok::<_, ApiError>(a)
    }
    .await;
    finish(&state, &session, result, "created").await
}

async fn named(
    state: &AppState,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<loraloop_core::storage::Assistant, ApiError> {
    let Path(name) = name.map_err(|_| ApiError::not_found("there is nothing at this address"))?;
    Ok(state.core.assistants.named(&name, "name").await?)
}

/// A change to the assistant the path names, then back to the page as `finish` says.
async fn change_named<T>(
    state: &AppState,
    session: &AdminSession,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    ok: &str,
    change: impl AsyncFnOnce(loraloop_core::storage::Assistant) -> Result<T, ApiError>,
) -> Response {
    let result = async { change(named(state, name).await?).await }.await;
    finish(state, session, result, ok).await
}

async fn update(
    Console { state, session }: Console,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    FormPairs(pairs): FormPairs,
) -> Response {
    change_named(&state, &session, name, "saved", async |a| {
        let form = form_of(&pairs)?;
        let a = state.core.assistants.update(a.id, &form).await?;
        crate::audit::record(&state, crate::audit::CONSOLE, "update assistant", &a.name).await;
        Ok(a)
    })
    .await
}

async fn delete(
    Console { state, session }: Console,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    change_named(&state, &session, name, "deleted", async |a| {
        state.core.assistants.delete(&a).await?;
        crate::audit::record(&state, crate::audit::CONSOLE, "delete assistant", &a.name).await;
        Ok(())
    })
    .await
}

async fn add_route(
    Console { state, session }: Console,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    FormPairs(pairs): FormPairs,
) -> Response {
    change_named(&state, &session, name, "routed", async |a| {
        let (platform, scope) = field(&pairs, "route")
            .split_once(':')
            .ok_or_else(|| ApiError::invalid("route", "choose what to route"))?;
        Ok(state
            .core
            .assistants
            .set_route(
                &a,
                platform,
                scope,
                field(&pairs, "key"),
                field(&pairs, "move") == "1",
            )
            .await?)
    })
    .await
}

async fn delete_route(
    Console { state, session }: Console,
    p: Result<Path<(String, i64)>, axum::extract::rejection::PathRejection>,
) -> Response {
    let result = async {
        let Path((name, id)) =
            p.map_err(|_| ApiError::not_found("there is nothing at this address"))?;
        let a = state.core.assistants.named(&name, "name").await?;
        Ok(state.core.assistants.delete_route(&a, id).await?)
    }
    .await;
    finish(&state, &session, result, "unrouted").await
}
