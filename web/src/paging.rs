//! A page of a list, as every list route of the API takes and answers it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// How many (default 20, at most 100 for jobs, 1000 for events).
    pub limit: Option<i64>,
    /// Jobs: older than this id. Events: after this event id.
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
}
