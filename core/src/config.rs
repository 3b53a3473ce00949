//! Configuration in two steps (zero2prod's pattern): a raw tree from `loraloop.yaml` plus
//! `LORALOOP_...` environment overrides is deserialized into [`RawConfig`], then validated
//! into the [`Config`] the code uses. Secrets come from the environment only and live in
//! [`secrecy::SecretString`], whose `Debug` prints `[REDACTED]`.
//!
//! Environment overrides name a key path with `__` between levels:
//! `LORALOOP_SERVER__PORT=9000` sets `server.port`, `LORALOOP_DATA_DIR=/srv/ll` sets
//! `data_dir`. Values are read as YAML scalars (`9000` is a number, `[1, 2]` a list);
//! text YAML would read as a map or a comment stays text.

pub use crate::assistant_settings::{DEFAULT_SYSTEM_PROMPT, GenerationConfig};
use crate::canary::CanaryConfig;
use crate::gate::{ActivationPolicy, GateConfig};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Environment variable naming the config file (the `--config` flag wins over it).
pub const CONFIG_ENV: &str = "LORALOOP_CONFIG";
/// Config file read when neither `--config` nor `LORALOOP_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "loraloop.yaml";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "LORALOOP_";

/// The secrets and the environment variables they come from. Nothing else reads them.
pub const SECRET_VARS: [(&str, &str); 4] = [
    ("telegram_bot_token", "TELEGRAM_BOT_TOKEN"),
    ("discord_bot_token", "DISCORD_BOT_TOKEN"),
    ("api_key", "LORALOOP_API_KEY"),
    ("admin_password", "LORALOOP_ADMIN_PASSWORD"),
];

/// `LORALOOP_` variables that are not key overrides.
const RESERVED_VARS: [&str; 5] = [
    CONFIG_ENV,
    "LORALOOP_API_KEY",
    "LORALOOP_ADMIN_PASSWORD",
    "LORALOOP_LOG",
    "LORALOOP_TRAIN_PROFILE",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `error`, not `source`: the message holds it already (printed with its causes, a
    // source said it twice).
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{origin}: invalid value for `{key}`: {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
    #[error(
        "`{key}` is a secret and is read from the environment only: remove it from {origin} and set {var}"
    )]
    SecretInFile {
        key: String,
        origin: String,
        var: &'static str,
    },
}

/// Where a key's value came from, for error messages.
#[derive(Debug, Default, Clone)]
struct Origins {
    file: Option<PathBuf>,
    env: BTreeMap<String, String>, // key path -> variable name
}

impl Origins {
    fn of(&self, key: &str) -> String {
        if let Some(var) = self
            .env
            .iter()
            .find(|(path, _)| key == path.as_str() || key.starts_with(&format!("{path}.")))
            .map(|(_, var)| var)
        {
            return format!("environment variable {var}");
        }
        match &self.file {
            Some(p) => format!("config file {}", p.display()),
            None => "defaults".to_string(),
        }
    }
}

/// The file/environment shape. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Folder for the database and models unless they are set explicitly.
    pub data_dir: PathBuf,
    /// SQLite database file. Default: `<data_dir>/loraloop.db`.
    pub database: Option<PathBuf>,
    /// Folder of local model files. Default: `<data_dir>/models`.
    pub models_dir: Option<PathBuf>,
    /// Model the assistant runs: a file name in `models_dir` or a path.
    pub model: String,
    /// Inference and training device: `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub server: ServerConfig,
    pub assistant: AssistantConfig,
    /// More assistants on the same model, each with its own routes.
    pub assistants: Vec<crate::assistant_settings::AssistantEntry>,
    pub generation: GenerationConfig,
    pub engine: EngineConfig,
    pub telegram: TelegramConfig,
    pub discord: DiscordConfig,
    /// The thresholds a new adapter's report card is held to.
    pub gate: GateConfig,
    /// How a canary release is run and decided (`assistant.activation: canary`).
    pub canary: CanaryConfig,
    /// Where a job's `dataset_url` may read from.
    pub imports: ImportConfig,
    /// How long the tables that grow with use keep their rows.
    pub retention: RetentionConfig,
    /// Which conversations besides the bots' are stored for the learning loop.
    pub record: RecordConfig,
}

/// Conversations outside the bots that are stored like theirs (platform `api` / `cli`),
/// so they can be rated and trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordConfig {
    /// `/v1/chat/completions`: one user per OpenAI `user` field (else the API key).
    pub api: bool,
    /// `loraloop chat`: one user per session.
    pub cli: bool,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            api: true,
            cli: true,
        }
    }
}

/// How long the tables that grow with use keep their rows, in days (checked hourly by
/// `serve`; expired console sessions go too).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Handled Telegram/Discord updates (pending ones are kept until answered).
    pub updates_days: f64,
    /// The events (losses, messages) of jobs that ended.
    pub training_events_days: f64,
    /// The audit log.
    pub audit_days: f64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            updates_days: 30.0,
            training_events_days: 365.0,
            audit_days: 365.0,
        }
    }
}

