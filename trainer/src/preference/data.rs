//! Preference data files: OpenAI's preference JSONL for DPO (`input.messages`,
//! `preferred_output`, `non_preferred_output`) and TRL's unpaired preference JSONL for
//! KTO (`prompt`, `completion`, `label`; prompt and completion as message lists or
//! strings). Every problem is reported with its line and a stable code, as for chat data.

use crate::config::Objective;
use loraloop_core::domain::{ChatMessage, Role};
use loraloop_core::preference::{KtoRow, PreferencePair};
use serde_json::Value;
use std::fmt;

/// A problem's stable, machine-readable kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceCode {
    /// The file is not UTF-8.
    InvalidUtf8,
    /// The file has no non-blank line.
    EmptyFile,
    /// A line is not a JSON object.
    InvalidJson,
    /// A required key is absent (the message names it).
    MissingKey,
    /// A message is not `{"role", "content"}` with a known role and non-blank text.
    InvalidMessage,
    /// The prompt has no user message, or does not end with one.
    InvalidPrompt,
    /// An output is not exactly one assistant message with non-blank text.
    InvalidOutput,
    /// DPO: the preferred and non-preferred outputs are the same text.
    IdenticalOutputs,
    /// KTO: `label` is not true or false.
    InvalidLabel,
}

impl PreferenceCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::EmptyFile => "empty_file",
            Self::InvalidJson => "invalid_json",
            Self::MissingKey => "missing_key",
            Self::InvalidMessage => "invalid_message",
            Self::InvalidPrompt => "invalid_prompt",
            Self::InvalidOutput => "invalid_output",
            Self::IdenticalOutputs => "identical_outputs",
            Self::InvalidLabel => "invalid_label",
        }
    }
}

/// One problem, on a line when it belongs to one.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceProblem {
    pub line: Option<usize>,
    pub code: PreferenceCode,
    pub message: String,
}

impl fmt::Display for PreferenceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.code.as_str(), self.message),
            None => write!(f, "file: {}: {}", self.code.as_str(), self.message),
        }
    }
}

/// A preference data set.
#[derive(Debug, Clone, PartialEq)]
pub enum PreferenceData {
    Pairs(Vec<PreferencePair>),
    Kto(Vec<KtoRow>),
}

impl PreferenceData {
    pub fn len(&self) -> usize {
        match self {
            Self::Pairs(p) => p.len(),
            Self::Kto(k) => k.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a preference dataset stores: one canonical JSON line per row.
    pub fn to_lines(&self) -> Vec<String> {
        match self {
            Self::Pairs(p) => p.iter().map(|r| r.to_json().to_string()).collect(),
            Self::Kto(k) => k.iter().map(|r| r.to_json().to_string()).collect(),
        }
    }
}

/// A preference dataset's stored lines (`Db::dataset_lines`) as rows of `objective`.
pub fn parse_stored(
    lines: &[String],
    objective: Objective,
) -> Result<PreferenceData, Vec<PreferenceProblem>> {
    parse_preference_jsonl(lines.join("\n").as_bytes(), objective)
}

/// Which preference file `bytes` is, by the keys of its first row: `dpo` (OpenAI's
/// `preferred_output`), `kto` (`completion` and `label`), or None (chat data).
pub fn detect_kind(bytes: &[u8]) -> Option<Objective> {
    let text = std::str::from_utf8(bytes).ok()?;
    let first = text.lines().find(|l| !l.trim().is_empty())?;
    let v: Value = serde_json::from_str(first.trim_start_matches('\u{feff}')).ok()?;
    let has = |k: &str| v.get(k).is_some();
    if has("preferred_output") || has("non_preferred_output") {
        Some(Objective::Dpo)
    } else if has("label") && has("completion") {
        Some(Objective::Kto)
    } else {
        None
    }
}

/// A preference file's kind and rows as stored lines, or every problem it has.
pub type PreferenceImport = Result<(Objective, Vec<String>), Vec<PreferenceProblem>>;

/// A file to import as a preference dataset: its kind (`format` "dpo" or "kto", or
/// detected when `format` is None) and its rows as stored lines, or every problem. None
/// when it is chat data.
pub fn preference_import(bytes: &[u8], format: Option<&str>) -> Option<PreferenceImport> {
    let kind = match format {
        Some(f) => f
            .parse::<Objective>()
            .ok()
            .filter(|k| *k != Objective::Sft)?,
        None => detect_kind(bytes)?,
    };
    Some(parse_preference_jsonl(bytes, kind).map(|d| (kind, d.to_lines())))
}

type Check<T> = Result<T, (PreferenceCode, String)>;

fn message(v: &Value, what: &str) -> Check<ChatMessage> {
    let bad = |m: String| (PreferenceCode::InvalidMessage, m);
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{what} has no \"role\"")))?;
    let role: Role = role.parse().map_err(|_| {
        bad(format!(
            "{what} has an unknown role {role:?} (allowed: system, user, assistant)"
        ))
    })?;
    let content = v
        .get("content")
        .and_then(Value::as_str)
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| bad(format!("{what} has no text in \"content\"")))?;
    Ok(ChatMessage::new(role, content))
}

