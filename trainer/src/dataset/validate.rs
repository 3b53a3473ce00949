//! Per-line validation and normalization of one JSON object into a [`ChatExample`].
//!
//! Validation and normalization are one pass so the two can never disagree: an example
//! is produced exactly when no error was found on its line.

use super::format::Format;
use super::problem::{Problem, ProblemCode};
use loraloop_core::domain::{ChatExample, ChatMessage, Role};
use serde_json::{Map, Value};

/// Message keys the OpenAI chat format may carry. `name` is accepted (OpenAI allows it
/// to tell participants apart) but dropped: loraloop's chat template has no slot for it.
const OPENAI_MESSAGE_KEYS: [&str; 4] = ["role", "content", "weight", "name"];

/// ShareGPT `from` values and the role each maps to (compared case-insensitively).
const SHAREGPT_ROLES: [(&str, Role); 7] = [
    ("system", Role::System),
    ("human", Role::User),
    ("user", Role::User),
    ("gpt", Role::Assistant),
    ("assistant", Role::Assistant),
    ("bot", Role::Assistant),
    ("model", Role::Assistant),
];

/// Validates `object` as `format` and normalizes it, or returns every problem found
/// (at most one per code).
pub(crate) fn normalize(
    format: Format,
    object: &Map<String, Value>,
    line: usize,
) -> Result<ChatExample, Vec<Problem>> {
    let mut found = Findings {
        line,
        problems: Vec::new(),
    };
    let messages = match format {
        Format::OpenAiChat => openai(object, &mut found),
        Format::PromptCompletion => prompt_completion(object, &mut found),
        Format::Text => text(object, &mut found),
        Format::Alpaca => alpaca(object, &mut found),
        Format::ShareGpt => sharegpt(object, &mut found),
    };
    if found.problems.is_empty() {
        Ok(ChatExample { messages })
    } else {
        Err(found.problems)
    }
}

/// The problems of one line, keeping only the first of each code: one
/// `missing_content` tells the user what to fix, fifty would bury the other codes.
struct Findings {
    line: usize,
    problems: Vec<Problem>,
}

impl Findings {
    fn report(&mut self, code: ProblemCode, message: impl Into<String>) {
        if !self.problems.iter().any(|p| p.code == code) {
            self.problems
                .push(Problem::new(Some(self.line), code, message));
        }
    }
}

/// The JSON type name used in messages ("expected a string, found number").
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// A non-blank string, or a `missing_content` naming `what` (e.g. "message 2").
fn content_of(value: &Value, what: &str, found: &mut Findings) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::String(_) => {
            found.report(
                ProblemCode::MissingContent,
                format!("{what} has empty content"),
            );
            None
        }
        other => {
            found.report(
                ProblemCode::MissingContent,
                format!(
                    "{what} content is not a string (found {})",
                    json_type(other)
                ),
            );
            None
        }
    }
}

/// Reports one `missing_key` naming every required key that is absent.
fn require_keys(object: &Map<String, Value>, keys: &[&str], format: Format, found: &mut Findings) {
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !object.contains_key(**k))
        .map(|k| format!("`{k}`"))
        .collect();
    if !missing.is_empty() {
        let noun = if missing.len() == 1 { "key" } else { "keys" };
        found.report(
            ProblemCode::MissingKey,
            format!(
                "missing {noun} {} (required by the {format} format)",
                missing.join(", ")
            ),
        );
    }
}

/// A message of a record (`what`: "message 3") as an object, reported when it is not one
/// or lacks one of `keys` (its role and its text, as the format names them).
fn message_object<'a>(
    message: &'a Value,
    what: &str,
    keys: [&str; 2],
    found: &mut Findings,
) -> Option<&'a Map<String, Value>> {
    let Some(object) = message.as_object() else {
        found.report(
            ProblemCode::MessageMissingKey,
            format!(
                "{what} is a {}, not an object with `{}` and `{}`",
                json_type(message),
                keys[0],
                keys[1]
            ),
        );
        return None;
    };
    for key in keys.into_iter().filter(|k| !object.contains_key(*k)) {
        found.report(
            ProblemCode::MessageMissingKey,
            format!("{what} has no `{key}`"),
        );
    }
    Some(object)
}

/// The non-blank string under a required `key`, if present and valid.
fn required_text(object: &Map<String, Value>, key: &str, found: &mut Findings) -> Option<String> {
    object
        .get(key)
        .and_then(|v| content_of(v, &format!("`{key}`"), found))
}

