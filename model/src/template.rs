//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template`, or
//! `chat_template` in `tokenizer_config.json`) rendered with minijinja the way
//! transformers' `apply_chat_template` renders it with Jinja2 (`trim_blocks`,
//! `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`), with a ChatML fallback for models that ship no template.

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const TEMPLATE_NAME: &str = "chat";

/// ChatML, for models without a chat template of their own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template refused the conversation: {0}")]
    Raised(String),
    #[error("cannot render the chat template: {0}")]
    Render(String),
    #[error("cannot read {path}: {message}")]
    Config { path: PathBuf, message: String },
}

/// One message as templates see it (`message['role']`, `message.content`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

impl TemplateMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What a `tokenizer_config.json` says about chat formatting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TokenizerConfig {
    /// Read `chat_template` (a string, or a list of `{name, template}` of which the
    /// `default` one is taken) and `bos_token`/`eos_token` (strings or `{content: ..}`).
    /// Without a `chat_template` key, a `chat_template.jinja` or `chat_template.json`
    /// next to the file is used, as newer transformers releases save them there.
    pub fn read(path: &Path) -> Result<Self, TemplateError> {
        let config_err = |path: &Path, message: String| TemplateError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| config_err(path, e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_err(path, e.to_string()))?;
        let mut chat_template = template_entry(json.get("chat_template"))
            .map_err(|message| config_err(path, message))?;
        if chat_template.is_none()
            && let Some(dir) = path.parent()
        {
            let jinja = dir.join("chat_template.jinja");
            let json_file = dir.join("chat_template.json");
            if jinja.is_file() {
                chat_template = Some(
                    std::fs::read_to_string(&jinja)
                        .map_err(|e| config_err(&jinja, e.to_string()))?,
                );
            } else if json_file.is_file() {
                let text = std::fs::read_to_string(&json_file)
                    .map_err(|e| config_err(&json_file, e.to_string()))?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| config_err(&json_file, e.to_string()))?;
                chat_template = template_entry(json.get("chat_template"))
                    .map_err(|message| config_err(&json_file, message))?;
            }
        }
        Ok(Self {
            chat_template,
            bos_token: token_entry(json.get("bos_token")),
            eos_token: token_entry(json.get("eos_token")),
        })
    }
}

/// `chat_template` as a string, or the `default` entry of a list of named templates.
fn template_entry(value: Option<&serde_json::Value>) -> Result<Option<String>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let template_of = |entry: &serde_json::Value| {
                entry
                    .get("template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            };
            let default = named
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"));
            match default {
                Some(entry) => template_of(entry)
                    .map(Some)
                    .ok_or_else(|| "the `default` chat template has no `template` string".into()),
                None => Err(format!(
                    "`chat_template` lists {} named templates but none is named `default`",
                    named.len()
                )),
            }
        }
        Some(other) => Err(format!(
            "`chat_template` is neither a string nor a list of named templates: {other}"
        )),
    }
}

/// A special token given as a string or as an `{"content": ..}` object.
fn token_entry(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("fallback", &self.fallback)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The error `raise_exception(msg)` raises, found again in the render error's sources.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compile `source`; `None` uses ChatML (and warns, since the model's own format is
    /// unknown).
    pub fn new(
        source: Option<String>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TemplateError> {
        let fallback = source.is_none();
        let source = source.unwrap_or_else(|| {
            tracing::warn!(
                "the model has no chat template; formatting conversations as ChatML, which it may not have been trained on"
            );
            CHATML_TEMPLATE.to_string()
        });
        let mut env = Environment::new();
        // What transformers' Jinja2 environment does.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            fallback,
        })
    }

    /// The template a GGUF file carries (`tokenizer.chat_template`), or ChatML.
    pub fn from_gguf(
        content: &gguf_file::Content,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TemplateError> {
        let source = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Self::new(source, bos_token, eos_token)
    }

    /// The template and bos/eos tokens of a `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, TemplateError> {
        let config = TokenizerConfig::read(path)?;
        Self::new(
            config.chat_template,
            config.bos_token.as_deref().unwrap_or(""),
            config.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// The conversation as the model's prompt text; `add_generation_prompt` appends the
    /// opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with(messages, add_generation_prompt, ())
    }

    /// Like [`render`](Self::render), with extra template variables (`date_string`,
    /// `enable_thinking`, `tools`, ...) taken from `extra`'s fields; they override the
    /// standard ones.
    pub fn render_with(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
        extra: impl Serialize,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let ctx = minijinja::context! { ..Value::from_serialize(extra), ..ctx };
        template.render(ctx).map_err(|e| {
            match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Raised>()) {
                Some(Raised(message)) => TemplateError::Raised(message.clone()),
                None => TemplateError::Render(describe(&e)),
            }
        })
    }

    /// Whether this is the ChatML fallback rather than the model's own template.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Hex sha256 of the template source.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.source.as_bytes()))
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception")
            .with_source(Raised(message)),
    )
}

