//! The playground: the operator chats with an assistant as it is now (`?assistant=NAME`,
//! else the default one), with the base model or with a chosen adapter. Every turn is stored (with the adapter that wrote the
//! reply) through the chat service, like any other conversation.

use super::{ChosenAssistant, fail, field};
use crate::auth::{AdminSession, url_decode_pairs};
use crate::console::{Console, QueryPairs, csrf_field, layout};
use crate::error::{ApiError, parse_json};
use crate::state::AppState;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use loraloop_core::service::Turn;
use loraloop_core::storage::Assistant;
use loraloop_model::engine::{AdapterChoice, Event};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;

/// Messages of the current conversation the page shows.
const SHOWN_MESSAGES: i64 = 200;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/playground", get(show))
        .route("/playground/send", post(send))
        .route("/playground/new", post(new_conversation))
}

async fn show(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    page(&state, &session, &assistant, field(&pairs, "adapter"), None).await
}

async fn page(
    state: &AppState,
    session: &AdminSession,
    assistant: &Assistant,
    selected: &str,
    error: Option<&ApiError>,
) -> Response {
    let conversation = match state.core.chat.playground_shown(assistant).await {
        Ok(c) => c,
        Err(e) => return fail(session, &ApiError::from(e)),
    };
    let messages = match conversation {
        None => Vec::new(),
        Some(c) => match state.core.db.recent_messages(c, SHOWN_MESSAGES).await {
            Ok(m) => m,
            Err(e) => return fail(session, &e.into()),
        },
    };
    let views = crate::adapter_views::adapter_views(state, assistant)
        .await
        .unwrap_or_default();
    let active = views.iter().find(|v| v.active).map(|v| v.name.clone());
    let assistants = state.core.assistants.list().await.unwrap_or_default();
    let selected = if selected.is_empty() {
        "active"
    } else {
        selected
    };
    let mut resp = layout(
        "Playground",
        Some(session),
        "/playground",
        html_page(
            session,
            &Shown {
                assistant,
                assistants: &assistants,
                conversation,
                messages: &messages,
                views: &views,
                active: active.as_deref(),
                selected,
            },
            error,
        ),
    );
    if let Some(e) = error {
        *resp.status_mut() = e.status;
    }
    resp
}

/// What the playground page shows.
struct Shown<'a> {
    assistant: &'a Assistant,
    assistants: &'a [Assistant],
    /// None until the first message starts one.
    conversation: Option<i64>,
    messages: &'a [loraloop_core::storage::StoredMessage],
    views: &'a [crate::adapter_views::AdapterView],
    active: Option<&'a str>,
    selected: &'a str,
}

fn html_page(session: &AdminSession, s: &Shown, error: Option<&ApiError>) -> maud::Markup {
    let Shown {
        assistant,
        assistants,
        conversation,
        messages,
        views,
        active,
        selected,
    } = *s;
    let q = format!("?assistant={}", assistant.name);
    maud::html! {
        h1 { "Playground" }
        @if assistants.len() > 1 {
            nav.tabs id="assistant-tabs" aria-label="Assistant" {
                @for a in assistants {
                    a href=(format!("/playground?assistant={}", a.name)) aria-current=[(a.id == assistant.id).then_some("page")] { (a.name) }
                }
            }
        }
        p.hint {
            "Talk to " strong id="playground-assistant" { (assistant.name) } ". Every turn is stored "
            @match conversation {
                Some(c) => { "in conversation #" (c) }
                None => { "in a new conversation" }
            }
            " with the adapter that answered. Active now: " strong { (active.unwrap_or("base model")) } "."
        }
        @if let Some(e) = error { p.error role="alert" id="chat-error" { (e.message) } }
        div id="chat-log" class="chat-log" aria-live="polite" data-conversation=[conversation] {
            @if messages.is_empty() { p.muted.empty-chat { "No messages yet." } }
            @for m in messages {
                @if m.role == "assistant" {
                    div class="msg assistant" data-adapter=(m.adapter_name.as_deref().unwrap_or("base")) data-message-id=(m.id) {
                        div.meta { "assistant · " (m.adapter_name.as_deref().unwrap_or("base")) }
                        div.text { (m.content) }
                    }
                } @else {
                    div class=(format!("msg {}", m.role)) data-message-id=(m.id) {
                        div.meta { (m.role) }
                        div.text { (m.content) }
                    }
                }
            }
        }
        form.card method="post" action=(format!("/playground/send{q}")) id="chat-form" {
            (csrf_field(session))
            label {
                "Message"
                textarea name="message" id="chat-input" rows="3" required placeholder="Say something…" {}
            }
            div.row {
                label {
                    "Answer with"
                    select name="adapter" id="adapter-select" {
                        option value="active" selected[selected == "active"] { "The assistant now (" (active.unwrap_or("base model")) ")" }
                        option value="base" selected[selected == "base"] { "Base model" }
                        @for v in views.iter().filter(|v| v.incompatible.is_none()) {
                            option value=(v.name) selected[selected == v.name] { (v.name) }
                        }
                    }
                }
                button type="submit" id="chat-send" { "Send" }
            }
        }
        form method="post" action=(format!("/playground/new{q}")) id="new-conversation-form" {
            (csrf_field(session))
            button.secondary type="submit" id="new-conversation" { "New conversation" }
        }
    }
}