/// The non-empty list under `key` (a record's messages or turns); reported as `code`
/// when it is missing, empty or not a list.
fn turn_list<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    code: ProblemCode,
    found: &mut Findings,
) -> Option<&'a Vec<Value>> {
    match object.get(key) {
        Some(Value::Array(list)) if !list.is_empty() => Some(list),
        Some(Value::Array(_)) => {
            found.report(code, format!("`{key}` is an empty list"));
            None
        }
        Some(other) => {
            found.report(
                code,
                format!("`{key}` is not a list (found {})", json_type(other)),
            );
            None
        }
        None => {
            found.report(code, format!("missing key `{key}`"));
            None
        }
    }
}

fn openai(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    if let Some(key) = ["tools", "functions"]
        .into_iter()
        .find(|k| object.get(*k).is_some_and(|v| !v.is_null()))
    {
        found.report(
            ProblemCode::UnsupportedKey,
            format!("`{key}`: loraloop does not train tool use; remove the key, or the example"),
        );
    }
    let Some(list) = turn_list(object, "messages", ProblemCode::MissingMessagesList, found) else {
        return Vec::new();
    };

    let mut messages = Vec::with_capacity(list.len());
    let mut has_assistant = false;
    // An assistant message the loss covers (weight absent or above 0).
    let mut learned = false;
    for (index, message) in list.iter().enumerate() {
        let what = format!("message {}", index + 1);
        let Some(message) = message_object(message, &what, ["role", "content"], found) else {
            continue;
        };
        if let Some(key) = message
            .keys()
            .find(|k| !OPENAI_MESSAGE_KEYS.contains(&k.as_str()))
        {
            found.report(
                ProblemCode::MessageUnrecognizedKey,
                format!(
                    "{what} has unrecognized key `{key}` (allowed: role, content, weight, name)"
                ),
            );
        }

        let role = message.get("role").and_then(|value| {
            let role = value.as_str().and_then(|s| s.parse::<Role>().ok());
            if role.is_none() {
                found.report(
                    ProblemCode::UnrecognizedRole,
                    format!("{what} has role {value} (allowed: system, user, assistant)"),
                );
            }
            role
        });
        has_assistant |= role == Some(Role::Assistant);
        let content = message
            .get("content")
            .and_then(|value| content_of(value, &what, found));
        let weight = message
            .get("weight")
            .and_then(|value| weight_of(value, role, &what, found));

        learned |= role == Some(Role::Assistant) && weight != Some(0.0);
        if let (Some(role), Some(content)) = (role, content) {
            messages.push(ChatMessage {
                role,
                content,
                weight,
            });
        }
    }
    if !has_assistant {
        found.report(
            ProblemCode::ExampleMissingAssistantMessage,
            "no message has role \"assistant\", so there is nothing to learn",
        );
    } else if !learned {
        found.report(
            ProblemCode::ExampleMissingAssistantMessage,
            "every assistant message has weight 0, so there is nothing to learn",
        );
    }
    messages
}

/// A weight must be a number in `0..=1` and may only sit on an assistant message: the
/// loss is only computed over assistant tokens, so a weight anywhere else is a mistake.
fn weight_of(value: &Value, role: Option<Role>, what: &str, found: &mut Findings) -> Option<f64> {
    match value.as_f64() {
        Some(w) if (0.0..=1.0).contains(&w) => {
            if let Some(role) = role.filter(|r| *r != Role::Assistant) {
                found.report(
                    ProblemCode::InvalidWeight,
                    format!("{what} is a {role} message; only assistant messages take a weight"),
                );
            }
            Some(w)
        }
        _ => {
            found.report(
                ProblemCode::InvalidWeight,
                format!("{what} has weight {value}; expected a number from 0 to 1"),
            );
            None
        }
    }
}

/// `prompt` becomes the user turn and `completion` the assistant turn, verbatim
/// (legacy separators and leading spaces are the user's business).
fn prompt_completion(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    require_keys(
        object,
        &["prompt", "completion"],
        Format::PromptCompletion,
        found,
    );
    let prompt = required_text(object, "prompt", found);
    let completion = required_text(object, "completion", found);
    match (prompt, completion) {
        (Some(prompt), Some(completion)) => vec![
            ChatMessage::new(Role::User, prompt),
            ChatMessage::new(Role::Assistant, completion),
        ],
        _ => Vec::new(),
    }
}

/// A plain-text example becomes a single assistant turn so that the loss covers all of
/// it (continued pre-training on raw text), rather than a user turn nothing learns from.
fn text(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    require_keys(object, &["text"], Format::Text, found);
    required_text(object, "text", found)
        .map(|text| vec![ChatMessage::new(Role::Assistant, text)])
        .unwrap_or_default()
}