/// A prompt: a message list (or, for KTO, a string: one user message) ending with the
/// user's turn.
fn prompt(v: &Value, key: &str) -> Check<Vec<ChatMessage>> {
    let messages = match v {
        Value::String(s) if !s.trim().is_empty() => vec![ChatMessage::new(Role::User, s.as_str())],
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| message(m, &format!("{key} message {}", i + 1)))
            .collect::<Check<Vec<_>>>()?,
        _ => {
            return Err((
                PreferenceCode::InvalidPrompt,
                format!("{key} must be a list of messages or non-blank text"),
            ));
        }
    };
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return Err((
            PreferenceCode::InvalidPrompt,
            format!("{key} must end with a user message (the completion answers it)"),
        ));
    }
    Ok(messages)
}

/// An output: one assistant message in a list (OpenAI), or text (TRL).
fn output(v: &Value, key: &str) -> Check<String> {
    let text = match v {
        Value::String(s) => Some(s.as_str()),
        Value::Array(list) if list.len() == 1 => {
            let m = message(&list[0], key)?;
            (m.role == Role::Assistant)
                .then_some(&list[0]["content"])
                .and_then(Value::as_str)
        }
        _ => None,
    };
    text.filter(|t| !t.trim().is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            (
                PreferenceCode::InvalidOutput,
                format!("{key} must be one assistant message with text"),
            )
        })
}

fn key<'v>(obj: &'v Value, k: &str) -> Check<&'v Value> {
    obj.get(k)
        .ok_or_else(|| (PreferenceCode::MissingKey, format!("no \"{k}\" key")))
}

fn pair(obj: &Value) -> Check<PreferencePair> {
    let input = key(obj, "input")?;
    let prompt = prompt(key(input, "messages")?, "input.messages")?;
    let preferred = output(key(obj, "preferred_output")?, "preferred_output")?;
    let non_preferred = output(key(obj, "non_preferred_output")?, "non_preferred_output")?;
    if preferred.trim() == non_preferred.trim() {
        return Err((
            PreferenceCode::IdenticalOutputs,
            "preferred_output and non_preferred_output are the same text: nothing to prefer".into(),
        ));
    }
    Ok(PreferencePair {
        prompt,
        preferred,
        non_preferred,
    })
}

fn kto_row(obj: &Value) -> Check<KtoRow> {
    let prompt = prompt(key(obj, "prompt")?, "prompt")?;
    let completion = output(key(obj, "completion")?, "completion")?;
    let label = key(obj, "label")?.as_bool().ok_or_else(|| {
        (
            PreferenceCode::InvalidLabel,
            "label must be true (desirable) or false (undesirable)".into(),
        )
    })?;
    Ok(KtoRow {
        prompt,
        completion,
        label,
    })
}

