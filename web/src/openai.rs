//! OpenAI-compatible chat: `POST /v1/chat/completions` (streamed or not) and
//! `GET /v1/models`, enough for the official `openai` client. `model` picks the adapter:
//! the assistant's name runs the active adapter, `base` the base model, an adapter's
//! name that adapter. `system_fingerprint` says which adapter (and activation) answered.

use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::path_params::ModelName;
use crate::state::AppState;
use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use loraloop_core::assistant_settings::{MAX_REPETITION_PENALTY, MAX_TEMPERATURE};
use loraloop_core::service::transcripts::{Recorded, Said, record_turn, said_of};
use loraloop_core::storage::{Assistant, Platform};
use loraloop_model::engine::{AdapterTag, Event, FinishReason, Finished, GenerateRequest, Prompt};
use loraloop_model::template::TemplateMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::convert::Infallible;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The assistant's name (active adapter), `base`, or an adapter name.
    pub model: String,
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's: sample among the k most likely tokens (0: no limit).
    pub top_k: Option<usize>,
    /// Not OpenAI's: 1 is off.
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[schema(value_type = Object)]
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// Only 1 is supported.
    pub n: Option<u32>,
    /// Accepted for compatibility; only 0 is supported.
    pub frequency_penalty: Option<f64>,
    /// Accepted for compatibility; only 0 is supported.
    pub presence_penalty: Option<f64>,
    /// Accepted for compatibility; only false is supported.
    pub logprobs: Option<bool>,
    /// The end user: fair shares, the per-user cap and the stored conversation's caller.
    pub user: Option<String>,
    /// OpenAI's newer name for the end user; `user` wins when both are given.
    pub safety_identifier: Option<String>,
    /// OpenAI parameters for what this server cannot do (tools, JSON output, token
    /// biases, audio). Clients send them with their neutral value (null, empty, `none`,
    /// `text`), so that value is accepted; any other is refused by name.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<Vec<Value>>,
    #[schema(value_type = Option<Object>)]
    pub function_call: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub top_logprobs: Option<u32>,
    pub modalities: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    pub audio: Option<Value>,
    /// Accepted and ignored: they change nothing in the reply.
    pub store: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub service_tier: Option<String>,
    pub prompt_cache_key: Option<String>,
}

impl ChatRequest {
    fn end_user(&self) -> Option<&str> {
        self.user.as_deref().or(self.safety_identifier.as_deref())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    /// Null only on an assistant message (OpenAI's shape for one that called a tool).
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    /// The rest of a reply as OpenAI's client hands it back (`message.model_dump()`):
    /// accepted when empty, since a conversation resent whole carries them.
    pub refusal: Option<String>,
    pub annotations: Option<Vec<Value>>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
    pub tool_calls: Option<Vec<Value>>,
}

/// A string, or OpenAI's list of parts (only text parts are understood).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

fn fingerprint(tag: &Option<AdapterTag>) -> String {
    match tag {
        Some(t) => format!("adapter:{}@{}", t.name, t.version),
        None => "base".to_string(),
    }
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The assistant a request's `model` names (None: `base` or an adapter name) and the one
/// whose generation settings it starts from (that one, else the default assistant).
async fn assistant_for(
    state: &AppState,
    model: &str,
) -> Result<(Option<Assistant>, Assistant), ApiError> {
    let a = &state.core.assistants;
    let named = match model {
        "" => Some(a.default_assistant().await?),
        m => state.core.db.assistant(m).await.ok(),
    };
    let settings = match &named {
        Some(n) => n.clone(),
        None => a.default_assistant().await?,
    };
    Ok((named, settings))
}

/// Messages a request may hold: more cannot fit any context window this project runs.
const MAX_MESSAGES: usize = 1024;
/// Bytes in one stop string.
const MAX_STOP_BYTES: usize = 256;

const TOOLS_UNSUPPORTED: &str =
    "tools and function calls are not supported (the model answers in text only)";

/// Refuses an OpenAI parameter that asks for something this server cannot do; its
/// neutral value (what clients send by default) passes.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    let is_str = |v: &Option<Value>, allowed: &[&str]| match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => allowed.contains(&s.as_str()),
        Some(_) => false,
    };
    let text_format = match &req.response_format {
        None | Some(Value::Null) => true,
        Some(f) => f.get("type").and_then(Value::as_str) == Some("text"),
    };
    let refused = [
        (
            "tools",
            req.tools.as_ref().is_some_and(|t| !t.is_empty()),
            TOOLS_UNSUPPORTED,
        ),
        (
            "functions",
            req.functions.as_ref().is_some_and(|t| !t.is_empty()),
            TOOLS_UNSUPPORTED,
        ),
        (
            "tool_choice",
            !is_str(&req.tool_choice, &["none", "auto"]),
            TOOLS_UNSUPPORTED,
        ),
        (
            "function_call",
            !is_str(&req.function_call, &["none", "auto"]),
            TOOLS_UNSUPPORTED,
        ),
        (
            "response_format",
            !text_format,
            "only response_format {\"type\": \"text\"} is supported (no JSON mode)",
        ),
        (
            "logit_bias",
            req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
            "logit_bias is not supported",
        ),
        (
            "top_logprobs",
            req.top_logprobs.is_some_and(|n| n > 0),
            "logprobs are not supported",
        ),
        (
            "modalities",
            req.modalities
                .as_ref()
                .is_some_and(|m| m.iter().any(|m| m != "text")),
            "only the text modality is supported",
        ),
        (
            "audio",
            req.audio.as_ref().is_some_and(|a| !a.is_null()),
            "audio is not supported (text only)",
        ),
    ];
    match refused.into_iter().find(|(_, asked, _)| *asked) {
        Some((param, _, why)) => Err(ApiError::invalid(param, why)),
        None => Ok(()),
    }
}

