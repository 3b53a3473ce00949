//! `loraloop serve`: one process with the web console, the REST API (`/api/v1`), the
//! OpenAI-compatible endpoint (`/v1`), the training worker and the inference engine.
//!
//! Routes: `/healthz` is open; `/api/v1/*`, `/v1/*` and `/metrics` need the API key as a
//! bearer token; every console page needs an admin session (and a CSRF token for
//! anything that changes state), except the login page and the static assets.

pub mod adapters;
pub mod api;
pub mod auth;
pub mod bots;
pub mod chat;
pub mod console;
pub mod discord;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod services;
pub mod state;
pub mod telegram;

use crate::adapters::AdapterService;
use crate::metrics::Metrics;
use crate::state::{AppState, Inner, ModelInfo};
use anyhow::Context;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use candle_core::Device;
use loraloop_core::{Config, Db};
use loraloop_model::engine::{Engine, LoadedModel};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How to run the server (what the config file does not say).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen here instead of `server.host:server.port` (tests use port 0).
    pub bind: Option<SocketAddr>,
    /// Run the training worker in this process.
    pub worker: bool,
    /// How often the idle worker looks for a queued job.
    pub poll_interval: Duration,
    /// Run only this bot (`loraloop bot telegram`): no console, API or worker; HTTP only
    /// for a webhook; the active adapter follows activations made by another process.
    pub only_bot: Option<BotKind>,
}

/// A chat platform bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BotKind {
    Telegram,
    Discord,
}

impl BotKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Telegram => "telegram",
            Self::Discord => "discord",
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            bind: None,
            worker: true,
            poll_interval: Duration::from_millis(500),
            only_bot: None,
        }
    }
}

/// A started server.
pub struct RunningServer {
    /// Where HTTP is served (None: a bot alone, without a webhook).
    pub addr: Option<SocketAddr>,
    /// The admin password generated on this start (printed once; only its hash is kept).
    pub generated_password: Option<String>,
    pub state: AppState,
    shutdown: Arc<tokio::sync::Notify>,
    worker_stop: Arc<AtomicBool>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    follower: Option<tokio::task::JoinHandle<()>>,
    worker: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    telegram: Option<(
        Arc<tokio::sync::Notify>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    discord: Option<(
        Arc<tokio::sync::Notify>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
}

impl RunningServer {
    /// Stop accepting requests, let the running training job checkpoint and go back to
    /// the queue, and wait for both.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.notify_one();
        self.worker_stop.store(true, Ordering::SeqCst);
        if let Some((stop, bot)) = self.telegram {
            stop.notify_one();
            bot.await??;
        }
        // Closes the gateway connection and waits for the shard to end.
        if let Some((stop, bot)) = self.discord {
            stop.notify_one();
            bot.await??;
        }
        if let Some(server) = self.server {
            server.await??;
        }
        if let Some(f) = self.follower {
            f.abort();
        }
        if let Some(w) = self.worker {
            w.await??;
        }
        Ok(())
    }

    /// Run until Ctrl-C or SIGTERM, then stop.
    pub async fn run_until_ctrl_c(self) -> anyhow::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!(
            "\nstopping: a running training job saves a checkpoint and goes back to the queue"
        );
        self.stop().await
    }
}

/// The device for a configured choice, said in a log line. `auto` is the first CUDA
/// device when this binary has CUDA support and a device answers, else the CPU; `cuda:N`
/// fails (with the reason) when it cannot be had.
pub fn select_device(choice: loraloop_core::config::DeviceChoice) -> anyhow::Result<Device> {
    let (device, why) = pick_device(choice)?;
    tracing::info!("device: {} ({why})", device_name(&device));
    Ok(device)
}

