//! The JSONL dataset formats loraloop imports, their CLI names and auto-detection.

use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// A fine-tuning file format; every line of a file is one example in this format.
///
/// All of them are normalized into [`loraloop_core::domain::ChatExample`]; see
/// `validate.rs` for the exact mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// OpenAI chat: `{"messages":[{"role","content","weight"?,"name"?}]}`.
    OpenAiChat,
    /// Legacy completion pairs: `{"prompt","completion"}`.
    PromptCompletion,
    /// Plain text: `{"text"}`.
    Text,
    /// Stanford Alpaca: `{"instruction","input"?,"output"}`.
    Alpaca,
    /// ShareGPT: `{"conversations":[{"from","value"}],"system"?}`.
    ShareGpt,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::OpenAiChat,
        Format::PromptCompletion,
        Format::Text,
        Format::Alpaca,
        Format::ShareGpt,
    ];

    /// The CLI name (`--format openai`), also used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::OpenAiChat => "openai",
            Format::PromptCompletion => "prompt-completion",
            Format::Text => "text",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
        }
    }

    /// The format a JSON object looks like, from its keys alone.
    ///
    /// Precedence, most specific first: `messages` → openai, `conversations` → sharegpt,
    /// `instruction` → alpaca, `prompt` or `completion` → prompt-completion, `text` → text.
    /// A single distinctive key is enough so that a line missing its partner key (say,
    /// `{"instruction": ..}` without `output`) is reported as a `missing_key` of the
    /// format it obviously meant rather than as `unknown_format`.
    pub(crate) fn detect(object: &Map<String, Value>) -> Option<Format> {
        let has = |key: &str| object.contains_key(key);
        if has("messages") {
            Some(Format::OpenAiChat)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("instruction") {
            Some(Format::Alpaca)
        } else if has("prompt") || has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown `--format` name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown dataset format {given:?} (allowed: openai, prompt-completion, text, alpaca, sharegpt; chat is an alias of openai)"
)]
pub struct ParseFormatError {
    pub given: String,
}

impl FromStr for Format {
    type Err = ParseFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" | "chat" => Ok(Format::OpenAiChat),
            "prompt-completion" => Ok(Format::PromptCompletion),
            "text" => Ok(Format::Text),
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::ShareGpt),
            other => Err(ParseFormatError {
                given: other.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_format_parses_back_from_its_display_name() {
        for format in Format::ALL {
            assert_eq!(format.to_string().parse::<Format>(), Ok(format));
        }
        assert_eq!("prompt-completion".parse(), Ok(Format::PromptCompletion));
    }

    #[test]
    fn chat_is_an_alias_of_openai() {
        assert_eq!("chat".parse(), Ok(Format::OpenAiChat));
        assert_eq!(Format::OpenAiChat.to_string(), "openai");
    }

    #[test]
    fn an_unknown_format_name_lists_the_allowed_names() {
        let err = "jsonl".parse::<Format>().expect_err("not a format");
        let msg = err.to_string();
        assert!(msg.contains("\"jsonl\""), "{msg}");
        for name in [
            "openai",
            "prompt-completion",
            "text",
            "alpaca",
            "sharegpt",
            "chat",
        ] {
            assert!(msg.contains(name), "{msg} lacks {name}");
        }
    }

    #[test]
    fn detection_follows_the_distinctive_keys() {
        let detect = |v: Value| Format::detect(v.as_object().expect("object"));
        assert_eq!(detect(json!({"messages": []})), Some(Format::OpenAiChat));
        assert_eq!(detect(json!({"conversations": []})), Some(Format::ShareGpt));
        assert_eq!(
            detect(json!({"instruction": "a", "output": "b"})),
            Some(Format::Alpaca)
        );
        assert_eq!(
            detect(json!({"prompt": "a", "completion": "b"})),
            Some(Format::PromptCompletion)
        );
        assert_eq!(
            detect(json!({"prompt": "a"})),
            Some(Format::PromptCompletion)
        );
        assert_eq!(detect(json!({"text": "a"})), Some(Format::Text));
        assert_eq!(detect(json!({"question": "a", "answer": "b"})), None);
        // A chat line that also carries a stray "text" key is still chat.
        assert_eq!(
            detect(json!({"messages": [], "text": "x"})),
            Some(Format::OpenAiChat)
        );
    }
}
