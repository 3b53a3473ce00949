//! Platform-neutral domain types shared by storage, the trainer, the bots and the web console.

use serde::{Deserialize, Serialize};

crate::keywords! {
    /// Who wrote a chat message. The set OpenAI's chat fine-tuning format accepts for
    /// plain conversations (tool calls are out of scope for now).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Role ("role") {
        System = "system",
        User = "user",
        Assistant = "assistant",
    }
}

/// One message of a training example, in OpenAI's chat fine-tuning shape.
///
/// `weight` follows OpenAI's format: on assistant messages, `0` excludes the turn
/// from the loss and `1` (or absent) includes it. loraloop also accepts values in
/// between (feedback-derived weights); validation keeps it within `0..=1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            weight: None,
        }
    }
}

/// A normalized training example: every import format becomes this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatExample {
    pub messages: Vec<ChatMessage>,
}

impl ChatExample {
    /// Total characters of content, the length measure used until a tokenizer is loaded.
    pub fn char_len(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum()
    }

    /// The canonical one-line JSON form (OpenAI chat JSONL). Field order is fixed by the
    /// struct definitions, so equal examples always serialize to equal bytes; the dataset
    /// content hash is computed over these lines.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a ChatExample always serializes")
    }
}