/// `select_device` without the log line: the device and why it was chosen.
pub fn pick_device(
    choice: loraloop_core::config::DeviceChoice,
) -> anyhow::Result<(Device, String)> {
    use loraloop_core::config::DeviceChoice;
    let built_with_cuda = candle_core::utils::cuda_is_available();
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "device cpu configured".into())),
        DeviceChoice::Auto if !built_with_cuda => Ok((
            Device::Cpu,
            "auto: this binary was built without CUDA support".into(),
        )),
        DeviceChoice::Auto => match Device::new_cuda(0) {
            Ok(d) => Ok((d, "auto: a CUDA device answered".into())),
            Err(e) => Ok((
                Device::Cpu,
                format!(
                    "auto: no CUDA device answered: {}",
                    first_line(&e.to_string())
                ),
            )),
        },
        DeviceChoice::Cuda(n) if !built_with_cuda => anyhow::bail!(
            "device cuda:{n} requested but this binary was built without CUDA support (build with `--features cuda`); or use device cpu (`device: cpu` in the config, or --device cpu)"
        ),
        DeviceChoice::Cuda(n) => match Device::new_cuda(n) {
            Ok(d) => Ok((d, format!("device cuda:{n} configured"))),
            Err(e) => anyhow::bail!(
                "device cuda:{n} requested but it cannot be opened: {}; check the NVIDIA driver and the device number, or use device cpu",
                first_line(&e.to_string())
            ),
        },
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Open the database, load the model, start the engine, the worker and the HTTP server.
pub async fn start(config: Config, opts: ServeOptions) -> anyhow::Result<RunningServer> {
    let db = Db::open(&config.database_path).await.with_context(|| {
        format!(
            "cannot open the database {}",
            config.database_path.display()
        )
    })?;
    let generated_password =
        auth::ensure_admin(&db, config.secrets.admin_password.as_ref()).await?;

    let model_path = config.model_path();
    if !model_path.exists() {
        anyhow::bail!(
            "the model {} is not there: run `loraloop models fetch` (or set `model` in the config)",
            model_path.display()
        );
    }
    let dev = select_device(config.device)?;
    let (model, hash) = {
        let (path, dev) = (model_path.clone(), dev.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let model = LoadedModel::load(&path, &dev)?;
            let hash = loraloop_trainer::run::hash_model(&path)?;
            Ok((model, hash))
        })
        .await
        .context("the model loader panicked")?
        .with_context(|| format!("cannot load the model {}", model_path.display()))?
    };
    let info = ModelInfo {
        name: model.name(),
        config_name: config.raw.model.clone(),
        path: model_path.clone(),
        hash,
        tokenizer_hash: model.tokenizer.fingerprint(),
        chat_template_hash: model.template.fingerprint(),
        device: device_name(&dev),
        layers: model.llama.config.num_layers,
        context_length: model.context_length(),
    };
    let engine = Engine::start(model);
    let shared_model = engine.shared_model();
    let a = &config.raw.assistant;
    let assistant = db
        .ensure_assistant(&a.name, &config.raw.model, &a.system_prompt)
        .await?;
    let adapters_dir = config.raw.data_dir.join("adapters");
    std::fs::create_dir_all(&adapters_dir)
        .with_context(|| format!("cannot create {}", adapters_dir.display()))?;
    let state = AppState(Arc::new(Inner {
        db: db.clone(),
        engine,
        model: info,
        assistant,
        adapters: AdapterService::default(),
        metrics: Arc::new(Metrics::default()),
        api_key: config.secrets.api_key.clone(),
        adapters_dir: adapters_dir.clone(),
        max_upload_bytes: config.raw.server.max_upload_mb * 1024 * 1024,
        started: Instant::now(),
        telegram_inbox: Default::default(),
        config,
    }));
    match state.adapters.restore(&state).await {
        Ok(Some(name)) => tracing::info!("active adapter: {name}"),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!("the active adapter cannot be restored, serving the base model: {e}")
        }
    }

    let worker_stop = Arc::new(AtomicBool::new(false));
    let worker = (opts.worker && opts.only_bot.is_none()).then(|| {
        let opts = loraloop_trainer::worker::WorkerOptions {
            models_dir: state.config.models_dir.clone(),
            adapters_dir: adapters_dir.clone(),
            poll_interval: opts.poll_interval,
            device: dev.clone(),
            // A job on the served model trains on the engine's weights (one copy in memory).
            shared_model: Some((model_path.clone(), shared_model)),
        };
        tokio::spawn(loraloop_trainer::worker::run_worker(
            db.clone(),
            opts,
            worker_stop.clone(),
        ))
    });

    let shutdown = Arc::new(tokio::sync::Notify::new());
    let webhook = state.config.raw.telegram.webhook_url.is_some()
        && state.config.secrets.telegram_bot_token.is_some()
        && matches!(opts.only_bot, None | Some(BotKind::Telegram));
    let (addr, server) = if opts.only_bot.is_none() || webhook {
        let bind = match opts.bind {
            Some(b) => b,
            None => {
                let s = &state.config.raw.server;
                tokio::net::lookup_host((s.host.as_str(), s.port))
                    .await
                    .with_context(|| format!("cannot resolve server.host {:?}", s.host))?
                    .next()
                    .with_context(|| format!("server.host {:?} resolves to nothing", s.host))?
            }
        };
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| {
            format!("cannot listen on {bind} (is another server running there? set server.port)")
        })?;
        let addr = listener.local_addr()?;
        let app = match opts.only_bot {
            None => router(state.clone()),
            Some(_) => bot_router(state.clone()),
        };
        let shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.notified().await })
                .await
        });
        (Some(addr), Some(server))
    } else {
        (None, None)
    };
    let wants = |kind: BotKind| opts.only_bot.is_none_or(|k| k == kind);
    let telegram = match state.config.secrets.telegram_bot_token.clone() {
        Some(token) if wants(BotKind::Telegram) => {
            let stop = Arc::new(tokio::sync::Notify::new());
            let bot = tokio::spawn(telegram::run(state.clone(), token, stop.clone()));
            Some((stop, bot))
        }
        None if opts.only_bot == Some(BotKind::Telegram) => {
            anyhow::bail!("the Telegram bot needs its token: set TELEGRAM_BOT_TOKEN")
        }
        _ => None,
    };
    let discord = match state.config.secrets.discord_bot_token.clone() {
        Some(token) if wants(BotKind::Discord) => {
            let stop = Arc::new(tokio::sync::Notify::new());
            let bot = tokio::spawn(discord::run(state.clone(), token, stop.clone()));
            Some((stop, bot))
        }
        None if opts.only_bot == Some(BotKind::Discord) => {
            anyhow::bail!("the Discord bot needs its token: set DISCORD_BOT_TOKEN")
        }
        _ => None,
    };
    // A bot alone serves what another process (`loraloop serve`) activates.
    let follower = opts.only_bot.map(|_| {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                match state.adapters.follow(&state).await {
                    Ok(Some(a)) => tracing::info!(
                        "active adapter changed: now {}",
                        a.adapter_name.as_deref().unwrap_or("the base model")
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot follow the active adapter: {}", e.message),
                }
            }
        })
    });
    Ok(RunningServer {
        addr,
        generated_password,
        state,
        shutdown,
        worker_stop,
        server,
        follower,
        worker,
        telegram,
        discord,
    })
}

