//! Problems found while reading a dataset file, with stable machine-readable codes.
//!
//! Codes are part of the user-facing contract (they are printed by the CLI, shown in the
//! web console and stored with rejected uploads), so they never change spelling. The
//! OpenAI-chat codes are taken verbatim from OpenAI's cookbook "Data preparation and
//! analysis for chat model fine-tuning" so that people who know those checks recognise
//! them.

use serde::{Serialize, Serializer};
use std::fmt;

/// How many problems a report lists before summarising the rest: a file with a systematic
/// mistake has one problem per line, and nobody reads ten thousand identical lines.
pub const MAX_LISTED_PROBLEMS: usize = 20;

/// Whether a problem blocks the import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file (or line) cannot be used as training data.
    Error,
    /// Probably a mistake, but the data is usable as is.
    Warning,
}

/// Declares [`ProblemCode`] from one table so that [`ProblemCode::ALL`], the code strings
/// and the severities cannot drift apart when a code is added (the fixture tests iterate
/// over `ALL` to demand a fixture for every error code).
macro_rules! problem_codes {
    ($( $(#[doc = $doc:literal])* $variant:ident => $code:literal, $severity:ident; )+) => {
        /// A machine-readable problem kind; see [`ProblemCode::as_str`] for the stable code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ProblemCode {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl ProblemCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ProblemCode] = &[ $( ProblemCode::$variant, )+ ];

            /// The stable snake_case code.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( ProblemCode::$variant => $code, )+
                }
            }

            /// Whether this code blocks the import or is only a warning.
            pub fn severity(self) -> Severity {
                match self {
                    $( ProblemCode::$variant => Severity::$severity, )+
                }
            }
        }
    };
}

problem_codes! {
    /// The file is not UTF-8; the message names the byte offset and line of the first bad byte.
    InvalidUtf8 => "invalid_utf8", Error;
    /// The file has no non-blank line.
    EmptyFile => "empty_file", Error;
    /// A line is not JSON.
    InvalidJson => "invalid_json", Error;
    /// A line is JSON but not an object (OpenAI's name for this check).
    DataType => "data_type", Error;
    /// Auto-detection found none of the known formats' keys on a line.
    UnknownFormat => "unknown_format", Error;
    /// Auto-detection found a different format than the file's first example.
    MixedFormats => "mixed_formats", Error;
    /// OpenAI chat: `messages` is absent, not a list, or empty.
    MissingMessagesList => "missing_messages_list", Error;
    /// ShareGPT: `conversations` is absent, not a list, or empty.
    MissingConversationsList => "missing_conversations_list", Error;
    /// A message lacks `role`/`content` (OpenAI) or `from`/`value` (ShareGPT).
    MessageMissingKey => "message_missing_key", Error;
    /// An OpenAI message has a key other than role, content, weight or name.
    MessageUnrecognizedKey => "message_unrecognized_key", Error;
    /// A role (OpenAI) or `from` (ShareGPT) value loraloop does not know.
    UnrecognizedRole => "unrecognized_role", Error;
    /// Text that must be a non-blank string is empty, whitespace-only or not a string.
    MissingContent => "missing_content", Error;
    /// No assistant turn, so the example would teach nothing.
    ExampleMissingAssistantMessage => "example_missing_assistant_message", Error;
    /// A weight that is not a number in `0..=1`, or a weight on a non-assistant message.
    InvalidWeight => "invalid_weight", Error;
    /// Prompt-completion, text and Alpaca: a required key is absent.
    MissingKey => "missing_key", Error;
    /// OpenAI chat: `tools` or `functions`, tool use that loraloop does not train (the
    /// example would teach answers without the tools the prompt offered).
    UnsupportedKey => "unsupported_key", Error;
    /// The same normalized example already appeared on an earlier line.
    DuplicateExample => "duplicate_example", Warning;
    /// The example is longer than [`super::LONG_EXAMPLE_CHARS`].
    LongExample => "long_example", Warning;
}