/// The engine request: the client's messages (after the named assistant's system prompt
/// when they hold none), the assistant's generation settings under the request's.
fn build(
    state: &AppState,
    req: &ChatRequest,
    named: Option<&Assistant>,
    settings: &Assistant,
) -> Result<GenerateRequest, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages is empty"));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} messages is more than the {MAX_MESSAGES} a request may hold (the model reads a few thousand tokens at most)",
                req.messages.len()
            ),
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    for (k, v) in [
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                k,
                format!("{k} is not supported; use repetition_penalty"),
            ));
        }
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    refuse_unsupported(req)?;
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    let has_system = req
        .messages
        .iter()
        .any(|m| matches!(m.role.as_str(), "system" | "developer"));
    if let Some(a) = named
        && !has_system
        && !a.system_prompt.is_empty()
    {
        messages.push(TemplateMessage::new("system", a.system_prompt.clone()));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("role {other:?} is not supported; use system, user or assistant"),
                ));
            }
        };
        if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
            || m.function_call.as_ref().is_some_and(|c| !c.is_null())
        {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls"),
                TOOLS_UNSUPPORTED,
            ));
        }
        if m.audio.as_ref().is_some_and(|a| !a.is_null()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].audio"),
                "audio is not supported (text only)",
            ));
        }
        let text = match &m.content {
            None if role == "assistant" => m.refusal.clone().unwrap_or_default(),
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!("a {role} message needs content"),
                ));
            }
            Some(Content::Text(t)) => t.clone(),
            // Text parts joined by a line break, as vLLM joins them: back to back, two
            // parts' words ran together ("Say" + "hello").
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => texts.push(s.as_str()),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content"),
                                format!(
                                    "content parts of type {kind:?} are not supported (text only)"
                                ),
                            ));
                        }
                    }
                }
                texts.join("\n")
            }
        };
        messages.push(TemplateMessage::new(role, text));
    }
    let mut p = state.core.assistants.sampling(settings);
    if let Some(t) = req.temperature {
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and {MAX_TEMPERATURE}"),
            ));
        }
        p.temperature = t;
    }
    if let Some(t) = req.top_p {
        if !(t > 0.0 && t <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                "top_p must be greater than 0 and at most 1",
            ));
        }
        p.top_p = t;
    }
    if let Some(k) = req.top_k {
        p.top_k = k;
    }
    if let Some(r) = req.repetition_penalty {
        if !(1.0..=MAX_REPETITION_PENALTY).contains(&r) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be between 1 (off) and {MAX_REPETITION_PENALTY}"),
            ));
        }
        p.repetition_penalty = r;
    }
    if let Some(m) = req.max_completion_tokens.or(req.max_tokens) {
        let param = if req.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        if m == 0 || m > state.core.model.context_length {
            return Err(ApiError::invalid(
                param,
                format!(
                    "{param} must be from 1 to {}",
                    state.core.model.context_length
                ),
            ));
        }
        p.max_new_tokens = m;
    }
    let stop_ok = |s: &String| !s.is_empty() && s.len() <= MAX_STOP_BYTES;
    match &req.stop {
        Some(Stop::One(s)) if stop_ok(s) => p.stop = vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 && v.iter().all(stop_ok) => p.stop = v.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop must be a non-empty string of at most {MAX_STOP_BYTES} bytes, or up to 4 of them"
                ),
            ));
        }
        None => {}
    }
    if req.seed.is_some() {
        p.seed = req.seed;
    }
    Ok(GenerateRequest {
        prompt: Prompt::Chat(messages),
        params: p,
        adapter: Default::default(),
        // OpenAI's end-user id: fair shares and the per-user cap (none without it).
        user: req.end_user().map(|u| format!("api:{u}")),
    })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    #[schema(value_type = Vec<Object>)]
    pub choices: Vec<Value>,
    #[schema(value_type = Object)]
    pub usage: Value,
    /// `adapter:NAME@ACTIVATION` or `base`: what produced the reply.
    pub system_fingerprint: String,
}