impl RetentionConfig {
    pub fn retention(&self) -> crate::storage::Retention {
        crate::storage::Retention {
            updates_days: self.updates_days,
            training_events_days: self.training_events_days,
            audit_days: self.audit_days,
        }
    }
}

/// Where a job's `dataset_url` may read from: http(s) to public addresses, local files
/// only under `dir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportConfig {
    /// The folder local `dataset_url` paths are read from (none: local files are refused).
    pub dir: Option<PathBuf>,
    /// Let `dataset_url` reach loopback, private and link-local addresses.
    pub allow_private_addresses: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest dataset or adapter upload, in MB.
    pub max_upload_mb: u64,
    /// Reverse proxies in front of the server (their addresses): for a request from one
    /// of them, the client is the address it names in `X-Forwarded-For` (what the login
    /// throttle counts by). Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Seconds a connection has to send a request's headers, the first request's and each
    /// later one's on a kept-alive connection; then it is closed.
    pub header_timeout_secs: f64,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Connections open at once from one address (a trusted proxy has no such cap).
    pub max_connections_per_address: usize,
    /// Seconds a stop waits for the requests in flight (a streaming reply) before it
    /// closes their connections.
    pub shutdown_grace_secs: f64,
}

/// The default assistant: it answers wherever no route names another.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssistantConfig {
    pub name: String,
    pub system_prompt: String,
    /// How a finished job's adapter reaches users: `manual`, `gate` or `canary`.
    pub activation: ActivationPolicy,
    /// A conversation stays on the adapter it started with until it has been idle this
    /// long, so a swap never changes the voice mid-conversation (0: no pinning).
    pub pin_idle_minutes: f64,
}

/// How much the inference engine runs at once; what is beyond waits in a fair line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Replies decoded together at most.
    pub max_sequences: usize,
    /// Replies running at once for one user (a chat user, an API request's `user`).
    pub max_per_user: usize,
    /// Prompt tokens run per step: how long one long prompt may hold up the others.
    pub prefill_chunk: usize,
    /// Memory for the running replies' attention caches, in MiB.
    pub kv_cache_mib: usize,
    /// Memory for finished replies' attention caches, in MiB: a prompt that begins with
    /// one (a conversation's next message, a shared system prompt) starts after it
    /// instead of running it again. 0: none kept.
    pub prefix_cache_mib: usize,
    /// Memory for loaded adapters, in MiB: beyond it the least recently used is unloaded
    /// (and loaded again, off the engine thread, when a conversation needs it).
    pub adapter_cache_mib: usize,
    /// Replies running or waiting at most; beyond, a request is refused at once (the API
    /// answers 503, a bot says it is busy and answers later).
    pub max_queued: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let d = loraloop_model::engine::EngineLimits::default();
        Self {
            max_sequences: d.max_sequences,
            max_per_user: d.max_per_user,
            prefill_chunk: d.prefill_chunk,
            kv_cache_mib: 1024,
            prefix_cache_mib: 256,
            adapter_cache_mib: 1024,
            max_queued: d.max_in_flight,
        }
    }
}

impl EngineConfig {
    /// The engine's limits for `model` (its cache takes f32 values on the CPU, bf16 on a
    /// GPU).
    pub fn limits(
        &self,
        model: &loraloop_model::engine::LoadedModel,
    ) -> loraloop_model::engine::EngineLimits {
        let bytes = if model.llama.device.is_cpu() { 4 } else { 2 };
        loraloop_model::engine::EngineLimits {
            max_sequences: self.max_sequences,
            max_per_user: self.max_per_user,
            prefill_chunk: self.prefill_chunk,
            kv_positions: loraloop_model::engine::EngineLimits::kv_positions(
                &model.llama.config,
                self.kv_cache_mib,
                bytes,
            ),
            prefix_cache_positions: loraloop_model::engine::EngineLimits::kv_positions(
                &model.llama.config,
                self.prefix_cache_mib,
                bytes,
            ),
            max_in_flight: self.max_queued,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramConfig {
    /// Bot API base URL (people run their own Bot API server).
    pub api_url: String,
    /// Webhook mode instead of long polling when set (https only).
    pub webhook_url: Option<String>,
    /// Telegram user ids allowed to chat; empty means everyone.
    pub allowed_user_ids: Vec<i64>,
    /// Messages per user per minute before the bot answers with a notice.
    pub rate_limit_per_minute: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscordConfig {
    /// Base URL of a Discord API proxy (for example twilight's http-proxy) that takes the
    /// REST calls instead of Discord; it does the rate limiting then, the bot's own limiter
    /// is off. Unset: Discord itself.
    pub api_url: Option<String>,
    /// Servers (guilds) the bot answers in; empty means every server it is in.
    pub allowed_guild_ids: Vec<u64>,
    /// Server channels the bot answers in (a thread counts as its parent channel); empty
    /// means every channel.
    pub allowed_channel_ids: Vec<u64>,
    /// Whether the bot answers direct messages.
    pub direct_messages: bool,
    /// The role whose members may use `/status`: its numeric id (safer: a role name can be
    /// taken by anyone allowed to create roles in any server the bot is in) or its name.
    #[serde(deserialize_with = "string_or_number")]
    pub admin_role: Option<String>,
    /// Register slash commands in this guild only (development) instead of globally.
    pub dev_guild_id: Option<u64>,
    pub rate_limit_per_minute: u32,
}

/// A text value that may be written as a bare number (a Discord id: `admin_role: 123`).
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Number(u64),
    }
    Ok(Option::<Value>::deserialize(d)?.map(|v| match v {
        Value::Text(t) => t,
        Value::Number(n) => n.to_string(),
    }))
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database: None,
            models_dir: None,
            model: crate::DEFAULT_MODEL_FILE.to_string(),
            device: "auto".to_string(),
            server: ServerConfig::default(),
            assistant: AssistantConfig::default(),
            assistants: Vec::new(),
            generation: GenerationConfig::default(),
            engine: EngineConfig::default(),
            telegram: TelegramConfig::default(),
            discord: DiscordConfig::default(),
            gate: GateConfig::default(),
            canary: CanaryConfig::default(),
            imports: ImportConfig::default(),
            retention: RetentionConfig::default(),
            record: RecordConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 8080,
            max_upload_mb: 100,
            trusted_proxies: Vec::new(),
            header_timeout_secs: 30.0,
            max_connections: 1024,
            max_connections_per_address: 256,
            shutdown_grace_secs: 20.0,
        }
    }
}

