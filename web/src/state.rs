//! The state every handler sees: the core services and what only the web needs.

use loraloop_core::Services;
use loraloop_core::inbox::Inbox;
use secrecy::SecretString;
use std::ops::Deref;
use std::sync::Arc;

pub struct Inner {
    /// Database, configuration, engine, model, assistant, chat and adapter services.
    pub core: Services,
    pub api_key: Option<SecretString>,
    /// Largest accepted upload (datasets, adapters), from `server.max_upload_mb`.
    pub max_upload_bytes: u64,
    /// Telegram updates from the webhook route to the running bot.
    pub telegram_inbox: Arc<Inbox>,
    /// Failed console logins per client address.
    pub logins: crate::login_throttle::LoginThrottle,
    /// The classifier `POST /api/v1/predict` served last, kept loaded.
    pub classifier: Arc<LoadedClassifier>,
    /// Set when a stop's grace is over: streaming replies end with an error event
    /// before their connections are closed.
    closing: tokio::sync::watch::Sender<bool>,
}

/// The last classifier served (its checkpoint folder and the loaded model), kept loaded
/// for the next request.
pub type LoadedClassifier = std::sync::Mutex<
    Option<(
        String,
        Arc<std::sync::Mutex<loraloop_model::classify::Classifier>>,
    )>,
>;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl AppState {
    pub fn new(core: Services, telegram_inbox: Arc<Inbox>) -> Self {
        let max_upload_bytes = core.config.raw.server.max_upload_mb * 1024 * 1024;
        Self(Arc::new(Inner {
            api_key: core.config.secrets.api_key.clone(),
            max_upload_bytes,
            telegram_inbox,
            logins: crate::login_throttle::LoginThrottle::new(),
            classifier: Arc::default(),
            closing: tokio::sync::watch::Sender::new(false),
            core,
        }))
    }

    /// Tell the streaming replies that the server stops now (see [`Self::closing`]).
    pub fn close_streams(&self) {
        self.0.closing.send_replace(true);
    }

    /// Resolves once [`Self::close_streams`] was called.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