impl ProblemCode {
    pub fn is_error(self) -> bool {
        self.severity() == Severity::Error
    }
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ProblemCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One problem, located on a line when it belongs to one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// 1-based line in the original file (blank lines and a BOM included in the count);
    /// `None` for file-level problems such as `empty_file`.
    pub line: Option<usize>,
    pub code: ProblemCode,
    /// Human-readable detail, written to say what to fix.
    pub message: String,
}

impl Problem {
    pub fn new(line: Option<usize>, code: ProblemCode, message: impl Into<String>) -> Self {
        Self {
            line,
            code,
            message: message.into(),
        }
    }
}

/// `line 7: missing_content: message 2 has empty content`, or `file: empty_file: ...`.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.code, self.message),
            None => write!(f, "file: {}: {}", self.code, self.message),
        }
    }
}

/// One problem per line (see [`Problem`]'s `Display`), at most `limit` of them, then
/// `... and N more (M problems in total)` when some were left out. No trailing newline.
pub fn format_problems<P: std::fmt::Display>(problems: &[P], limit: usize) -> String {
    let mut lines: Vec<String> = problems
        .iter()
        .take(limit)
        .map(ToString::to_string)
        .collect();
    if problems.len() > limit {
        lines.push(format!(
            "... and {} more ({} problems in total)",
            problems.len() - limit,
            problems.len()
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_string_is_unique_snake_case() {
        let mut seen = HashSet::new();
        for code in ProblemCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} appears twice");
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{s} is not snake_case"
            );
            assert_eq!(code.to_string(), s);
        }
    }

    #[test]
    fn only_duplicates_and_long_examples_are_warnings() {
        let warnings: Vec<_> = ProblemCode::ALL
            .iter()
            .filter(|c| !c.is_error())
            .copied()
            .collect();
        assert_eq!(
            warnings,
            [ProblemCode::DuplicateExample, ProblemCode::LongExample]
        );
    }

    #[test]
    fn a_problem_displays_as_line_code_and_message() {
        let p = Problem::new(
            Some(7),
            ProblemCode::MissingContent,
            "message 2 has empty content",
        );
        assert_eq!(
            p.to_string(),
            "line 7: missing_content: message 2 has empty content"
        );
        let f = Problem::new(None, ProblemCode::EmptyFile, "no examples");
        assert_eq!(f.to_string(), "file: empty_file: no examples");
    }

    #[test]
    fn a_problem_serializes_its_code_as_the_stable_string() {
        let p = Problem::new(Some(3), ProblemCode::InvalidWeight, "bad");
        let json = serde_json::to_string(&p).expect("serializes");
        assert_eq!(
            json,
            r#"{"line":3,"code":"invalid_weight","message":"bad"}"#
        );
    }

    #[test]
    fn format_problems_lists_twenty_and_counts_the_rest() {
        let problems: Vec<Problem> = (1..=25)
            .map(|n| Problem::new(Some(n), ProblemCode::InvalidJson, format!("bad {n}")))
            .collect();
        let text = format_problems(&problems, MAX_LISTED_PROBLEMS);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 21);
        assert_eq!(lines[0], "line 1: invalid_json: bad 1");
        assert_eq!(lines[19], "line 20: invalid_json: bad 20");
        assert_eq!(lines[20], "... and 5 more (25 problems in total)");
    }

    #[test]
    fn format_problems_adds_no_summary_when_everything_fits() {
        let problems: Vec<Problem> = (1..=20)
            .map(|n| Problem::new(Some(n), ProblemCode::InvalidJson, "bad"))
            .collect();
        let text = format_problems(&problems, MAX_LISTED_PROBLEMS);
        assert_eq!(text.lines().count(), 20);
        assert!(!text.contains("more"));
        assert_eq!(format_problems::<Problem>(&[], MAX_LISTED_PROBLEMS), "");
    }
}
