//! Preference data from users' ratings and operators' corrections: DPO pairs (a preferred
//! and a non-preferred reply to the same conversation) and KTO rows (one reply labelled
//! desirable or not), in the JSONL shapes other tools read: OpenAI's preference format
//! for pairs, TRL's unpaired preference format for KTO.

use crate::domain::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

crate::keywords! {
    /// What a run learns from, and what a dataset holds for it.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Objective ("objective") {
        /// Supervised fine-tuning on chat examples.
        #[default]
        Sft = "sft",
        /// Direct preference optimization on pairs (a preferred and a non-preferred reply).
        Dpo = "dpo",
        /// Kahneman-Tversky optimization on replies labelled desirable or not.
        Kto = "kto",
    }
}

/// A conversation up to a reply, and two replies to it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<ChatMessage>,
    pub preferred: String,
    pub non_preferred: String,
}

impl PreferencePair {
    /// One line of OpenAI's preference JSONL (`input`, `preferred_output`,
    /// `non_preferred_output`).
    pub fn to_json(&self) -> Value {
        json!({
            "input": {"messages": messages(&self.prompt)},
            "preferred_output": [{"role": "assistant", "content": self.preferred}],
            "non_preferred_output": [{"role": "assistant", "content": self.non_preferred}],
        })
    }
}

/// A conversation up to a reply, the reply, and whether it was wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoRow {
    pub prompt: Vec<ChatMessage>,
    pub completion: String,
    pub label: bool,
}

impl KtoRow {
    /// One line of TRL's unpaired preference JSONL (`prompt`, `completion`, `label`).
    pub fn to_json(&self) -> Value {
        json!({
            "prompt": messages(&self.prompt),
            "completion": [{"role": "assistant", "content": self.completion}],
            "label": self.label,
        })
    }
}

/// Both kinds of rows from one set of conversations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferenceRows {
    /// One per reply an operator corrected: the correction over the original.
    pub pairs: Vec<PreferencePair>,
    /// One per rated reply (👍 desirable, 👎 not; both at once: left out), and per
    /// corrected reply the correction as desirable (and the original as undesirable,
    /// unless someone rated it 👍).
    pub kto: Vec<KtoRow>,
    /// The conversation each pair and each KTO row came from (parallel to `pairs` and
    /// `kto`): a report card leaves those conversations out of its rated replies.
    pub pair_conversations: Vec<i64>,
    pub kto_conversations: Vec<i64>,
}

fn messages(ms: &[ChatMessage]) -> Vec<Value> {
    ms.iter()
        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
        .collect()
}