impl Default for AssistantConfig {
    fn default() -> Self {
        Self {
            name: "loraloop".to_string(),
            system_prompt: DEFAULT_SYSTEM_PROMPT.to_string(),
            activation: ActivationPolicy::default(),
            pin_idle_minutes: 30.0,
        }
    }
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.telegram.org".to_string(),
            webhook_url: None,
            allowed_user_ids: Vec::new(),
            rate_limit_per_minute: 20,
        }
    }
}

impl Default for DiscordConfig {
    fn default() -> Self {
        Self {
            api_url: None,
            allowed_guild_ids: Vec::new(),
            allowed_channel_ids: Vec::new(),
            direct_messages: true,
            admin_role: None,
            dev_guild_id: None,
            rate_limit_per_minute: 20,
        }
    }
}

/// Secrets, from the environment only. `Debug` prints `[REDACTED]` for each one set.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub telegram_bot_token: Option<SecretString>,
    pub discord_bot_token: Option<SecretString>,
    pub api_key: Option<SecretString>,
    pub admin_password: Option<SecretString>,
}

impl Secrets {
    fn from_env(env: &BTreeMap<String, String>) -> Self {
        let get = |var: &str| {
            env.get(var)
                .filter(|v| !v.is_empty())
                .map(|v| SecretString::from(v.clone()))
        };
        Self {
            telegram_bot_token: get("TELEGRAM_BOT_TOKEN"),
            discord_bot_token: get("DISCORD_BOT_TOKEN"),
            api_key: get("LORALOOP_API_KEY"),
            admin_password: get("LORALOOP_ADMIN_PASSWORD"),
        }
    }

    fn is_set(&self, key: &str) -> bool {
        match key {
            "telegram_bot_token" => self.telegram_bot_token.is_some(),
            "discord_bot_token" => self.discord_bot_token.is_some(),
            "api_key" => self.api_key.is_some(),
            "admin_password" => self.admin_password.is_some(),
            _ => false,
        }
    }
}

pub use loraloop_model::device::DeviceChoice;

/// The validated configuration the program uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// The validated values as read (kept for `config check`).
    pub raw: RawConfig,
    /// The config file that was read, if any.
    pub source: Option<PathBuf>,
    pub database_path: PathBuf,
    pub models_dir: PathBuf,
    pub device: DeviceChoice,
    pub secrets: Secrets,
}

/// Where to look for the config file: `--config` first, then `LORALOOP_CONFIG`, then
/// `./loraloop.yaml` if it exists. An explicitly named file must exist.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub explicit_path: Option<PathBuf>,
}

