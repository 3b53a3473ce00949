//! The chat service: store the user's message, build the prompt from the conversation's
//! history with the model's chat template, stream the reply from the engine, store the
//! reply with the adapter that produced it. The playground uses it now; the bots next.

use crate::error::ApiError;
use crate::metrics::InFlight;
use crate::state::AppState;
use loraloop_core::domain::Role;
use loraloop_core::storage::{NewMessage, Platform, StoredMessage};
use loraloop_model::engine::{
    AdapterChoice, EngineError, Finished, GenerateRequest, Generation, Prompt,
};
use loraloop_model::sampling::SamplingParams;
use loraloop_model::template::TemplateMessage;

/// Messages of history sent to the model (older ones are left out).
pub const HISTORY_MESSAGES: i64 = 24;

/// The engine's sampling settings from `generation:` in the config.
pub fn sampling(state: &AppState) -> SamplingParams {
    state.config.raw.generation.sampling_params()
}

pub fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::EmptyPrompt | EngineError::PromptTooLong { .. } => {
            ApiError::invalid("messages", e.to_string())
        }
        other => ApiError::internal(other),
    }
}

/// A reply being generated for a stored conversation.
pub struct Turn {
    pub conversation_id: i64,
    pub user_message: StoredMessage,
    pub generation: Generation,
    pub in_flight: InFlight,
}

/// The operator's playground conversation: one open conversation on the `web` platform,
/// until "New conversation" closes it.
pub async fn playground_conversation(state: &AppState, new: bool) -> Result<i64, ApiError> {
    let chat = state
        .db
        .upsert_chat(Platform::Web, "playground", "private", Some("Playground"))
        .await?;
    if new {
        state.db.close_conversations(chat, None).await?;
    }
    let user = state
        .db
        .upsert_platform_user(
            Platform::Web,
            "operator",
            Some("operator"),
            Some("Operator"),
        )
        .await?;
    Ok(state
        .db
        .current_conversation(state.assistant.id, chat, None, Some(user.id))
        .await?
        .id)
}

/// Store `text` as the user's message in `conversation_id` and start the reply.
pub async fn start_turn(
    state: &AppState,
    conversation_id: i64,
    user_id: Option<i64>,
    text: &str,
    adapter: AdapterChoice,
) -> Result<Turn, ApiError> {
    start_turn_from(state, conversation_id, user_id, text, None, adapter).await
}

/// [`start_turn`] for a platform message with its id: a message already stored (a
/// redelivered or replayed update) is not stored twice.
pub async fn start_turn_from(
    state: &AppState,
    conversation_id: i64,
    user_id: Option<i64>,
    text: &str,
    platform_message_id: Option<&str>,
    adapter: AdapterChoice,
) -> Result<Turn, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid("message", "the message is empty"));
    }
    let user_message = state
        .db
        .insert_message(&NewMessage {
            conversation_id,
            role: Role::User,
            content: text,
            user_id,
            platform_message_id,
            adapter_id: None,
            adapter_name: None,
            prompt_tokens: None,
            completion_tokens: None,
        })
        .await?;
    let history = state
        .db
        .recent_messages(conversation_id, HISTORY_MESSAGES)
        .await?;
    let mut messages = Vec::with_capacity(history.len() + 1);
    let system = &state.assistant.system_prompt;
    if !system.is_empty() {
        messages.push(TemplateMessage::new("system", system.clone()));
    }
    messages.extend(
        history
            .iter()
            .map(|m| TemplateMessage::new(m.role.as_str(), m.content.clone())),
    );
    let in_flight = state.metrics.generation_started();
    let generation = state
        .engine
        .generate(GenerateRequest {
            prompt: Prompt::Chat(messages),
            params: sampling(state),
            adapter,
        })
        .map_err(engine_error)?;
    Ok(Turn {
        conversation_id,
        user_message,
        generation,
        in_flight,
    })
}

/// Store a finished reply with the adapter that produced it.
pub async fn store_reply(
    state: &AppState,
    conversation_id: i64,
    f: &Finished,
) -> Result<StoredMessage, ApiError> {
    state
        .metrics
        .generation_finished(f.completion_tokens, f.decode_secs);
    let adapter_id = f
        .adapter
        .as_ref()
        .and_then(|t| state.adapters.adapter_id_of_version(t.version));
    Ok(state
        .db
        .insert_message(&NewMessage {
            conversation_id,
            role: Role::Assistant,
            content: &f.text,
            user_id: None,
            platform_message_id: None,
            adapter_id,
            adapter_name: f.adapter.as_ref().map(|t| t.name.as_str()),
            prompt_tokens: Some(f.prompt_tokens as i64),
            completion_tokens: Some(f.completion_tokens as i64),
        })
        .await?)
}