/// Parse a preference file for `objective` (dpo or kto): every row, or every problem.
pub fn parse_preference_jsonl(
    bytes: &[u8],
    objective: Objective,
) -> Result<PreferenceData, Vec<PreferenceProblem>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![PreferenceProblem {
            line: None,
            code: PreferenceCode::InvalidUtf8,
            message: format!("not UTF-8 at byte {}", e.valid_up_to()),
        }]
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pairs = Vec::new();
    let mut kto = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line)
            .map_err(|e| (PreferenceCode::InvalidJson, e.to_string()))
            .and_then(|v| match v.is_object() {
                true => Ok(v),
                false => Err((PreferenceCode::InvalidJson, "not a JSON object".into())),
            });
        let row = parsed.and_then(|obj| match objective {
            Objective::Kto => kto_row(&obj).map(|r| kto.push(r)),
            _ => pair(&obj).map(|p| pairs.push(p)),
        });
        if let Err((code, message)) = row {
            problems.push(PreferenceProblem {
                line: Some(i + 1),
                code,
                message,
            });
        }
    }
    if problems.is_empty() && pairs.is_empty() && kto.is_empty() {
        problems.push(PreferenceProblem {
            line: None,
            code: PreferenceCode::EmptyFile,
            message: "the file has no rows".into(),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(match objective {
        Objective::Kto => PreferenceData::Kto(kto),
        _ => PreferenceData::Pairs(pairs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_files_are_told_from_chat_files_by_their_first_row() {
        let dpo = r#"{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hello!"}], "non_preferred_output": [{"role": "assistant", "content": "What?"}]}"#;
        let kto = r#"{"prompt": "Hi", "completion": "Hello!", "label": true}"#;
        let chat = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#;
        assert_eq!(
            detect_kind(format!("\n{dpo}\n").as_bytes()),
            Some(Objective::Dpo)
        );
        assert_eq!(detect_kind(kto.as_bytes()), Some(Objective::Kto));
        assert_eq!(detect_kind(chat.as_bytes()), None);
        assert!(preference_import(chat.as_bytes(), None).is_none());
        assert!(preference_import(kto.as_bytes(), Some("openai")).is_none());
        let Some(Ok((kind, lines))) = preference_import(kto.as_bytes(), None) else {
            panic!("a kto file")
        };
        assert_eq!(kind, Objective::Kto);
        // Stored canonical: the prompt as messages, parsed back to the same row.
        assert_eq!(lines.len(), 1);
        let back = parse_preference_jsonl(lines[0].as_bytes(), Objective::Kto).unwrap();
        assert_eq!(
            back,
            parse_preference_jsonl(kto.as_bytes(), Objective::Kto).unwrap()
        );
        // A file named dpo that is not: every problem, as for chat data.
        let Some(Err(problems)) = preference_import(kto.as_bytes(), Some("dpo")) else {
            panic!("refused")
        };
        assert_eq!(problems[0].code, PreferenceCode::MissingKey);
    }

    fn codes(text: &str, objective: Objective) -> Vec<(Option<usize>, &'static str)> {
        match parse_preference_jsonl(text.as_bytes(), objective) {
            Ok(_) => Vec::new(),
            Err(p) => p.into_iter().map(|p| (p.line, p.code.as_str())).collect(),
        }
    }

    #[test]
    fn the_formats_other_tools_write_parse_and_each_problem_has_its_code() {
        let dpo = r#"{"input":{"messages":[{"role":"user","content":"Hi"}]},"preferred_output":[{"role":"assistant","content":"Hello!"}],"non_preferred_output":[{"role":"assistant","content":"Go away."}]}"#;
        let Ok(PreferenceData::Pairs(p)) = parse_preference_jsonl(dpo.as_bytes(), Objective::Dpo)
        else {
            panic!("parses")
        };
        assert_eq!(
            (p[0].preferred.as_str(), p[0].non_preferred.as_str()),
            ("Hello!", "Go away.")
        );
        let kto = "{\"prompt\":\"Hi\",\"completion\":\"Hello!\",\"label\":true}\n\n{\"prompt\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"completion\":[{\"role\":\"assistant\",\"content\":\"No.\"}],\"label\":false}";
        let Ok(PreferenceData::Kto(k)) = parse_preference_jsonl(kto.as_bytes(), Objective::Kto)
        else {
            panic!("parses")
        };
        assert_eq!(
            k.iter()
                .map(|r| (r.completion.as_str(), r.label))
                .collect::<Vec<_>>(),
            [("Hello!", true), ("No.", false)]
        );
        let bad_dpo = [
            "not json",
            r#"{"preferred_output":"a","non_preferred_output":"b"}"#,
            r#"{"input":{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"x"}]},"preferred_output":"a","non_preferred_output":"b"}"#,
            r#"{"input":{"messages":[{"role":"robot","content":"Hi"}]},"preferred_output":"a","non_preferred_output":"b"}"#,
            r#"{"input":{"messages":[{"role":"user","content":"Hi"}]},"preferred_output":[{"role":"user","content":"a"}],"non_preferred_output":"b"}"#,
            r#"{"input":{"messages":[{"role":"user","content":"Hi"}]},"preferred_output":"same","non_preferred_output":" same"}"#,
        ]
        .join("\n");
        assert_eq!(
            codes(&bad_dpo, Objective::Dpo),
            [
                (Some(1), "invalid_json"),
                (Some(2), "missing_key"),
                (Some(3), "invalid_prompt"),
                (Some(4), "invalid_message"),
                (Some(5), "invalid_output"),
                (Some(6), "identical_outputs"),
            ]
        );
        assert_eq!(
            codes(
                r#"{"prompt":"Hi","completion":"Yo","label":"yes"}"#,
                Objective::Kto
            ),
            [(Some(1), "invalid_label")]
        );
        assert_eq!(codes("\n \n", Objective::Kto), [(None, "empty_file")]);
    }
}
