//! Feedback to data: the one builder behind the console's form, `loraloop data build` and
//! `POST /api/v1/datasets/build`. Filters name things as users know them (assistant and
//! adapter by name); the rows are SFT examples (stored as a dataset version, or written
//! as OpenAI chat JSONL), DPO pairs or KTO rows (`loraloop_core::preference`).

use super::{content_hash, lines_hash};
use crate::config::Objective;
use chrono::NaiveDate;
use loraloop_core::domain::ChatExample;
use loraloop_core::storage::{
    BuildFilter, DatasetInsert, Db, NewDataset, RatingFilter, StorageError,
};
use serde::Deserialize;
use serde_json::Value;

/// A build's filters as the CLI and the API take them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// What rows: sft (conversations), dpo (pairs) or kto (labelled replies).
    #[serde(default)]
    pub kind: Objective,
    /// Store the rows as the next version of this dataset (None: the rows are returned).
    pub name: Option<String>,
    /// An assistant's name.
    pub assistant: Option<String>,
    /// An adapter's name: conversations it answered in.
    pub adapter: Option<String>,
    /// telegram, discord, web, cli or api.
    pub platform: Option<String>,
    /// The platform's chat id.
    pub chat: Option<String>,
    /// First and last day (YYYY-MM-DD, UTC, inclusive) of the conversations' start.
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// any, up, down or unrated: conversations by their replies' ratings.
    pub rating: Option<String>,
    /// SFT: train only on 👍-rated replies.
    #[serde(default)]
    pub only_upvoted: bool,
    /// SFT: an operator's correction replaces the reply (default true).
    pub include_corrections: Option<bool>,
    /// SFT: 👎-rated replies are not trained on (default true).
    pub exclude_downvoted: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `field` names the filter that is wrong.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no conversation matches these filters with a {0} left to use: nothing was built")]
    Empty(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> BuildError {
    BuildError::Invalid {
        field,
        message: message.into(),
    }
}

impl BuildSpec {
    /// The storage filter, with names looked up.
    pub async fn filter(&self, db: &Db) -> Result<BuildFilter, BuildError> {
        let assistant = match self.assistant.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => Some(
                db.assistant(name)
                    .await
                    .map_err(|_| invalid("assistant", format!("no assistant is named {name:?}")))?
                    .id,
            ),
        };
        let adapter = match self.adapter.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => Some(
                db.adapter_named(name)
                    .await?
                    .ok_or_else(|| invalid("adapter", format!("no adapter is named {name:?}")))?
                    .id,
            ),
        };
        let platform = match self
            .platform
            .as_deref()
            .filter(|s| !s.is_empty() && *s != "any")
        {
            None => None,
            Some(p) => Some(p.parse().map_err(|e: String| invalid("platform", e))?),
        };
        let rating = match self.rating.as_deref().filter(|s| !s.is_empty()) {
            None => RatingFilter::Any,
            Some(r) => r.parse().map_err(|e: String| invalid("rating", e))?,
        };
        if let (Some(f), Some(t)) = (self.from, self.to)
            && f > t
        {
            return Err(invalid("from", format!("{f} is after to ({t})")));
        }
        Ok(BuildFilter {
            assistant,
            adapter,
            platform,
            chat: self.chat.clone().filter(|c| !c.trim().is_empty()),
            from: self.from,
            to: self.to,
            rating,
            only_upvoted: self.only_upvoted,
            include_corrections: self.include_corrections.unwrap_or(true),
            exclude_downvoted: self.exclude_downvoted.unwrap_or(true),
        })
    }
}

/// SFT examples from `filter`'s conversations, with the conversation of each.
pub async fn sft_examples(
    db: &Db,
    filter: &BuildFilter,
) -> Result<(Vec<ChatExample>, Vec<Option<i64>>), BuildError> {
    let built = db.conversation_examples(filter).await?;
    if built.is_empty() {
        return Err(BuildError::Empty("reply"));
    }
    Ok(built
        .into_iter()
        .map(|b| (b.example, Some(b.conversation_id)))
        .unzip())
}

/// Store `filter`'s rows of `kind` as the next version of dataset `name` (the same rows
/// as the latest version: that version, unchanged).
pub async fn store(
    db: &Db,
    name: &str,
    filter: &BuildFilter,
    kind: Objective,
) -> Result<DatasetInsert, BuildError> {
    loraloop_core::storage::validate_dataset_name(name)
        .map_err(|e| invalid("name", e.to_string()))?;
    let source = serde_json::to_string(filter).map_err(StorageError::from)?;
    if kind != Objective::Sft {
        let found = db.preference_rows(filter).await?;
        let (lines, conversations): (Vec<String>, Vec<Option<i64>>) = match kind {
            Objective::Dpo => found
                .pairs
                .iter()
                .zip(&found.pair_conversations)
                .map(|(p, &c)| (p.to_json().to_string(), Some(c)))
                .unzip(),
            _ => found
                .kto
                .iter()
                .zip(&found.kto_conversations)
                .map(|(r, &c)| (r.to_json().to_string(), Some(c)))
                .unzip(),
        };
        if lines.is_empty() {
            return Err(BuildError::Empty(left_to_use(kind)));
        }
        return Ok(db
            .insert_dataset(&NewDataset {
                assistant_id: filter.assistant,
                name,
                format: "conversations",
                source: &source,
                content_hash: &lines_hash(&lines),
                kind,
                lines: &lines,
                source_conversations: &conversations,
                ..Default::default()
            })
            .await?);
    }
    let (examples, conversations) = sft_examples(db, filter).await?;
    let (examples, hash) = tokio::task::spawn_blocking(move || {
        let hash = content_hash(&examples);
        (examples, hash)
    })
    .await
    .expect("hashing does not panic");
    Ok(db
        .insert_dataset(&NewDataset {
            assistant_id: filter.assistant,
            name,
            format: "conversations",
            source: &source,
            content_hash: &hash,
            examples: &examples,
            source_conversations: &conversations,
            ..Default::default()
        })
        .await?)
}

/// The rows of any kind as JSONL values (SFT: OpenAI chat lines).
pub async fn rows(
    db: &Db,
    filter: &BuildFilter,
    kind: Objective,
) -> Result<Vec<Value>, BuildError> {
    let rows: Vec<Value> = match kind {
        Objective::Sft => sft_examples(db, filter)
            .await?
            .0
            .iter()
            .map(|e| serde_json::from_str(&e.to_json_line()).expect("a JSON line"))
            .collect(),
        Objective::Dpo => db
            .preference_rows(filter)
            .await?
            .pairs
            .iter()
            .map(|p| p.to_json())
            .collect(),
        Objective::Kto => db
            .preference_rows(filter)
            .await?
            .kto
            .iter()
            .map(|r| r.to_json())
            .collect(),
    };
    if rows.is_empty() {
        return Err(BuildError::Empty(left_to_use(kind)));
    }
    Ok(rows)
}

/// What a build of `kind` needs a conversation to have.
fn left_to_use(kind: Objective) -> &'static str {
    match kind {
        Objective::Sft => "reply",
        Objective::Dpo => "corrected reply",
        Objective::Kto => "rated or corrected reply",
    }
}