/// The user turn is `instruction`, followed by a blank line and `input` when `input` is
/// non-blank (the usual Alpaca prompt layout minus its boilerplate); `output` is the
/// assistant turn. `input` may be absent, null or empty. LLaMA-Factory's optional
/// `system` (a leading system message) and `history` (earlier `[instruction, output]`
/// pairs, as turns before it) are kept.
fn alpaca(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    let mut messages: Vec<ChatMessage> = leading_system(object, found).into_iter().collect();
    messages.extend(alpaca_history(object, found));
    messages.extend(alpaca_turn(object, found));
    messages
}

/// A non-blank top-level `system` string as a system message (an empty one, common in
/// exports, is ignored).
fn leading_system(object: &Map<String, Value>, found: &mut Findings) -> Option<ChatMessage> {
    match object.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(ChatMessage::new(Role::System, s.clone())),
        Some(other) => {
            found.report(
                ProblemCode::MissingContent,
                format!(
                    "`system` content is not a string (found {})",
                    json_type(other)
                ),
            );
            None
        }
    }
}

/// LLaMA-Factory's `history`: `[[instruction, output], ...]`, oldest first.
fn alpaca_history(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    let pairs = match object.get("history") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(pairs)) => pairs,
        Some(other) => {
            found.report(
                ProblemCode::MissingContent,
                format!(
                    "`history` is not a list of [instruction, output] pairs (found {})",
                    json_type(other)
                ),
            );
            return Vec::new();
        }
    };
    let mut messages = Vec::with_capacity(pairs.len() * 2);
    for (i, pair) in pairs.iter().enumerate() {
        let what = format!("`history` pair {}", i + 1);
        match pair.as_array().map(Vec::as_slice) {
            Some([instruction, output]) => {
                let user = content_of(instruction, &format!("{what}'s instruction"), found);
                let assistant = content_of(output, &format!("{what}'s output"), found);
                if let (Some(user), Some(assistant)) = (user, assistant) {
                    messages.push(ChatMessage::new(Role::User, user));
                    messages.push(ChatMessage::new(Role::Assistant, assistant));
                }
            }
            _ => found.report(
                ProblemCode::MissingContent,
                format!("{what} is not an [instruction, output] pair of strings"),
            ),
        }
    }
    messages
}

fn alpaca_turn(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    require_keys(object, &["instruction", "output"], Format::Alpaca, found);
    let instruction = required_text(object, "instruction", found);
    let output = required_text(object, "output", found);
    let input = match object.get("input") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            found.report(
                ProblemCode::MissingContent,
                format!(
                    "`input` content is not a string (found {})",
                    json_type(other)
                ),
            );
            None
        }
    };
    match (instruction, output) {
        (Some(instruction), Some(output)) => {
            let user = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction,
            };
            vec![
                ChatMessage::new(Role::User, user),
                ChatMessage::new(Role::Assistant, output),
            ]
        }
        _ => Vec::new(),
    }
}

/// Turns map to roles through [`SHAREGPT_ROLES`]; a non-blank top-level `system` string
/// becomes a leading system message (an empty one, common in exports, is ignored).
fn sharegpt(object: &Map<String, Value>, found: &mut Findings) -> Vec<ChatMessage> {
    let Some(list) = turn_list(
        object,
        "conversations",
        ProblemCode::MissingConversationsList,
        found,
    ) else {
        return Vec::new();
    };

    let mut messages = Vec::with_capacity(list.len() + 1);
    messages.extend(leading_system(object, found));

    let mut has_assistant = false;
    for (index, turn) in list.iter().enumerate() {
        let what = format!("message {}", index + 1);
        let Some(turn) = message_object(turn, &what, ["from", "value"], found) else {
            continue;
        };
        let role = turn.get("from").and_then(|value| {
            let role = value.as_str().and_then(|from| {
                SHAREGPT_ROLES
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(from))
                    .map(|(_, role)| *role)
            });
            if role.is_none() {
                found.report(
                    ProblemCode::UnrecognizedRole,
                    format!(
                        "{what} is from {value} (allowed: human, user, gpt, assistant, bot, model, system)"
                    ),
                );
            }
            role
        });
        has_assistant |= role == Some(Role::Assistant);
        let content = turn
            .get("value")
            .and_then(|value| content_of(value, &what, found));
        if let (Some(role), Some(content)) = (role, content) {
            messages.push(ChatMessage::new(role, content));
        }
    }
    if !has_assistant {
        found.report(
            ProblemCode::ExampleMissingAssistantMessage,
            "no message is from gpt/assistant, so there is nothing to learn",
        );
    }
    messages
}
