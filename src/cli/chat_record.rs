//! `loraloop chat`'s conversations stored like the bots' (platform `cli`, one user per
//! session) unless `record.cli` is off, so terminal chats feed the learning loop too. A
//! database that cannot be opened costs the recording, not the chat: it is said once.

use loraloop_core::Config;
use loraloop_core::domain::Role;
use loraloop_core::service::transcripts::{Recorded, record_turn, said_of};
use loraloop_core::storage::{Db, NewMessage, Platform};
use loraloop_model::engine::Finished;
use loraloop_model::template::TemplateMessage;

pub struct Recorder {
    db: Db,
    assistant_id: i64,
    /// This session's user: `session-<random>`.
    caller: String,
}

impl Recorder {
    /// The recorder for this session; None when recording is off or the database cannot
    /// be opened (said on stderr).
    pub async fn open(config: &Config) -> Option<Self> {
        if !config.raw.record.cli {
            return None;
        }
        let opened = async {
            let db = Db::open(&config.database_path).await?;
            let a = &config.raw.assistant;
            let assistant = db
                .ensure_assistant(&a.name, &config.raw.model, &a.system_prompt)
                .await?;
            anyhow::Ok((db, assistant.id))
        };
        match opened.await {
            Ok((db, assistant_id)) => Some(Self {
                db,
                assistant_id,
                caller: format!("session-{}", loraloop_core::token::random_token(6)),
            }),
            Err(e) => {
                eprintln!(
                    "(this chat is not recorded: cannot open {}: {e:#})",
                    config.database_path.display()
                );
                None
            }
        }
    }

    /// Store the conversation's new user message (the last of `turns`).
    pub async fn turn(&self, turns: &[TemplateMessage]) -> Option<Recorded> {
        let said = said_of(turns);
        match record_turn(
            &self.db,
            Platform::Cli,
            &self.caller,
            self.assistant_id,
            &said,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("(cannot record this message: {e})");
                None
            }
        }
    }

    /// Store a finished reply.
    pub async fn reply(&self, recorded: Option<Recorded>, f: &Finished) {
        let Some(r) = recorded else { return };
        let stored = self
            .db
            .insert_message(&NewMessage {
                conversation_id: r.conversation_id,
                role: Role::Assistant,
                content: &f.text,
                user_id: None,
                platform_message_id: None,
                adapter_id: None,
                adapter_name: f.adapter.as_ref().map(|t| t.name.as_str()),
                prompt_tokens: Some(f.prompt_tokens as i64),
                completion_tokens: Some(f.completion_tokens as i64),
            })
            .await;
        if let Err(e) = stored {
            eprintln!("(cannot record this reply: {e})");
        }
    }
}
