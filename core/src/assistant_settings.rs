//! What sets one assistant apart from another on the same base model: generation settings
//! (the config's `generation:`, and an assistant's own laid over them), its activation
//! policy, and (for the assistants the config's `assistants:` list declares) the routes
//! that send chats to it.

use crate::gate::ActivationPolicy;
use serde::{Deserialize, Serialize};

/// The system prompt of an assistant that sets none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// Sampling settings (`generation:` in the config; an assistant's own lie over them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// The highest temperature any surface takes (the config, assistants, `loraloop chat`, the
/// OpenAI endpoint): OpenAI's own limit.
pub const MAX_TEMPERATURE: f64 = 2.0;
/// The highest repetition penalty any surface takes (1 is off).
pub const MAX_REPETITION_PENALTY: f64 = 2.0;

impl GenerationConfig {
    /// The first value out of range, as (field, what is wrong and what is allowed).
    pub fn check(&self) -> Result<(), (String, String)> {
        let g = self;
        let bad = |field: &str, message: String| Err((field.to_string(), message));
        if !(g.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&g.temperature)) {
            return bad(
                "temperature",
                format!(
                    "got {}; allowed: 0 to {MAX_TEMPERATURE} (0 means greedy)",
                    g.temperature
                ),
            );
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("got {}; allowed: greater than 0, at most 1", g.top_p),
            );
        }
        if !(g.repetition_penalty.is_finite()
            && (1.0..=MAX_REPETITION_PENALTY).contains(&g.repetition_penalty))
        {
            return bad(
                "repetition_penalty",
                format!(
                    "got {}; allowed: 1 (off) to {MAX_REPETITION_PENALTY}",
                    g.repetition_penalty
                ),
            );
        }
        if !(1..=32_768).contains(&g.max_new_tokens) {
            return bad(
                "max_new_tokens",
                format!("got {}; allowed: 1 to 32768", g.max_new_tokens),
            );
        }
        if let Some(i) = g.stop.iter().position(|s| s.is_empty()) {
            return bad(
                &format!("stop.{i}"),
                "got an empty string; allowed: non-empty strings".to_string(),
            );
        }
        Ok(())
    }

    /// The engine's sampling settings these values describe.
    pub fn sampling_params(&self) -> loraloop_model::sampling::SamplingParams {
        loraloop_model::sampling::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            stop: self.stop.clone(),
            ..Default::default()
        }
    }
}

/// The engine's sampling defaults are the one source of these values.
impl Default for GenerationConfig {
    fn default() -> Self {
        let p = loraloop_model::sampling::SamplingParams::default();
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            repetition_penalty: p.repetition_penalty,
            max_new_tokens: p.max_new_tokens,
            seed: p.seed,
            stop: p.stop,
        }
    }
}

/// Generation settings an assistant sets differently from `generation:` (unset: the same).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

impl GenerationOverrides {
    /// `base` with these settings laid over it.
    pub fn over(&self, base: &GenerationConfig) -> GenerationConfig {
        GenerationConfig {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
            max_new_tokens: self.max_new_tokens.unwrap_or(base.max_new_tokens),
            seed: self.seed.or(base.seed),
            stop: self.stop.clone().unwrap_or_else(|| base.stop.clone()),
        }
    }

    /// Settings from JSON (an API request, a console form, the database), checked over
    /// `base`: the error names the field and what it allows.
    pub fn from_json(
        value: &serde_json::Value,
        base: &GenerationConfig,
    ) -> Result<Self, (String, String)> {
        let parsed: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            (field, e.into_inner().to_string())
        })?;
        parsed.over(base).check()?;
        Ok(parsed)
    }

    /// The stored settings (a row the database holds; anything unreadable counts as none).
    pub fn stored(json: &str) -> Self {
        serde_json::from_str(json).unwrap_or_default()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({}))
    }
}

/// Why an assistant name is refused, if it is.
pub fn name_problem(name: &str) -> Option<String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| {
        format!(
            "{name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (it is also the OpenAI endpoint's model name)"
        )
    })
}

/// An id in the config: YAML reads a chat id as a number, a quoted one as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RouteId {
    Number(i64),
    Text(String),
}

impl std::fmt::Display for RouteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

/// Where an assistant answers: each list holds ids of that kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutesConfig {
    /// Telegram bots by numeric id: the part of the bot's token before the colon.
    pub telegram_bots: Vec<RouteId>,
    pub telegram_chats: Vec<RouteId>,
    /// Discord applications (bots) by application id.
    pub discord_applications: Vec<RouteId>,
    pub discord_guilds: Vec<RouteId>,
    pub discord_channels: Vec<RouteId>,
}

impl RoutesConfig {
    /// Every route as (platform, scope, key).
    pub fn all(&self) -> Vec<(&'static str, &'static str, String)> {
        let lists: [(&'static str, &'static str, &Vec<RouteId>); 5] = [
            ("telegram", "bot", &self.telegram_bots),
            ("telegram", "chat", &self.telegram_chats),
            ("discord", "application", &self.discord_applications),
            ("discord", "guild", &self.discord_guilds),
            ("discord", "channel", &self.discord_channels),
        ];
        lists
            .into_iter()
            .flat_map(|(p, s, ids)| ids.iter().map(move |id| (p, s, id.to_string())))
            .collect()
    }
}

/// One more assistant on the served model (`assistants:` in the config). Set from the
/// config at every start; the console and the API change it until the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssistantEntry {
    pub name: String,
    pub system_prompt: String,
    /// How its finished jobs' adapters reach users (unset: `assistant.activation`).
    pub activation: Option<ActivationPolicy>,
    pub generation: GenerationOverrides,
    pub routes: RoutesConfig,
}

impl Default for AssistantEntry {
    fn default() -> Self {
        Self {
            name: String::new(),
            system_prompt: DEFAULT_SYSTEM_PROMPT.to_string(),
            activation: None,
            generation: GenerationOverrides::default(),
            routes: RoutesConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_lay_over_the_config_and_are_checked() {
        let base = GenerationConfig::default();
        let o = GenerationOverrides::from_json(&serde_json::json!({"temperature": 0.2}), &base)
            .unwrap();
        let g = o.over(&base);
        assert_eq!(g.temperature, 0.2);
        assert_eq!(g.top_p, base.top_p);
        assert_eq!(o.to_json(), serde_json::json!({"temperature": 0.2}));
        let (field, _) =
            GenerationOverrides::from_json(&serde_json::json!({"temperature": 9.0}), &base)
                .unwrap_err();
        assert_eq!(field, "temperature");
        let (field, message) =
            GenerationOverrides::from_json(&serde_json::json!({"temprature": 0.5}), &base)
                .unwrap_err();
        assert!(message.contains("temprature"), "{field}: {message}");
        assert!(name_problem("support-bot_2").is_none());
        assert!(name_problem("two words").is_some());
        assert!(name_problem("").is_some());
    }
}
