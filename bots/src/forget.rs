//! A user's own `/forget`, on either platform.

use loraloop_core::Services;
use loraloop_core::storage::{Forgotten, Platform};

/// Forget a user (a platform user's own `/forget`) and record it in the audit log by the
/// user's row id (their name is gone with the rest).
pub async fn forget(
    core: &Services,
    platform: Platform,
    user_id: i64,
) -> anyhow::Result<Forgotten> {
    let f = core.db.forget_user(user_id).await?;
    let details = format!(
        "{} message(s), {} rating(s), {} dataset version(s) replaced, {} adapter(s) marked",
        f.messages,
        f.ratings,
        f.datasets.len(),
        f.adapters.len()
    );
    let actor = format!("{}:user {user_id}", platform.as_str());
    if let Err(e) = core
        .db
        .audit(
            &actor,
            "forget",
            Some(&format!("user {user_id}")),
            Some(&details),
        )
        .await
    {
        tracing::warn!("cannot write the audit log: {e}");
    }
    Ok(f)
}
