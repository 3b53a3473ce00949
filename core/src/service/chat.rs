//! The chat service: store the user's message, build the prompt from the conversation's
//! history with the model's chat template, stream the reply from the engine, store the
//! reply with the adapter that produced it. The bots and the console's playground use it.

use crate::domain::Role;
use crate::error::{Result, ServiceError};
use crate::metrics::{InFlight, Metrics};
use crate::service::adapters::AdapterService;
use crate::service::assistants::AssistantService;
use crate::service::routing::Router;
use crate::storage::{Assistant, Db, NewMessage, Platform, StoredMessage};
use loraloop_model::engine::{
    AdapterChoice, Engine, Finished, GenerateRequest, Generation, Prompt,
};
use loraloop_model::template::TemplateMessage;
use std::sync::Arc;

/// Messages of history sent to the model (older ones are left out).
pub const HISTORY_MESSAGES: i64 = 24;

pub struct ChatService {
    pub(super) db: Db,
    pub(super) engine: Engine,
    /// Each conversation's assistant: its system prompt and generation settings.
    pub(super) assistants: Arc<AssistantService>,
    pub(super) adapters: Arc<AdapterService>,
    /// Which adapter a bot conversation's turn runs on (pins and canaries).
    pub(super) router: Router,
    pub(super) metrics: Arc<Metrics>,
}

/// A reply being generated for a stored conversation.
pub struct Turn {
    pub conversation_id: i64,
    pub user_message: StoredMessage,
    pub generation: Generation,
    pub in_flight: InFlight,
}

impl ChatService {
    /// The operator's playground conversation with `assistant`: one open conversation on
    /// the `web` platform per assistant, until "New conversation" closes it.
    /// The playground's open conversation with `assistant`, if any (nothing is created:
    /// viewing the page writes nothing).
    pub async fn playground_shown(&self, assistant: &Assistant) -> Result<Option<i64>> {
        Ok(self
            .db
            .open_conversation(Platform::Web, "playground", assistant.id)
            .await?)
    }

    pub async fn playground_conversation(&self, assistant: &Assistant, new: bool) -> Result<i64> {
        Ok(self.playground(assistant, new).await?.0)
    }

    /// Store `text` as the operator's message in the playground conversation with
    /// `assistant` and start the reply on `adapter`.
    pub async fn start_playground_turn(
        &self,
        assistant: &Assistant,
        text: &str,
        adapter: AdapterChoice,
    ) -> Result<Turn> {
        // Checked before anything is stored: a refused message leaves no trace.
        if text.trim().is_empty() {
            return Err(ServiceError::Invalid {
                param: "message".into(),
                message: "the message is empty".into(),
            });
        }
        let (conversation, operator) = self.playground(assistant, false).await?;
        self.start_turn(conversation, Some(operator), text, adapter)
            .await
    }

    /// The playground conversation (a new one with `new`) and the operator's user row.
    async fn playground(&self, assistant: &Assistant, new: bool) -> Result<(i64, i64)> {
        let chat = self
            .db
            .upsert_chat(Platform::Web, "playground", "private", Some("Playground"))
            .await?;
        if new {
            self.db
                .close_conversations(chat, None, Some(assistant.id))
                .await?;
        }
        let user = self
            .db
            .upsert_platform_user(
                Platform::Web,
                "operator",
                Some("operator"),
                Some("Operator"),
            )
            .await?;
        let conversation = self
            .db
            .current_conversation(assistant.id, chat, None, Some(user.id))
            .await?;
        Ok((conversation.id, user.id))
    }

    /// Store `text` as the user's message in `conversation_id` and start the reply.
    pub async fn start_turn(
        &self,
        conversation_id: i64,
        user_id: Option<i64>,
        text: &str,
        adapter: AdapterChoice,
    ) -> Result<Turn> {
        self.start_turn_from(conversation_id, user_id, text, None, adapter)
            .await
    }

    /// A bot conversation's turn: the adapter comes from the conversation's pin, or from
    /// the canary or the active adapter when it has none (see [`Router`]).
    pub async fn start_routed_turn(
        &self,
        conversation_id: i64,
        user_id: Option<i64>,
        text: &str,
        platform_message_id: Option<&str>,
    ) -> Result<Turn> {
        // Routed before the message is stored: the pin's idle time runs to the last message.
        let assistant = self.db.conversation_assistant(conversation_id).await?;
        let adapter = self.router.route(&assistant, conversation_id).await?;
        self.start_turn_from(conversation_id, user_id, text, platform_message_id, adapter)
            .await
    }

    /// [`Self::start_turn`] for a platform message with its id: a message already stored
    /// (a redelivered or replayed update) is not stored twice.
    pub async fn start_turn_from(
        &self,
        conversation_id: i64,
        user_id: Option<i64>,
        text: &str,
        platform_message_id: Option<&str>,
        adapter: AdapterChoice,
    ) -> Result<Turn> {
        if text.trim().is_empty() {
            return Err(ServiceError::invalid("message", "the message is empty"));
        }
        let user_message = self
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
        let assistant = self.db.conversation_assistant(conversation_id).await?;
        let history = self
            .db
            .recent_messages(conversation_id, HISTORY_MESSAGES)
            .await?;
        let mut messages = Vec::with_capacity(history.len() + 1);
        let system = &assistant.system_prompt;
        if !system.is_empty() {
            messages.push(TemplateMessage::new("system", system.clone()));
        }
        messages.extend(
            history
                .iter()
                .map(|m| TemplateMessage::new(m.role.as_str(), m.content.clone())),
        );
        let in_flight = self.metrics.generation_started();
        let generation = match self
            .engine
            .generate_off_thread(GenerateRequest {
                prompt: Prompt::Chat(messages),
                params: self.assistants.sampling(&assistant),
                adapter,
                // Fair shares and the per-user cap go by the person (by the conversation when
                // the platform gave no user).
                user: Some(match user_id {
                    Some(u) => format!("user:{u}"),
                    None => format!("conversation:{conversation_id}"),
                }),
            })
            .await
        {
            Ok(g) => g,
            Err(e) => {
                // A message the engine refused (too long for the context, a full queue)
                // leaves no trace, unless it is a platform message: that one stays, as the
                // record of what the user sent and so that a redelivery is known.
                if platform_message_id.is_none() {
                    self.db.delete_unanswered_message(user_message.id).await?;
                }
                return Err(e.into());
            }
        };
        Ok(Turn {
            conversation_id,
            user_message,
            generation,
            in_flight,
        })
    }

    /// Store a finished reply with the adapter that produced it (the turn's `in_flight`
    /// counts the generation).
    pub async fn store_reply(&self, conversation_id: i64, f: &Finished) -> Result<StoredMessage> {
        let adapter_id = f
            .adapter
            .as_ref()
            .and_then(|t| self.adapters.adapter_id_of_version(t.version));
        Ok(self
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
}