impl Config {
    /// Load from the process environment.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_with_env(source, &env)
    }

    /// Load with an explicit environment (tests pass their own map).
    pub fn load_with_env(
        source: &ConfigSource,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let explicit = source.explicit_path.clone().or_else(|| {
            env.get(CONFIG_ENV)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let file = match explicit {
            Some(p) => Some(p),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                p.exists().then_some(p)
            }
        };
        let mut origins = Origins {
            file: file.clone(),
            ..Default::default()
        };
        let mut tree = match &file {
            Some(path) => read_yaml(path)?,
            None => serde_yaml::Value::Mapping(Default::default()),
        };
        if tree.is_null() {
            tree = serde_yaml::Value::Mapping(Default::default());
        }
        reject_secrets_in_file(&tree, &origins)?;
        apply_env_overrides(&mut tree, env, &mut origins)?;

        // Keys retried as text, with the first error (told if the text fails too).
        let mut as_text: BTreeMap<String, String> = BTreeMap::new();
        let raw: RawConfig = loop {
            let e = match serde_path_to_error::deserialize(tree.clone()) {
                Ok(raw) => break raw,
                Err(e) => e,
            };
            let key = e.path().to_string();
            // A key that takes text, set from the environment to what YAML reads as a number
            // or a boolean (LORALOOP_MODEL=5 names the file `5`): the variable's text.
            let text = origins.env.get(&key).and_then(|var| env.get(var));
            let message = e.into_inner().to_string();
            if let Some(text) = text
                && message.starts_with("invalid type")
                && !as_text.contains_key(&key)
            {
                let parts: Vec<String> = key.split('.').map(str::to_string).collect();
                if set_path(&mut tree, &parts, serde_yaml::Value::String(text.clone())).is_ok() {
                    as_text.insert(key, message);
                    continue;
                }
            }
            return Err(ConfigError::Invalid {
                origin: origins.of(&key),
                message: as_text.remove(&key).unwrap_or(message),
                key,
            });
        };
        Self::validate(raw, file, Secrets::from_env(env), &origins)
    }

    fn validate(
        raw: RawConfig,
        source: Option<PathBuf>,
        secrets: Secrets,
        origins: &Origins,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            origin: origins.of(key),
            message,
        };
        if let Err((field, message)) = raw.generation.check() {
            return Err(invalid(&format!("generation.{field}"), message));
        }
        let e = &raw.engine;
        for (key, value, max) in [
            ("engine.max_sequences", e.max_sequences, 1024),
            ("engine.max_per_user", e.max_per_user, 1024),
            ("engine.prefill_chunk", e.prefill_chunk, 8192),
            ("engine.kv_cache_mib", e.kv_cache_mib, 1 << 20),
            ("engine.adapter_cache_mib", e.adapter_cache_mib, 1 << 20),
            ("engine.max_queued", e.max_queued, 1 << 20),
        ] {
            if !(1..=max).contains(&value) {
                return Err(invalid(key, format!("got {value}; allowed: 1 to {max}")));
            }
        }
        if e.prefix_cache_mib > 1 << 20 {
            return Err(invalid(
                "engine.prefix_cache_mib",
                format!("got {}; allowed: 0 to {}", e.prefix_cache_mib, 1 << 20),
            ));
        }
        let r = &raw.retention;
        for (key, days) in [
            ("retention.updates_days", r.updates_days),
            ("retention.training_events_days", r.training_events_days),
            ("retention.audit_days", r.audit_days),
        ] {
            if !(days.is_finite() && days > 0.0 && days <= 36_500.0) {
                return Err(invalid(
                    key,
                    format!("got {days}; allowed: more than 0, at most 36500 (days)"),
                ));
            }
        }
        if raw.server.host.parse::<IpAddr>().is_err() && !is_hostname(&raw.server.host) {
            return Err(invalid(
                "server.host",
                format!(
                    "got {:?}; allowed: an IP address (127.0.0.1, 0.0.0.0, ::1) or a host name",
                    raw.server.host
                ),
            ));
        }
        if !(1..=100_000).contains(&raw.server.max_upload_mb) {
            return Err(invalid(
                "server.max_upload_mb",
                format!(
                    "got {}; allowed: 1 to 100000 (megabytes)",
                    raw.server.max_upload_mb
                ),
            ));
        }
        let t = raw.server.header_timeout_secs;
        if !(t.is_finite() && (0.1..=3600.0).contains(&t)) {
            return Err(invalid(
                "server.header_timeout_secs",
                format!("got {t}; allowed: 0.1 to 3600 (seconds)"),
            ));
        }
        if !(1..=1_000_000).contains(&raw.server.max_connections) {
            return Err(invalid(
                "server.max_connections",
                format!("got {}; allowed: 1 to 1000000", raw.server.max_connections),
            ));
        }
        let g = raw.server.shutdown_grace_secs;
        if !(g.is_finite() && (0.0..=3600.0).contains(&g)) {
            return Err(invalid(
                "server.shutdown_grace_secs",
                format!("got {g}; allowed: 0 to 3600 (seconds)"),
            ));
        }
        if !(1..=raw.server.max_connections).contains(&raw.server.max_connections_per_address) {
            return Err(invalid(
                "server.max_connections_per_address",
                format!(
                    "got {}; allowed: 1 to server.max_connections ({})",
                    raw.server.max_connections_per_address, raw.server.max_connections
                ),
            ));
        }
        if raw.model.trim().is_empty() {
            return Err(invalid(
                "model",
                "got an empty string; allowed: a model file name in models_dir or a path"
                    .to_string(),
            ));
        }
        // The same names as `assistants:` and the API allow: it is the OpenAI endpoint's
        // model name and the console's address of the assistant.
        if let Some(why) = crate::assistant_settings::name_problem(&raw.assistant.name) {
            return Err(invalid("assistant.name", why));
        }
        let mut names = vec![raw.assistant.name.as_str()];
        // Each route's first assistant: a route names one (a second would silently win).
        let mut routed: Vec<((&str, &str, String), &str)> = Vec::new();
        for (i, a) in raw.assistants.iter().enumerate() {
            if let Some(why) = crate::assistant_settings::name_problem(&a.name) {
                return Err(invalid(&format!("assistants.{i}.name"), why));
            }
            if names.contains(&a.name.as_str()) {
                return Err(invalid(
                    &format!("assistants.{i}.name"),
                    format!(
                        "{:?} is taken: every assistant needs its own name (assistant.name included)",
                        a.name
                    ),
                ));
            }
            names.push(&a.name);
            if let Err((field, message)) = a.generation.over(&raw.generation).check() {
                return Err(invalid(
                    &format!("assistants.{i}.generation.{field}"),
                    message,
                ));
            }
            if let Some((_, scope, key)) = a
                .routes
                .all()
                .into_iter()
                .find(|(_, _, key)| key.parse::<i64>().is_err())
            {
                return Err(invalid(
                    &format!("assistants.{i}.routes"),
                    format!(
                        "{key:?} is not a {scope} id (a number; a Telegram bot's is the part of its token before the colon)"
                    ),
                ));
            }
            for route in a.routes.all() {
                if let Some((_, owner)) = routed
                    .iter()
                    .find(|(r, owner)| *r == route && *owner != a.name)
                {
                    let (platform, scope, key) = route;
                    return Err(invalid(
                        &format!("assistants.{i}.routes"),
                        format!(
                            "{platform} {scope} {key} is routed to {owner:?} already: a route sends its chats to one assistant"
                        ),
                    ));
                }
                routed.push((route, &a.name));
            }
        }
        if let Err((key, message)) = raw.gate.check() {
            return Err(invalid(key, message));
        }
        if let Err((key, message)) = raw.canary.check() {
            return Err(invalid(key, message));
        }
        let pin = raw.assistant.pin_idle_minutes;
        if !(pin.is_finite() && (0.0..=10_080.0).contains(&pin)) {
            return Err(invalid(
                "assistant.pin_idle_minutes",
                format!("got {pin}; allowed: 0 (no pinning) to 10080 (a week)"),
            ));
        }
        if !is_http_url(&raw.telegram.api_url) {
            return Err(invalid(
                "telegram.api_url",
                format!(
                    "got {:?}; allowed: an http:// or https:// URL",
                    raw.telegram.api_url
                ),
            ));
        }
        if let Some(url) = &raw.discord.api_url
            && !is_http_url(url)
        {
            return Err(invalid(
                "discord.api_url",
                format!("got {url:?}; allowed: an http:// or https:// URL"),
            ));
        }
        if let Some(url) = &raw.telegram.webhook_url
            && !url.starts_with("https://")
        {
            return Err(invalid(
                "telegram.webhook_url",
                format!(
                    "got {url:?}; allowed: an https:// URL (Telegram only calls https webhooks)"
                ),
            ));
        }
        for (key, value) in [
            (
                "telegram.rate_limit_per_minute",
                raw.telegram.rate_limit_per_minute,
            ),
            (
                "discord.rate_limit_per_minute",
                raw.discord.rate_limit_per_minute,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "got 0; allowed: 1 or more".to_string()));
            }
        }
        if raw.discord.dev_guild_id == Some(0) {
            return Err(invalid(
                "discord.dev_guild_id",
                "got 0; allowed: a server (guild) id, 1 or more".to_string(),
            ));
        }
        let device: DeviceChoice = raw
            .device
            .parse()
            .map_err(|m: String| invalid("device", m))?;
        let database_path = raw
            .database
            .clone()
            .unwrap_or_else(|| raw.data_dir.join("loraloop.db"));
        let models_dir = raw
            .models_dir
            .clone()
            .unwrap_or_else(|| raw.data_dir.join("models"));
        Ok(Self {
            raw,
            source,
            database_path,
            models_dir,
            device,
            secrets,
        })
    }

    /// The model file the assistant runs: `model` as a path if it names an existing file or
    /// contains a path separator, else a file in `models_dir`.
    pub fn model_path(&self) -> PathBuf {
        let m = Path::new(&self.raw.model);
        if m.components().count() > 1 || m.exists() {
            m.to_path_buf()
        } else {
            self.models_dir.join(m)
        }
    }

    /// The effective configuration as YAML with every secret replaced by whether it is
    /// set. This is what `loraloop config check` prints; no secret value can reach it
    /// because it is built from [`RawConfig`] (which has no secret fields) and booleans.
    pub fn redacted_yaml(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            config_file: String,
            database_path: &'a Path,
            models_dir: &'a Path,
            #[serde(flatten)]
            raw: &'a RawConfig,
            secrets: BTreeMap<&'static str, String>,
        }
        let secrets = SECRET_VARS
            .iter()
            .map(|(key, var)| {
                let state = if self.secrets.is_set(key) {
                    format!("[redacted] (from {var})")
                } else {
                    format!("not set ({var})")
                };
                (*key, state)
            })
            .collect();
        let view = View {
            config_file: self
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none (defaults and environment)".to_string()),
            database_path: &self.database_path,
            models_dir: &self.models_dir,
            raw: &self.raw,
            secrets,
        };
        serde_yaml::to_string(&view).expect("the config view always serializes")
    }
}