/// Python's `datetime.now().strftime(fmt)`, in local time.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=..)`,
/// so `", "`/`": "` separators, keys in insertion order and no HTML escaping (minijinja's
/// own `tojson` is compact and HTML-safe, which changes tool schemas in prompts).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            let items = keys
                .into_iter()
                .map(|k| value.get_item(&k).map(|v| (Some(k), v)))
                .collect::<Result<Vec<_>, _>>()?;
            write_json_container(out, ('{', '}'), &items, style, depth)?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<(Option<Value>, Value)> = value.try_iter()?.map(|v| (None, v)).collect();
            write_json_container(out, ('[', ']'), &items, style, depth)?;
        }
        _ => write_json_string(out, &value.to_string(), style),
    }
    Ok(())
}

fn write_json_container(
    out: &mut String,
    (open, close): (char, char),
    items: &[(Option<Value>, Value)],
    style: &JsonStyle,
    depth: usize,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    };
    for (i, (key, item)) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(if style.indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        if let Some(key) = key {
            let key = key.as_str().map_or_else(|| key.to_string(), str::to_string);
            write_json_string(out, &key, style);
            out.push_str(": ");
        }
        write_json(out, item, style, depth + 1)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, style: &JsonStyle) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (style.ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float the way Python's `repr` (and so `json.dumps`) writes it.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let sci = format!("{f:e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// A minijinja error with its line and the chain of causes.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn conversation() -> Vec<TemplateMessage> {
        vec![
            TemplateMessage::new("system", "You are a helpful assistant."),
            TemplateMessage::new("user", "Hi"),
            TemplateMessage::new("assistant", "Hello! How can I help?"),
            TemplateMessage::new("user", "What is 2+2?"),
        ]
    }

    fn real_template() -> ChatTemplate {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/models")
            .join(crate::DEFAULT_MODEL_FILE);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -- models fetch` first",
                path.display()
            )
        });
        let content = gguf_file::Content::read(&mut BufReader::new(file)).unwrap();
        ChatTemplate::from_gguf(&content, "<|im_start|>", "<|im_end|>").unwrap()
    }

    // Expected strings below were rendered independently by transformers' Jinja2-based
    // `apply_chat_template` (transformers 5.23.0, Jinja2 3.1.6) on the tokenizer it
    // converts from the GGUF itself:
    //
    //   /tmp/tokref/bin/python -c 'from transformers import AutoTokenizer; \
    //     tok = AutoTokenizer.from_pretrained("data/models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"); \
    //     print(json.dumps(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)))'
    //
    // with conv = the four messages of `conversation()` (and `conv[1:]` with
    // add_generation_prompt=False for the no-system case).

    #[test]
    fn real_gguf_template_matches_transformers() {
        let template = real_template();
        assert!(!template.is_fallback());
        let expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(template.render(&conversation(), true).unwrap(), expected);
    }

    #[test]
    fn real_gguf_template_adds_its_default_system_prompt() {
        let template = real_template();
        let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
        assert_eq!(
            template.render(&conversation()[1..], false).unwrap(),
            expected
        );
    }

    #[test]
    fn no_template_falls_back_to_chatml() {
        let template = ChatTemplate::new(None, "", "").unwrap();
        assert!(template.is_fallback());
        let messages = [
            TemplateMessage::new("user", "Hi"),
            TemplateMessage::new("assistant", "Hello"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template.render(&messages[..1], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok";
        let template = ChatTemplate::new(Some(source.into()), "", "").unwrap();
        let err = template
            .render(&[TemplateMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(matches!(err, TemplateError::Raised(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("Conversation must start with a user message"),
            "{err}"
        );
        let ok = template.render(&[TemplateMessage::new("user", "x")], false);
        assert_eq!(ok.unwrap(), "ok");
    }

    #[test]
    fn malformed_template_is_an_error() {
        let err = ChatTemplate::new(Some("{% for m in messages %}{{ m.content }".into()), "", "")
            .unwrap_err();
        assert!(matches!(err, TemplateError::Compile(_)), "{err:?}");
        let err = ChatTemplate::new(Some("{% if x %}unclosed".into()), "", "").unwrap_err();
        assert!(matches!(err, TemplateError::Compile(_)), "{err:?}");
    }

    #[test]
    fn hf_style_blocks_python_methods_and_globals() {
        // trim_blocks + lstrip_blocks, .strip()/.startswith()/.split(), loop controls,
        // bos/eos globals, tojson.
        let source = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.content.startswith('skip') %}{% continue %}{% endif %}\n    {{ m.role.upper() }}: {{ m.content.strip() }} {{ m.content.split(' ')|length }}\n{% endfor %}\n{{ eos_token }}{{ {'a': 1}|tojson }}";
        let template = ChatTemplate::new(Some(source.into()), "<s>", "</s>").unwrap();
        let messages = [
            TemplateMessage::new("user", "  two words  "),
            TemplateMessage::new("user", "skip me"),
        ];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<s>\n    USER: two words 6\n</s>{\"a\": 1}"
        );
    }

    #[test]
    fn fingerprint_is_the_source_hash() {
        let a = ChatTemplate::new(Some("{{ 1 }}".into()), "", "").unwrap();
        assert_eq!(a.fingerprint(), hex::encode(Sha256::digest(b"{{ 1 }}")),);
        let fallback = ChatTemplate::new(None, "", "").unwrap();
        assert_ne!(a.fingerprint(), fallback.fingerprint());
    }

    #[test]
    fn tokenizer_config_forms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &path,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}],
                "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        let config = TokenizerConfig::read(&path).unwrap();
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert!(!template.is_fallback());
        assert_eq!(template.render(&[], false).unwrap(), "<s>D</s>");

        std::fs::write(&path, r#"{"chat_template": "plain {{ messages|length }}"}"#).unwrap();
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert_eq!(template.render(&conversation(), false).unwrap(), "plain 4");

        std::fs::write(&path, r#"{"eos_token": "</s>"}"#).unwrap();
        assert!(
            ChatTemplate::from_tokenizer_config(&path)
                .unwrap()
                .is_fallback()
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "J</s>");

        std::fs::write(
            &path,
            r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&path),
            Err(TemplateError::Config { .. })
        ));
    }

    /// transformers' `tojson`: `json.dumps` separators, insertion order, no HTML escaping.
    /// Expected output from `transformers.utils.chat_template_utils._compile_jinja_template(src)
    /// .render(messages=[{"role": "user", "content": "Hi"}])` (transformers 5.23.0).
    #[test]
    fn tojson_matches_transformers() {
        let src = r#"{% set tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, "strict": true, "n": none, "f": 1.5, "g": 2.0, "e": []}}] %}
{{ tools|tojson }}
{{ tools|tojson(indent=2) }}
{{ "<b>é\"\n"|tojson }} {{ {"z": 1, "a": [1, 2]}|tojson }} {{ messages[0]|tojson }}"#;
        let template = ChatTemplate::new(Some(src.into()), "", "").unwrap();
        let expected = "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather <now> & later\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}, \"strict\": true, \"n\": null, \"f\": 1.5, \"g\": 2.0, \"e\": []}}]\n[\n  {\n    \"type\": \"function\",\n    \"function\": {\n      \"name\": \"get_weather\",\n      \"description\": \"Weather <now> & later\",\n      \"parameters\": {\n        \"type\": \"object\",\n        \"properties\": {\n          \"city\": {\n            \"type\": \"string\"\n          }\n        },\n        \"required\": [\n          \"city\"\n        ]\n      },\n      \"strict\": true,\n      \"n\": null,\n      \"f\": 1.5,\n      \"g\": 2.0,\n      \"e\": []\n    }\n  }\n]\n\"<b>é\\\"\\n\" {\"z\": 1, \"a\": [1, 2]} {\"role\": \"user\", \"content\": \"Hi\"}";
        assert_eq!(
            template
                .render(&[TemplateMessage::new("user", "Hi")], false)
                .unwrap(),
            expected
        );
    }

    // Real templates: Meta-Llama-3-8B-Instruct, Llama-3.2-Instruct and Qwen2.5-Instruct
    // (copied from their tokenizer_config.json as quoted in guidance-ai/guidance's
    // guidance/chat.py). Expected renders from transformers' `apply_chat_template(conv,
    // chat_template=src, tokenize=False, add_generation_prompt=True,
    // bos_token="<|begin_of_text|>", date_string="26 Jul 2024")`, as above.

    /// A Llama 3 family template, with the family's BOS and end-of-turn tokens.
    fn llama3_family(source: &str) -> ChatTemplate {
        ChatTemplate::new(Some(source.into()), "<|begin_of_text|>", "<|eot_id|>").unwrap()
    }

    #[test]
    fn llama3_template_renders() {
        let template = llama3_family(LLAMA3_TEMPLATE);
        assert_eq!(
            template.render(&conversation(), true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn llama32_template_renders_with_strftime_now() {
        let template = llama3_family(LLAMA32_TEMPLATE);
        #[derive(Serialize)]
        struct Extra {
            date_string: &'static str,
        }
        let pinned = template
            .render_with(
                &conversation(),
                true,
                Extra {
                    date_string: "26 Jul 2024",
                },
            )
            .unwrap();
        assert_eq!(
            pinned,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Without date_string the template asks strftime_now for today's date.
        let today = chrono::Local::now().format("%d %b %Y").to_string();
        let rendered = template.render(&conversation(), true).unwrap();
        assert_eq!(rendered, pinned.replace("26 Jul 2024", &today));
    }

    #[test]
    fn qwen25_template_renders() {
        let template = ChatTemplate::new(Some(QWEN25_TEMPLATE.into()), "", "<|im_end|>").unwrap();
        let expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(template.render(&conversation(), true).unwrap(), expected);
        // Its own default system prompt when the conversation has none.
        let rendered = template.render(&conversation()[1..2], false).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    const LLAMA3_TEMPLATE: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}"#;

    const LLAMA32_TEMPLATE: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;
}