/// Chat completions, OpenAI-compatible; `"stream": true` sends server-sent events.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, body = ChatCompletion), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let (named, settings) = assistant_for(&state, &req.model).await?;
    let mut gen_req = build(&state, &req, named.as_ref(), &settings)?;
    gen_req.adapter = state.core.adapters.choice(&req.model).await?;
    let said = said(&gen_req);
    let mut in_flight = state.core.metrics.generation_started();
    let mut generation = state.core.engine.generate_off_thread(gen_req).await?;
    // Stored once the engine has taken the request: a refused one (busy) leaves no trace.
    let recorded = record_request(&state, &req, &said, &settings).await?;
    let id = format!("chatcmpl-{}", loraloop_core::token::random_token(12));
    let created = chrono::Utc::now().timestamp();
    let model = req.model.clone();
    // The first event after any wait in line says which adapter runs this reply.
    let mut first = generation.next().await;
    while let Some(Event::Queued { .. }) = first {
        first = generation.next().await;
    }
    let adapter = match first {
        Some(Event::Started { adapter }) => adapter,
        Some(Event::Failed(m)) => {
            in_flight.failed();
            return Err(ApiError::internal(m));
        }
        _ => {
            in_flight.failed();
            return Err(ApiError::internal("the engine stopped"));
        }
    };
    let fp = fingerprint(&adapter);
    if !req.stream {
        let finished = generation.finish().await.map_err(|m| {
            in_flight.failed();
            ApiError::internal(m)
        })?;
        in_flight.finished(finished.completion_tokens, finished.decode_secs);
        drop(in_flight);
        record_reply(&state, recorded, &finished).await;
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![json!({
                "index": 0,
                "message": {"role": "assistant", "content": finished.text},
                "finish_reason": finish_reason(finished.reason),
                "logprobs": null,
            })],
            usage: json!({
                "prompt_tokens": finished.prompt_tokens,
                "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            }),
            system_fingerprint: fp,
        })
        .into_response());
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fp,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let st = state.clone();
    let closing = state.closing();
    tokio::spawn(async move {
        let mut in_flight = in_flight;
        tokio::pin!(closing);
        let send = |v: Value| SseEvent::default().data(v.to_string());
        if tx
            .send(Ok(send(chunk(
                json!({"role": "assistant", "content": ""}),
                None,
            ))))
            .await
            .is_err()
        {
            return;
        }
        loop {
            // A client that leaves while the prompt is still being read sends nothing to
            // fail on: its closed stream ends the generation (dropping `generation`
            // cancels it) instead of the whole prompt being read for nobody.
            let e = tokio::select! {
                e = generation.next() => e,
                () = tx.closed() => return,
                () = &mut closing => {
                    // The stop's grace is over: say so before the connection closes, so
                    // that a client does not take the cut reply for a whole one.
                    let _ = tx
                        .send(Ok(SseEvent::default().data(
                            json!({"error": {"code": "server_stopping", "message": "the server is stopping: the reply was cut off", "param": null, "type": "server_error"}}).to_string(),
                        )))
                        .await;
                    return;
                }
            };
            let Some(e) = e else { break };
            match e {
                Event::Text(t) => {
                    if tx
                        .send(Ok(send(chunk(json!({"content": t}), None))))
                        .await
                        .is_err()
                    {
                        return; // client gone: dropping `generation` cancels it
                    }
                }
                Event::Finished(f) => {
                    in_flight.finished(f.completion_tokens, f.decode_secs);
                    record_reply(&st, recorded, &f).await;
                    let mut last = chunk(json!({}), Some(finish_reason(f.reason)));
                    let _ = tx.send(Ok(send(last.clone()))).await;
                    if include_usage {
                        last["choices"] = json!([]);
                        last["usage"] = json!({
                            "prompt_tokens": f.prompt_tokens,
                            "completion_tokens": f.completion_tokens,
                            "total_tokens": f.prompt_tokens + f.completion_tokens,
                        });
                        let _ = tx.send(Ok(send(last))).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Event::Failed(m) => {
                    in_flight.failed();
                    tracing::error!("generation failed: {m}");
                    let _ = tx
                        .send(Ok(SseEvent::default().data(
                            json!({"error": {"code": "internal_error", "message": "generation failed", "param": null, "type": "server_error"}}).to_string(),
                        )))
                        .await;
                    return;
                }
                Event::Started { .. } | Event::Queued { .. } => {}
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Store the request's conversation like a bot's (unless `record.api` is off): the
/// caller is the OpenAI `user` field, else the API key.
async fn record_request(
    state: &AppState,
    req: &ChatRequest,
    said: &[Said],
    assistant: &Assistant,
) -> Result<Option<Recorded>, ApiError> {
    if !state.core.config.raw.record.api {
        return Ok(None);
    }
    let caller = req.end_user().unwrap_or(API_KEY_CALLER);
    Ok(record_turn(&state.core.db, Platform::Api, caller, assistant.id, said).await?)
}

/// The user and assistant messages of a request, to store.
fn said(gen_req: &GenerateRequest) -> Vec<Said> {
    match &gen_req.prompt {
        Prompt::Chat(messages) => said_of(messages),
        _ => Vec::new(),
    }
}

/// The API caller when a request names no `user`.
const API_KEY_CALLER: &str = "api-key";

async fn record_reply(state: &AppState, recorded: Option<Recorded>, f: &Finished) {
    if let Some(r) = recorded
        && let Err(e) = state.core.chat.store_reply(r.conversation_id, f).await
    {
        tracing::warn!("cannot store an API reply: {e}");
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<Value>,
}

/// What `model` may name: each assistant (its system prompt, settings and active
/// adapter; the default one first), `base`, every adapter compatible with the served model.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)))]
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let created = state.assistant_created();
    let default = state.core.assistants.default_name().to_string();
    let mut assistants = state.core.assistants.list().await?;
    assistants.sort_by_key(|a| (a.name != default, a.id));
    let mut data: Vec<Value> = assistants
        .iter()
        .map(|a| {
            json!({"id": a.name, "object": "model", "created": created, "owned_by": "loraloop",
                   "description": if a.name == default { "the default assistant with its active adapter" } else { "an assistant with its active adapter" }})
        })
        .collect();
    data.push(json!({"id": "base", "object": "model", "created": created, "owned_by": "loraloop",
               "description": format!("the base model {} without an adapter", state.core.model.name)}));
    for a in state.core.db.list_adapters().await? {
        if state.core.adapters.mismatch(&a).is_none() {
            data.push(json!({"id": a.name, "object": "model", "created": crate::operations::unix(&a.created_at), "owned_by": "loraloop",
                             "description": "a LoRA adapter"}));
        }
    }
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// One entry of `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models/{model}", params(("model" = String, Path, description = "an id GET /v1/models lists")),
    responses((status = 200, body = Object), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn retrieve_model(
    State(state): State<AppState>,
    ModelName(model): ModelName,
) -> Result<Json<Value>, ApiError> {
    let Json(list) = list_models(State(state)).await?;
    list.data
        .into_iter()
        .find(|m| m["id"] == model.as_str())
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "model {model:?} does not exist: GET /v1/models lists the assistants, base and the adapters"
            ))
            .with_param("model")
        })
}

impl AppState {
    fn assistant_created(&self) -> i64 {
        chrono::Utc::now().timestamp() - self.core.started.elapsed().as_secs() as i64
    }
}