fn read_yaml(path: &Path) -> Result<serde_yaml::Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::Yaml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn reject_secrets_in_file(tree: &serde_yaml::Value, origins: &Origins) -> Result<(), ConfigError> {
    // Secrets under their own name at the top level or in the platform sections.
    let candidates: [(&str, &[&str], &'static str); 6] = [
        (
            "telegram.bot_token",
            &["telegram", "bot_token"],
            "TELEGRAM_BOT_TOKEN",
        ),
        (
            "discord.bot_token",
            &["discord", "bot_token"],
            "DISCORD_BOT_TOKEN",
        ),
        (
            "telegram_bot_token",
            &["telegram_bot_token"],
            "TELEGRAM_BOT_TOKEN",
        ),
        (
            "discord_bot_token",
            &["discord_bot_token"],
            "DISCORD_BOT_TOKEN",
        ),
        ("api_key", &["api_key"], "LORALOOP_API_KEY"),
        (
            "admin_password",
            &["admin_password"],
            "LORALOOP_ADMIN_PASSWORD",
        ),
    ];
    for (key, path, var) in candidates {
        let mut node = Some(tree);
        for part in path {
            node = node.and_then(|n| n.get(*part));
        }
        if node.is_some() {
            return Err(ConfigError::SecretInFile {
                key: key.to_string(),
                origin: origins.of(key),
                var,
            });
        }
    }
    Ok(())
}

fn apply_env_overrides(
    tree: &mut serde_yaml::Value,
    env: &BTreeMap<String, String>,
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if RESERVED_VARS.contains(&var.as_str()) || rest.is_empty() {
            continue;
        }
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let key = parts.join(".");
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Invalid {
                key,
                origin: format!("environment variable {var}"),
                message:
                    "malformed name; use LORALOOP_SECTION__KEY (two underscores between levels)"
                        .into(),
            });
        }
        // A value on the way that is not a section is the fault of where it came from
        // (the file, or another variable), not of this variable.
        set_path(tree, &parts, env_value(value)).map_err(|(depth, found)| {
            let section = parts[..depth].join(".");
            ConfigError::Invalid {
                origin: origins.of(&section),
                message: format!(
                    "expected a section of keys (here {var} sets `{key}`), found {found}"
                ),
                key: if section.is_empty() {
                    ".".into()
                } else {
                    section
                },
            }
        })?;
        origins.env.insert(key, var.clone());
    }
    Ok(())
}

