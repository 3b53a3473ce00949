//! Where an HTTP webhook route hands a platform's updates to the running bot: the secret
//! the platform must send with each update (set when the bot registers its webhook), and a
//! wake-up for the bot once an update is stored. The route and the bot share one `Inbox`
//! and know nothing else of each other.

use std::sync::Mutex;

#[derive(Default)]
pub struct Inbox {
    /// The secret, and the source the bot's updates are stored under (its id).
    secret: Mutex<Option<(String, String)>>,
    stored: tokio::sync::Notify,
}

impl Inbox {
    /// The secret a delivery must carry and the source its update is stored under; None
    /// until the bot has registered its webhook.
    pub fn secret(&self) -> Option<(String, String)> {
        self.secret
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_secret(&self, secret: String, source: String) {
        *self.secret.lock().unwrap_or_else(|e| e.into_inner()) = Some((secret, source));
    }

    /// An update was stored: wake the bot.
    pub fn stored(&self) {
        self.stored.notify_one();
    }

    /// Wait until an update is stored.
    pub async fn wait(&self) {
        self.stored.notified().await;
    }
}
