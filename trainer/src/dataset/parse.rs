//! Reading a whole JSONL file: encoding, line splitting, format detection and the
//! file-level checks (duplicates, length) around the per-line validation.

use super::format::Format;
use super::problem::{Problem, ProblemCode};
use super::validate::{self, json_type};
use loraloop_core::domain::ChatExample;
use serde_json::Value;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Examples longer than this many characters get a `long_example` warning.
///
/// A rough proxy for ~8k tokens (about four characters per token in English) until a
/// tokenizer is available to the validator; such examples are likely to be truncated
/// by the training context window.
pub const LONG_EXAMPLE_CHARS: usize = 32_000;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The result of reading one dataset file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParseOutcome {
    /// The explicit format, else the format detected on the first recognizable line;
    /// `None` when nothing could be detected.
    pub format: Option<Format>,
    /// The valid examples, in file order. Lines with errors contribute nothing.
    pub examples: Vec<ChatExample>,
    /// The 1-based line of each entry of `examples` (same length).
    pub example_lines: Vec<usize>,
    /// Problems that make the file unusable, in line order (file-level ones last).
    pub errors: Vec<Problem>,
    /// Problems that do not block the import (duplicates, very long examples).
    pub warnings: Vec<Problem>,
}

impl ParseOutcome {
    /// True when there are no errors; warnings are allowed.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Parses, validates and normalizes a JSONL dataset.
///
/// With `format: None` the format is auto-detected per line and the file must not mix
/// formats; with `Some(format)` every line is validated against that format (for files
/// whose keys are ambiguous or mislabelled). Never fails: all findings are in the
/// returned [`ParseOutcome`].
pub fn parse_jsonl(bytes: &[u8], format: Option<Format>) -> ParseOutcome {
    let mut outcome = ParseOutcome {
        format,
        ..ParseOutcome::default()
    };
    // Editors on Windows like to prepend a BOM; it carries no content.
    let (body, body_offset) = match bytes.strip_prefix(UTF8_BOM) {
        Some(rest) => (rest, UTF8_BOM.len()),
        None => (bytes, 0),
    };
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(err) => {
            outcome
                .errors
                .push(invalid_utf8(bytes, body_offset + err.valid_up_to()));
            return outcome;
        }
    };

    // Where the file's format was detected, for the `mixed_formats` message.
    let mut detected_on: Option<usize> = None;
    // Canonical line -> the file line it first appeared on.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut any_line = false;

    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        any_line = true;

        let value: Value = match serde_json::from_str(raw) {
            Ok(value) => value,
            Err(err) => {
                outcome.errors.push(invalid_json(line, &err));
                continue;
            }
        };
        let Value::Object(object) = value else {
            outcome.errors.push(Problem::new(
                Some(line),
                ProblemCode::DataType,
                format!("expected a JSON object, found a {}", json_type(&value)),
            ));
            continue;
        };

        let line_format = match format {
            Some(format) => format,
            None => match (Format::detect(&object), outcome.format, detected_on) {
                (None, _, _) => {
                    outcome.errors.push(Problem::new(
                        Some(line),
                        ProblemCode::UnknownFormat,
                        "cannot tell the format: expected `messages` (openai), `conversations` \
                         (sharegpt), `instruction`/`output` (alpaca), `prompt`/`completion` \
                         (prompt-completion) or `text` (text)",
                    ));
                    continue;
                }
                (Some(detected), None, _) => {
                    outcome.format = Some(detected);
                    detected_on = Some(line);
                    detected
                }
                (Some(detected), Some(file_format), first) if detected != file_format => {
                    let first = first.map_or_else(String::new, |l| format!(" (line {l})"));
                    outcome.errors.push(Problem::new(
                        Some(line),
                        ProblemCode::MixedFormats,
                        format!(
                            "this line is {detected} but the file started as {file_format}{first}; \
                             split the file or pass an explicit format"
                        ),
                    ));
                    continue;
                }
                (Some(detected), Some(_), _) => detected,
            },
        };

        match validate::normalize(line_format, &object, line) {
            Ok(example) => {
                check_example(&example, line, &mut seen, &mut outcome.warnings);
                outcome.examples.push(example);
                outcome.example_lines.push(line);
            }
            Err(problems) => outcome.errors.extend(problems),
        }
    }

    if !any_line {
        outcome.errors.push(Problem::new(
            None,
            ProblemCode::EmptyFile,
            "the file has no examples (every line is blank)",
        ));
    }
    tracing::debug!(
        format = ?outcome.format,
        examples = outcome.examples.len(),
        errors = outcome.errors.len(),
        warnings = outcome.warnings.len(),
        "parsed dataset"
    );
    outcome
}

/// `offset` is in `bytes` (the original file, BOM included); the line is 1-based.
fn invalid_utf8(bytes: &[u8], offset: usize) -> Problem {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    Problem::new(
        Some(line),
        ProblemCode::InvalidUtf8,
        format!(
            "the file is not valid UTF-8: invalid byte at offset {offset} (line {line}); save it as UTF-8"
        ),
    )
}

/// serde_json's message, with its "line 1" position (meaningless: we parse one line at
/// a time) replaced by the column.
fn invalid_json(line: usize, err: &serde_json::Error) -> Problem {
    let full = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let reason = full.strip_suffix(&position).unwrap_or(&full);
    Problem::new(
        Some(line),
        ProblemCode::InvalidJson,
        format!("not valid JSON at column {}: {reason}", err.column()),
    )
}

/// The warnings about one valid example.
fn check_example(
    example: &ChatExample,
    line: usize,
    seen: &mut HashMap<String, usize>,
    warnings: &mut Vec<Problem>,
) {
    match seen.entry(example.to_json_line()) {
        Entry::Occupied(first) => warnings.push(Problem::new(
            Some(line),
            ProblemCode::DuplicateExample,
            format!("same example as line {}", first.get()),
        )),
        Entry::Vacant(slot) => {
            slot.insert(line);
        }
    }
    let chars = example.char_len();
    if chars > LONG_EXAMPLE_CHARS {
        warnings.push(Problem::new(
            Some(line),
            ProblemCode::LongExample,
            format!(
                "example has {chars} characters, over the {LONG_EXAMPLE_CHARS}-character guideline \
                 (~8k tokens); it may be truncated in training"
            ),
        ));
    }
}
