//! Assistants (a name, a system prompt, generation settings and an activation policy on
//! the served base model) and the routes that say which one answers a bot, chat, guild or
//! channel.

use super::sql::Found;
use super::{Db, Result, StorageError, sql};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Assistant {
    pub id: i64,
    pub name: String,
    pub base_model: String,
    pub system_prompt: String,
    /// Generation settings that differ from the config's `generation:`, as a JSON object.
    pub generation: String,
    pub active_adapter_id: Option<i64>,
    /// `manual`, `gate` or `canary` (None: the config's `assistant.activation`).
    pub activation: Option<String>,
}

/// An assistant's settings, as created or changed.
#[derive(Debug, Clone, PartialEq)]
pub struct AssistantSettings<'a> {
    pub system_prompt: &'a str,
    pub generation: &'a serde_json::Value,
    pub activation: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Route {
    pub id: i64,
    pub assistant_id: i64,
    pub platform: String,
    pub scope: String,
    pub key: String,
}

/// The scopes a route may have on each platform, most specific first: the order in which a
/// bot looks its message's places up.
pub const ROUTE_SCOPES: &[(&str, &[&str])] = &[
    ("telegram", &["chat", "bot"]),
    ("discord", &["channel", "guild", "application"]),
];

/// How an assistant is looked up.
#[derive(Clone, Copy)]
enum Which<'a> {
    Name(&'a str),
    Id(i64),
    Conversation(i64),
}

const ASSISTANT_COLUMNS: &str =
    "id, name, base_model, system_prompt, generation, active_adapter_id, activation";
const ROUTE_COLUMNS: &str = "id, assistant_id, platform, scope, key";

/// An error when the assistant name is refused.
pub fn validate_assistant_name(name: &str) -> Result<()> {
    match crate::assistant_settings::name_problem(name) {
        None => Ok(()),
        Some(message) => Err(StorageError::Invalid {
            what: "assistant name".into(),
            message,
        }),
    }
}

/// An error naming what is wrong with a route, if anything is.
pub fn validate_route(platform: &str, scope: &str, key: &str) -> Result<()> {
    let Some((_, scopes)) = ROUTE_SCOPES.iter().find(|(p, _)| *p == platform) else {
        return Err(StorageError::Invalid {
            what: "route".into(),
            message: format!("platform {platform:?}: use telegram or discord"),
        });
    };
    if !scopes.contains(&scope) {
        return Err(StorageError::Invalid {
            what: "route".into(),
            message: format!("a {platform} route's scope is one of {}", scopes.join(", ")),
        });
    }
    let key_ok = (1..=64).contains(&key.len())
        && key
            .strip_prefix('-')
            .unwrap_or(key)
            .chars()
            .all(|c| c.is_ascii_digit())
        && key != "-";
    if !key_ok {
        return Err(StorageError::Invalid {
            what: "route".into(),
            message: format!(
                "{key:?} is not a {platform} {scope} id (a number; a Telegram bot's is the part of its token before the colon)"
            ),
        });
    }
    Ok(())
}

impl Db {
    /// The assistant with this name, created with these settings if it does not exist.
    pub async fn ensure_assistant(
        &self,
        name: &str,
        base_model: &str,
        system_prompt: &str,
    ) -> Result<Assistant> {
        sql::execute(
            self.pool(),
            "insert into assistants (name, base_model, system_prompt) values (?, ?, ?) on conflict (name) do nothing",
            (name, base_model, system_prompt),
        )
        .await?;
        self.assistant(name).await
    }

    /// Create the assistant or set its settings (the config's assistants, at start-up).
    pub async fn upsert_assistant(
        &self,
        name: &str,
        base_model: &str,
        s: &AssistantSettings<'_>,
    ) -> Result<Assistant> {
        let on_taken = "do update set base_model = excluded.base_model,
                system_prompt = excluded.system_prompt, generation = excluded.generation,
                activation = excluded.activation,
                updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
        let saved = self.insert_assistant(name, base_model, s, on_taken).await?;
        // An upsert returns its row whether it inserted or updated.
        saved.found(|| format!("assistant {name:?}"))
    }

    /// A new assistant; an error when the name is taken.
    pub async fn create_assistant(
        &self,
        name: &str,
        base_model: &str,
        s: &AssistantSettings<'_>,
    ) -> Result<Assistant> {
        let created = self
            .insert_assistant(name, base_model, s, "do nothing")
            .await?;
        created.ok_or_else(|| StorageError::Conflict {
            message: format!("an assistant named {name:?} already exists"),
        })
    }

    /// Insert an assistant; `on_taken` is what a taken name does (the SQL after
    /// `on conflict (name)`). None when that returns no row.
    async fn insert_assistant(
        &self,
        name: &str,
        base_model: &str,
        s: &AssistantSettings<'_>,
        on_taken: &str,
    ) -> Result<Option<Assistant>> {
        validate_assistant_name(name)?;
        sql::optional(
            self.pool(),
            &format!(
                "insert into assistants (name, base_model, system_prompt, generation, activation)
                 values (?, ?, ?, ?, ?)
                 on conflict (name) {on_taken} returning {ASSISTANT_COLUMNS}"
            ),
            (
                name,
                base_model,
                s.system_prompt,
                s.generation.to_string(),
                s.activation,
            ),
        )
        .await
    }