/// A bot alone: health check, and the Telegram webhook when one is configured.
fn bot_router(state: AppState) -> Router {
    let r = Router::new().route("/healthz", axum::routing::get(healthz));
    with_webhook(r, &state).with_state(state)
}

fn with_webhook(r: Router<AppState>, state: &AppState) -> Router<AppState> {
    let path = state
        .config
        .raw
        .telegram
        .webhook_url
        .as_deref()
        .and_then(|u| reqwest::Url::parse(u).ok())
        .map(|u| u.path().to_string());
    match path {
        Some(p) => r.route(&p, axum::routing::post(telegram::webhook_route)),
        None => r,
    }
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    let (api, doc) = api::router(&state).split_for_parts();
    let doc = Arc::new(doc);
    let api = api
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let open = Router::new().route("/healthz", axum::routing::get(healthz));
    with_webhook(open, &state)
        .merge(api)
        .merge(console::router(state.clone()))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.max_upload_bytes as usize,
        ))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn record_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    state
        .metrics
        .record_request(&method, &route, resp.status().as_u16());
    resp
}

/// The folder under which a name supplied by a client may become a path: refuses
/// separators, `..`, and anything but letters, digits, `-`, `_`, `.`.
pub fn safe_file_name(name: &str) -> Result<&str, error::ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name)
    } else {
        Err(error::ApiError::invalid(
            "name",
            format!(
                "{name:?} is not a valid name: use letters, digits, '-', '_' and '.', not starting with '.'"
            ),
        ))
    }
}

/// A scratch path for a download or an upload.
pub fn scratch_file(state: &AppState, suffix: &str) -> PathBuf {
    state
        .config
        .raw
        .data_dir
        .join("tmp")
        .join(format!("{}{suffix}", auth::random_token(8)))
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use loraloop_core::config::DeviceChoice;

    #[test]
    fn cpu_is_named_cpu_and_chosen_when_configured() {
        let (d, why) = pick_device(DeviceChoice::Cpu).unwrap();
        assert!(d.is_cpu());
        assert_eq!(device_name(&d), "cpu");
        assert!(why.contains("configured"), "{why}");
    }

    // A CPU build: `auto` falls back to the CPU and says why; `cuda` is refused with the fix.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_support_auto_is_cpu_and_cuda_is_refused() {
        let (d, why) = pick_device(DeviceChoice::Auto).unwrap();
        assert!(d.is_cpu());
        assert!(why.contains("built without CUDA"), "{why}");
        let e = pick_device(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }

    // A CUDA build: `auto` is a CUDA device if one answers, else the CPU with the reason;
    // an explicit device that cannot be opened is an error naming it.
    #[cfg(feature = "cuda")]
    #[test]
    fn with_cuda_support_auto_follows_the_device() {
        let (d, why) = pick_device(DeviceChoice::Auto).unwrap();
        match Device::new_cuda(0) {
            Ok(_) => {
                assert!(d.is_cuda(), "{why}");
                assert_eq!(device_name(&d), "cuda:0");
            }
            Err(_) => {
                assert!(d.is_cpu());
                assert!(why.contains("no CUDA device answered"), "{why}");
            }
        }
        let e = pick_device(DeviceChoice::Cuda(4096))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:4096"), "{e}");
    }
}