async fn new_conversation(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
) -> Response {
    match state
        .core
        .chat
        .playground_conversation(&assistant, true)
        .await
    {
        Ok(_) => Redirect::to(&format!("/playground?assistant={}", assistant.name)).into_response(),
        Err(e) => fail(&session, &ApiError::from(e)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    message: String,
    #[serde(default)]
    adapter: Option<String>,
}

/// What a playground choice runs on: `active` (or nothing: the assistant's active
/// adapter), `base`, an adapter name.
async fn choice_for(
    state: &AppState,
    assistant: &Assistant,
    sel: &str,
) -> Result<AdapterChoice, ApiError> {
    match sel {
        "" | "active" => Ok(state.core.adapters.choice(&assistant.name).await?),
        other => Ok(state.core.adapters.choice(other).await?),
    }
}

/// Store the user's message in the playground conversation and start the reply.
async fn begin(
    state: &AppState,
    assistant: &Assistant,
    message: &str,
    adapter: &str,
) -> Result<Turn, ApiError> {
    let choice = choice_for(state, assistant, adapter).await?;
    Ok(state
        .core
        .chat
        .start_playground_turn(assistant, message, choice)
        .await?)
}

/// `POST /playground/send`. JSON `{message, adapter}` (the page's script): server-sent
/// events `started`, `text` (a JSON string per piece), then `done` with the stored
/// message's id and the adapter, or `error`. A plain form post (no script) waits for
/// the reply and goes back to the page.
async fn send(
    Console { state, session }: Console,
    ChosenAssistant(assistant): ChosenAssistant,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        let req: SendBody = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
        let adapter = req.adapter.unwrap_or_default();
        return match begin(&state, &assistant, &req.message, &adapter).await {
            Ok(turn) => stream(state, turn),
            Err(e) => e.into_response(),
        };
    }
    let pairs = url_decode_pairs(&String::from_utf8_lossy(&body));
    let (message, adapter) = (field(&pairs, "message"), field(&pairs, "adapter"));
    let turn = match begin(&state, &assistant, message, adapter).await {
        Ok(t) => t,
        Err(e) => return page(&state, &session, &assistant, adapter, Some(&e)).await,
    };
    let Turn {
        conversation_id,
        generation,
        mut in_flight,
        ..
    } = turn;
    let finished = generation.finish().await;
    let stored = match finished {
        Ok(f) => {
            in_flight.finished(f.completion_tokens, f.decode_secs);
            drop(in_flight);
            state
                .core
                .chat
                .store_reply(conversation_id, &f)
                .await
                .map_err(ApiError::from)
        }
        Err(m) => {
            in_flight.failed();
            Err(ApiError::internal(format!("generation failed: {m}")))
        }
    };
    match stored {
        Ok(_) => {
            let q: String = adapter
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .collect();
            Redirect::to(&format!(
                "/playground?assistant={}&adapter={q}",
                assistant.name
            ))
            .into_response()
        }
        Err(e) => page(&state, &session, &assistant, adapter, Some(&e)).await,
    }
}

fn stream(state: AppState, turn: Turn) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(256);
    tokio::spawn(async move {
        let Turn {
            conversation_id,
            user_message,
            mut generation,
            mut in_flight,
        } = turn;
        let event = |name: &str, data: serde_json::Value| {
            Ok(SseEvent::default().event(name).data(data.to_string()))
        };
        // A client that left does not stop the turn: the reply is still stored, so the
        // conversation has no question without its answer.
        while let Some(e) = generation.next().await {
            match e {
                Event::Queued { position } => {
                    let _ = tx
                        .send(event("queued", json!({"position": position})))
                        .await;
                }
                Event::Started { adapter } => {
                    let name = adapter.map_or("base".to_string(), |t| t.name);
                    let _ = tx
                        .send(event(
                            "started",
                            json!({"adapter": name, "user_message_id": user_message.id}),
                        ))
                        .await;
                }
                Event::Text(t) => {
                    let _ = tx.send(event("text", json!(t))).await;
                }
                Event::Finished(f) => {
                    in_flight.finished(f.completion_tokens, f.decode_secs);
                    let adapter = f
                        .adapter
                        .as_ref()
                        .map_or("base".to_string(), |t| t.name.clone());
                    let data = match state.core.chat.store_reply(conversation_id, &f).await {
                        Ok(m) => event(
                            "done",
                            json!({
                                "message_id": m.id,
                                "user_message_id": user_message.id,
                                "adapter": adapter,
                                "completion_tokens": f.completion_tokens,
                            }),
                        ),
                        Err(e) => event("error", json!({"message": ApiError::from(e).message})),
                    };
                    let _ = tx.send(data).await;
                    return;
                }
                Event::Failed(m) => {
                    in_flight.failed();
                    tracing::error!("playground generation failed: {m}");
                    let _ = tx
                        .send(event(
                            "error",
                            json!({"message": "the generation failed (the server log has the details)"}),
                        ))
                        .await;
                    return;
                }
            }
        }
        let _ = tx
            .send(event("error", json!({"message": "the engine stopped"})))
            .await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