    /// Change an assistant's settings.
    pub async fn update_assistant(&self, id: i64, s: &AssistantSettings<'_>) -> Result<Assistant> {
        let updated: Option<Assistant> = sql::optional(
            self.pool(),
            &format!(
                "update assistants set system_prompt = ?, generation = ?, activation = ?,
                    updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 where id = ? returning {ASSISTANT_COLUMNS}"
            ),
            (s.system_prompt, s.generation.to_string(), s.activation, id),
        )
        .await?;
        updated.found(|| format!("assistant {id}"))
    }

    /// Delete an assistant with no conversations (its routes go with it; its jobs,
    /// datasets and adapters stay, tied to no assistant).
    pub async fn delete_assistant(&self, id: i64) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let (conversations,): (i64,) = sql::one(
            &mut *tx,
            "select count(*) from conversations where assistant_id = ?",
            (id,),
        )
        .await?;
        if conversations > 0 {
            return Err(StorageError::Invalid {
                what: "assistant".into(),
                message: format!(
                    "it has {conversations} conversations; they are training data and stay with it (delete them first)"
                ),
            });
        }
        let deleted = sql::execute(&mut *tx, "delete from assistants where id = ?", (id,)).await?;
        deleted.found(|| format!("assistant {id}"))?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn assistant(&self, name: &str) -> Result<Assistant> {
        self.find_assistant(Which::Name(name)).await
    }

    pub async fn assistant_by_id(&self, id: i64) -> Result<Assistant> {
        self.find_assistant(Which::Id(id)).await
    }

    /// The assistant a conversation is with.
    pub async fn conversation_assistant(&self, conversation_id: i64) -> Result<Assistant> {
        self.find_assistant(Which::Conversation(conversation_id))
            .await
    }

    async fn find_assistant(&self, which: Which<'_>) -> Result<Assistant> {
        let (condition, what) = match which {
            Which::Name(n) => ("name = ?", format!("assistant {n:?}")),
            Which::Id(i) => ("id = ?", format!("assistant {i}")),
            Which::Conversation(c) => (
                "id = (select assistant_id from conversations where id = ?)",
                format!("conversation {c}"),
            ),
        };
        let sql = format!("select {ASSISTANT_COLUMNS} from assistants where {condition}");
        let row: Option<Assistant> = match which {
            Which::Name(n) => sql::optional(self.pool(), &sql, (n,)).await?,
            Which::Id(i) | Which::Conversation(i) => sql::optional(self.pool(), &sql, (i,)).await?,
        };
        row.found(|| what)
    }

    pub async fn list_assistants(&self) -> Result<Vec<Assistant>> {
        sql::all(
            self.pool(),
            &format!("select {ASSISTANT_COLUMNS} from assistants order by id"),
            (),
        )
        .await
    }

    /// Route `platform`/`scope`/`key` to the assistant. A route to another assistant moves
    /// only when `take_over`; otherwise nothing changes and the answer is None.
    pub async fn set_route(
        &self,
        assistant_id: i64,
        platform: &str,
        scope: &str,
        key: &str,
        take_over: bool,
    ) -> Result<Option<Route>> {
        validate_route(platform, scope, key)?;
        sql::optional(
            self.pool(),
            &format!(
                "insert into assistant_routes (assistant_id, platform, scope, key) values (?1, ?2, ?3, ?4)
                 on conflict (platform, scope, key) do update set assistant_id = excluded.assistant_id
                 where ?5 or assistant_routes.assistant_id = excluded.assistant_id
                 returning {ROUTE_COLUMNS}"
            ),
            (assistant_id, platform, scope, key, take_over),
        )
        .await
    }

    /// The name of the assistant `platform`/`scope`/`key` routes to, if any.
    pub async fn route_owner(
        &self,
        platform: &str,
        scope: &str,
        key: &str,
    ) -> Result<Option<String>> {
        sql::value(
            self.pool(),
            "select a.name from assistant_routes r join assistants a on a.id = r.assistant_id
             where r.platform = ? and r.scope = ? and r.key = ?",
            (platform, scope, key),
        )
        .await
    }

    /// Remove one of the assistant's routes.
    pub async fn delete_route(&self, assistant_id: i64, route_id: i64) -> Result<()> {
        let deleted = sql::execute(
            self.pool(),
            "delete from assistant_routes where id = ? and assistant_id = ?",
            (route_id, assistant_id),
        )
        .await?;
        deleted.found(|| format!("route {route_id}"))?;
        Ok(())
    }

    /// Every route, by assistant then id.
    pub async fn routes(&self) -> Result<Vec<Route>> {
        sql::all(
            self.pool(),
            &format!("select {ROUTE_COLUMNS} from assistant_routes order by assistant_id, id"),
            (),
        )
        .await
    }