/// An environment value read as YAML where it is a scalar or a list (`9000`, `true`,
/// `[1, 2]`), else as its text: free text such as a system prompt reads as a map
/// (`Note: be brief`) or a comment (`# Rules`) in YAML, which is never what was meant.
fn env_value(text: &str) -> serde_yaml::Value {
    use serde_yaml::Value;
    if text.is_empty() {
        return Value::Null;
    }
    match serde_yaml::from_str::<Value>(text) {
        Ok(Value::Null) if matches!(text.trim(), "~" | "null" | "Null" | "NULL") => Value::Null,
        Ok(Value::Null | Value::Mapping(_) | Value::Tagged(_)) | Err(_) => {
            Value::String(text.to_string())
        }
        Ok(v) => v,
    }
}

/// Set `parts` (a key path) to `value`; on a value that is not a section on the way, its
/// depth and what it is.
fn set_path(
    tree: &mut serde_yaml::Value,
    parts: &[String],
    value: serde_yaml::Value,
) -> Result<(), (usize, &'static str)> {
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        // `server:` with nothing under it is an empty section.
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            other => return Err((i, yaml_kind(other))),
        };
        let k = serde_yaml::Value::String(part.clone());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    }
    Ok(())
}

/// What a YAML value is, for messages.
fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "nothing",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a section",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_http_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_yaml(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loraloop.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load_with_env(
            &ConfigSource {
                explicit_path: Some(path),
            },
            &env(vars),
        )
    }

    fn invalid_key(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid-value error, got {other}"),
        }
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let cfg = load_yaml("", &[]).unwrap();
        assert_eq!(cfg.raw.server.host, "127.0.0.1");
        assert_eq!(cfg.raw.server.port, 8080);
        assert_eq!(cfg.database_path, PathBuf::from("data/loraloop.db"));
        assert_eq!(cfg.models_dir, PathBuf::from("data/models"));
        assert_eq!(cfg.device, DeviceChoice::Auto);
        assert_eq!(
            cfg.model_path(),
            PathBuf::from("data/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }

    #[test]
    fn free_text_in_the_environment_is_taken_as_text() {
        for prompt in ["Note: be brief", "# Rules", "!important", "a: b: c"] {
            let cfg = load_yaml("", &[("LORALOOP_ASSISTANT__SYSTEM_PROMPT", prompt)])
                .unwrap_or_else(|e| panic!("{prompt}: {e}"));
            assert_eq!(cfg.raw.assistant.system_prompt, prompt);
        }
    }

    #[test]
    fn a_number_or_boolean_in_the_environment_is_text_where_the_key_takes_text() {
        let cfg = load_yaml(
            "",
            &[
                ("LORALOOP_MODEL", "5"),
                ("LORALOOP_ASSISTANT__SYSTEM_PROMPT", "true"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.raw.model, "5");
        assert_eq!(cfg.raw.assistant.system_prompt, "true");
        // A key that takes a number still tells what it was given.
        let e = load_yaml("", &[("LORALOOP_SERVER__PORT", "true")]).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("invalid type: boolean `true`, expected u16"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_nest_with_double_underscores() {
        let cfg = load_yaml(
            "server:\n  port: 9000\ndata_dir: /srv/a\n",
            &[
                ("LORALOOP_SERVER__PORT", "9100"),
                ("LORALOOP_DATA_DIR", "/srv/b"),
                ("LORALOOP_TELEGRAM__ALLOWED_USER_IDS", "[1, 2]"),
                ("LORALOOP_DISCORD__API_URL", "http://127.0.0.1:9"),
                ("LORALOOP_DISCORD__DIRECT_MESSAGES", "false"),
                ("LORALOOP_DISCORD__ADMIN_ROLE", "987654321012345678"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.raw.server.port, 9100);
        assert_eq!(cfg.database_path, PathBuf::from("/srv/b/loraloop.db"));
        assert_eq!(cfg.raw.telegram.allowed_user_ids, vec![1, 2]);
        assert_eq!(
            cfg.raw.discord.api_url.as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert!(!cfg.raw.discord.direct_messages);
        // A role id reads as YAML's number; it is kept as its digits.
        assert_eq!(
            cfg.raw.discord.admin_role.as_deref(),
            Some("987654321012345678")
        );
    }

    #[test]
    fn a_wrongly_typed_value_names_its_key_and_origin() {
        let err = load_yaml("server:\n  port: eighty\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`server.port`"), "{text}");
        assert!(text.contains("config file"), "{text}");
        let err = load_yaml("", &[("LORALOOP_SERVER__PORT", "99999")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`server.port`"), "{text}");
        assert!(text.contains("LORALOOP_SERVER__PORT"), "{text}");
    }

    #[test]
    fn more_assistants_come_with_their_routes_and_are_checked() {
        let cfg = load_yaml(
            "assistants:\n  - name: support\n    system_prompt: Help.\n    activation: canary\n    generation: {temperature: 0.3}\n    routes:\n      telegram_chats: [-100123, \"42\"]\n      discord_guilds: [5000]\n",
            &[],
        )
        .unwrap();
        let a = &cfg.raw.assistants[0];
        assert_eq!(a.name, "support");
        assert_eq!(a.activation, Some(ActivationPolicy::Canary));
        assert_eq!(a.generation.temperature, Some(0.3));
        assert_eq!(
            a.routes.all(),
            [
                ("telegram", "chat", "-100123".to_string()),
                ("telegram", "chat", "42".to_string()),
                ("discord", "guild", "5000".to_string()),
            ]
        );
        for (yaml, key) in [
            ("assistants:\n  - name: loraloop\n", "assistants.0.name"),
            ("assistant: {name: \"main/x y<b>\"}\n", "assistant.name"),
            ("assistant: {name: \"\"}\n", "assistant.name"),
            ("assistants:\n  - name: a b\n", "assistants.0.name"),
            (
                "assistants:\n  - name: x\n  - name: x\n",
                "assistants.1.name",
            ),
            (
                "assistants:\n  - name: x\n    generation: {top_p: 2}\n",
                "assistants.0.generation.top_p",
            ),
            (
                "assistants:\n  - name: x\n    routes: {discord_channels: [general]}\n",
                "assistants.0.routes",
            ),
            (
                "assistants:\n  - name: x\n    routes: {telegram_chats: [7]}\n  - name: y\n    routes: {telegram_chats: [\"7\"]}\n",
                "assistants.1.routes",
            ),
        ] {
            assert_eq!(
                invalid_key(load_yaml(yaml, &[]).unwrap_err()),
                key,
                "{yaml}"
            );
        }
        let err =
            load_yaml("assistants:\n  - name: x\n    routes: {slack: [1]}\n", &[]).unwrap_err();
        assert!(err.to_string().contains("slack"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_an_error_not_silently_ignored() {
        let err = load_yaml("sever:\n  port: 1\n", &[]).unwrap_err();
        assert!(err.to_string().contains("unknown field `sever`"), "{err}");
        let err = load_yaml("", &[("LORALOOP_GENERATION__TEMPRATURE", "1")]).unwrap_err();
        assert!(err.to_string().contains("temprature"), "{err}");
    }

    #[test]
    fn out_of_range_values_say_what_is_allowed() {
        let cases = [
            (
                "generation:\n  top_p: 1.5\n",
                "generation.top_p",
                "at most 1",
            ),
            (
                "generation:\n  temperature: -1\n",
                "generation.temperature",
                "0 to 2",
            ),
            (
                "generation:\n  max_new_tokens: 0\n",
                "generation.max_new_tokens",
                "1 to 32768",
            ),
            (
                "generation:\n  repetition_penalty: 0.5\n",
                "generation.repetition_penalty",
                "1 (off) to 2",
            ),
            (
                "engine:\n  max_sequences: 0\n",
                "engine.max_sequences",
                "1 to 1024",
            ),
            ("device: tpu\n", "device", "auto, cpu, cuda"),
            (
                "server:\n  host: 'not a host!'\n",
                "server.host",
                "IP address",
            ),
            (
                "telegram:\n  webhook_url: http://x.example\n",
                "telegram.webhook_url",
                "https://",
            ),
            (
                "telegram:\n  api_url: ftp://x\n",
                "telegram.api_url",
                "http:// or https://",
            ),
            (
                "discord:\n  api_url: 'discord.local'\n",
                "discord.api_url",
                "http:// or https://",
            ),
            (
                "discord:\n  rate_limit_per_minute: 0\n",
                "discord.rate_limit_per_minute",
                "1 or more",
            ),
            (
                "discord:\n  dev_guild_id: 0\n",
                "discord.dev_guild_id",
                "a server (guild) id",
            ),
            ("model: ''\n", "model", "a model file name"),
        ];
        for (yaml, key, allowed) in cases {
            let err = load_yaml(yaml, &[]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(allowed), "{yaml:?}: {text}");
            assert_eq!(invalid_key(err), key, "{yaml:?}");
        }
    }

    #[test]
    fn a_secret_in_the_file_is_refused_and_its_value_not_echoed() {
        let err = load_yaml("telegram:\n  bot_token: 123:SECRETVALUE\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("TELEGRAM_BOT_TOKEN"), "{text}");
        assert!(!text.contains("SECRETVALUE"), "{text}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_redacted_everywhere() {
        let token = "7777:AAEhBOweik6ad9r_QXMENTIONED";
        let cfg = load_yaml(
            "",
            &[
                ("TELEGRAM_BOT_TOKEN", token),
                ("LORALOOP_API_KEY", "api-key-value-xyz"),
            ],
        )
        .unwrap();
        assert_eq!(
            cfg.secrets
                .telegram_bot_token
                .as_ref()
                .unwrap()
                .expose_secret(),
            token
        );
        let debug = format!("{cfg:?}");
        let yaml = cfg.redacted_yaml();
        for out in [&debug, &yaml] {
            assert!(!out.contains(token), "{out}");
            assert!(!out.contains("api-key-value-xyz"), "{out}");
        }
        assert!(
            yaml.contains("telegram_bot_token: '[redacted] (from TELEGRAM_BOT_TOKEN)'"),
            "{yaml}"
        );
        assert!(
            yaml.contains("discord_bot_token: not set (DISCORD_BOT_TOKEN)"),
            "{yaml}"
        );
    }

    #[test]
    fn a_file_value_that_is_not_a_section_is_the_files_fault_not_a_variables() {
        let port = [("LORALOOP_SERVER__PORT", "9000")];
        for (yaml, key, found) in [
            ("- a\n", ".", "a list"),
            ("server: 5\n", "server", "a number"),
        ] {
            let err = load_yaml(yaml, &port).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("config file "), "{text}");
            assert!(text.contains(&format!("`{key}`")), "{text}");
            assert!(text.contains(found), "{text}");
        }
        // A section with nothing under it takes the variable.
        let cfg = load_yaml("server:\n", &port).unwrap();
        assert_eq!(cfg.raw.server.port, 9000);
    }

    #[test]
    fn an_explicitly_named_missing_file_is_an_error() {
        let err = Config::load_with_env(
            &ConfigSource {
                explicit_path: Some(PathBuf::from("/nonexistent/loraloop.yaml")),
            },
            &env(&[]),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        // The operating system's reason once, also when printed with its causes.
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
        let err = Config::load_with_env(
            &ConfigSource::default(),
            &env(&[(CONFIG_ENV, "/nonexistent/from-env.yaml")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("from-env.yaml"), "{err}");
    }
}
