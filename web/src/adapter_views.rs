//! Adapters as the API and the OpenAI endpoint list them.

use crate::error::ApiError;
use crate::operations::unix;
use crate::state::AppState;
use loraloop_core::storage::Assistant;
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdapterView {
    pub object: &'static str,
    pub id: i64,
    pub name: String,
    pub base_model: String,
    pub method: String,
    pub rank: Option<i64>,
    pub alpha: Option<f64>,
    #[schema(value_type = Vec<String>)]
    pub target_modules: serde_json::Value,
    /// The metrics of the job that made it (final loss, eval loss, perplexity, accuracy).
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    pub job_id: Option<i64>,
    /// The assistant it was trained for (None: uploaded for any assistant).
    pub assistant_id: Option<i64>,
    pub created_at: i64,
    /// Whether the assistant answers with it now.
    pub active: bool,
    /// Why it cannot be activated on the served model, if it cannot.
    pub incompatible: Option<String>,
    /// What it learned and kept, and the gate's verdict (None: uploaded, or made before
    /// report cards).
    #[schema(value_type = Option<Object>)]
    pub report_card: Option<serde_json::Value>,
    /// Whether it is the candidate of the running canary (serving a share of new
    /// conversations).
    pub canary: bool,
    /// When it was last rolled back (by an operator or a canary), if it was.
    pub rolled_back_at: Option<i64>,
    /// When a user whose data it was trained on asked to be forgotten (Unix seconds): its
    /// weights may still reflect that data; retrain it on the dataset's new version, or
    /// retire it.
    pub forgotten_data_at: Option<i64>,
    /// 👍 and 👎 on its replies per day over the last [`RATING_DAYS`] days (days
    /// without ratings left out).
    pub ratings: Vec<DayRatings>,
}

/// Days of ratings an adapter view carries.
pub const RATING_DAYS: i64 = 14;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DayRatings {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub up: i64,
    pub down: i64,
}

pub async fn adapter_views(
    state: &AppState,
    assistant: &Assistant,
) -> Result<Vec<AdapterView>, ApiError> {
    let db = &state.core.db;
    let active = db.assistant_by_id(assistant.id).await?.active_adapter_id;
    let canary = db.running_canary(assistant.id).await?.map(|c| c.adapter_id);
    let mut views = Vec::new();
    for a in db.assistant_adapters(assistant.id).await? {
        let ratings = db
            .daily_ratings(Some(a.id), RATING_DAYS)
            .await?
            .into_iter()
            .map(|d| DayRatings {
                day: d.day,
                up: d.up,
                down: d.down,
            })
            .collect();
        views.push(AdapterView {
            object: "adapter",
            id: a.id,
            incompatible: state.core.adapters.mismatch(&a),
            active: active == Some(a.id),
            canary: canary == Some(a.id),
            rolled_back_at: a.rolled_back_at.as_deref().map(unix),
            forgotten_data_at: a.forgotten_data_at.as_deref().map(unix),
            ratings,
            target_modules: serde_json::from_str(&a.target_modules).unwrap_or_default(),
            metrics: serde_json::from_str(&a.metrics).unwrap_or_default(),
            report_card: a
                .report_card
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok()),
            name: a.name,
            base_model: a.base_model,
            method: a.method,
            rank: a.rank,
            alpha: a.alpha,
            job_id: a.job_id,
            assistant_id: a.assistant_id,
            created_at: unix(&a.created_at),
        });
    }
    Ok(views)
}

/// The adapter now active (None: the base model), as the API answers an activation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Activation)]
pub struct ActivationView {
    pub adapter_id: Option<i64>,
    pub adapter_name: Option<String>,
    /// Milliseconds from the request to the swap (loading the adapter included).
    pub took_ms: f64,
}

impl From<loraloop_core::service::Activation> for ActivationView {
    fn from(a: loraloop_core::service::Activation) -> Self {
        Self {
            adapter_id: a.adapter_id,
            adapter_name: a.adapter_name,
            took_ms: a.took_ms,
        }
    }
}