    /// The assistant routed from the most specific of `places` (scope, key) on `platform`
    /// that has a route; `places` go most specific first. None: no route matches.
    pub async fn routed_assistant(
        &self,
        platform: &str,
        places: &[(&str, &str)],
    ) -> Result<Option<Assistant>> {
        for (scope, key) in places {
            let found: Option<Assistant> = sql::optional(
                self.pool(),
                &format!(
                    "select {} from assistants a join assistant_routes r on r.assistant_id = a.id
                     where r.platform = ? and r.scope = ? and r.key = ?",
                    Self::qualified(ASSISTANT_COLUMNS, "a")
                ),
                (platform, scope, key),
            )
            .await?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    fn settings(prompt: &str) -> AssistantSettings<'_> {
        static EMPTY: std::sync::LazyLock<serde_json::Value> =
            std::sync::LazyLock::new(|| serde_json::json!({}));
        AssistantSettings {
            system_prompt: prompt,
            generation: &EMPTY,
            activation: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_most_specific_route_wins(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let support = db
            .create_assistant("support", "m", &settings("Help."))
            .await
            .unwrap();
        let sales = db
            .create_assistant("sales", "m", &settings("Sell."))
            .await
            .unwrap();
        db.set_route(support.id, "discord", "guild", "10", false)
            .await
            .unwrap();
        db.set_route(sales.id, "discord", "channel", "20", false)
            .await
            .unwrap();
        let route = |channel: &'static str, guild: &'static str| {
            let db = db.clone();
            async move {
                db.routed_assistant(
                    "discord",
                    &[("channel", channel), ("guild", guild), ("application", "1")],
                )
                .await
                .unwrap()
                .map(|a| a.name)
            }
        };
        assert_eq!(
            route("20", "10").await.as_deref(),
            Some("sales"),
            "channel over guild"
        );
        assert_eq!(route("21", "10").await.as_deref(), Some("support"));
        assert_eq!(
            route("21", "11").await,
            None,
            "no route: the default assistant"
        );
        // A key routes to one assistant: another takes it only when told to.
        let taken = db.set_route(support.id, "discord", "channel", "20", false);
        assert_eq!(taken.await.unwrap(), None);
        assert_eq!(route("20", "11").await.as_deref(), Some("sales"));
        assert_eq!(
            db.route_owner("discord", "channel", "20")
                .await
                .unwrap()
                .as_deref(),
            Some("sales")
        );
        let again = db.set_route(sales.id, "discord", "channel", "20", false);
        assert!(again.await.unwrap().is_some(), "its own route again");
        db.set_route(support.id, "discord", "channel", "20", true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(route("20", "11").await.as_deref(), Some("support"));
        assert_eq!(db.routes().await.unwrap().len(), 2);
        // Telegram scopes are not Discord's; keys are ids.
        for (p, s, k) in [
            ("telegram", "guild", "1"),
            ("discord", "chat", "1"),
            ("telegram", "bot", "123:secret"),
            ("slack", "chat", "1"),
        ] {
            assert!(
                db.set_route(sales.id, p, s, k, false).await.is_err(),
                "{p} {s} {k}"
            );
        }
        db.set_route(sales.id, "telegram", "chat", "-100123", false)
            .await
            .unwrap();
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn assistants_are_created_changed_and_deleted(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        let a = db.create_assistant("a", "m", &settings("x")).await.unwrap();
        assert!(
            db.create_assistant("a", "m", &settings("y")).await.is_err(),
            "taken"
        );
        assert!(
            db.create_assistant("a b", "m", &settings("y"))
                .await
                .is_err(),
            "space"
        );
        let generation = serde_json::json!({"temperature": 0.2});
        let changed = db
            .update_assistant(
                a.id,
                &AssistantSettings {
                    system_prompt: "z",
                    generation: &generation,
                    activation: Some("manual"),
                },
            )
            .await
            .unwrap();
        assert_eq!(changed.system_prompt, "z");
        assert_eq!(changed.activation.as_deref(), Some("manual"));
        assert_eq!(changed.generation, r#"{"temperature":0.2}"#);
        let bad = AssistantSettings {
            activation: Some("sometimes"),
            ..settings("z")
        };
        assert!(
            db.update_assistant(a.id, &bad).await.is_err(),
            "unknown policy"
        );
        db.set_route(a.id, "telegram", "bot", "42", false)
            .await
            .unwrap();
        // A conversation keeps its assistant from being deleted.
        let chat = db
            .upsert_chat(super::super::Platform::Web, "c", "private", None)
            .await
            .unwrap();
        let conv = db
            .current_conversation(a.id, chat, None, None)
            .await
            .unwrap();
        assert!(db.delete_assistant(a.id).await.is_err());
        sql::execute(
            db.pool(),
            "delete from conversations where id = ?",
            (conv.id,),
        )
        .await
        .unwrap();
        db.delete_assistant(a.id).await.unwrap();
        assert!(
            db.routes().await.unwrap().is_empty(),
            "its routes went with it"
        );
        assert!(db.assistant("a").await.is_err());
    }
}
