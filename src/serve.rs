//! `loraloop serve` and `loraloop bot`: open the database, load the model, start the
//! engine, build the core services, and run on them what was asked: the web router, the
//! bots, the training worker. The one place where the parts meet.

use anyhow::Context;
use loraloop_core::inbox::Inbox;
use loraloop_core::service::{ModelInfo, Parts};
use loraloop_core::supervisor::supervise;
use loraloop_core::{Config, Db, Services};
use loraloop_model::device::{device_name, select_device};
use loraloop_model::engine::{Engine, LoadedModel};
use loraloop_web::AppState;
use secrecy::SecretString;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

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

/// How often (seconds) `serve` looks at a running canary's ratings.
const CANARY_EVERY_SECS: u64 = 5;
/// How often old rows are removed (`retention:`), the first time 5 s after the start.
const PRUNE_EVERY_SECS: u64 = 3600;

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

/// A bot under its supervisor: `stop` ends its run, `stopping` a wait for a restart.
struct Bot {
    stop: Arc<Notify>,
    stopping: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Bot {
    async fn stop(self) -> anyhow::Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_one();
        Ok(self.task.await?)
    }
}

/// A started server.
pub struct RunningServer {
    /// Where HTTP is served (None: a bot alone, without a webhook).
    pub addr: Option<SocketAddr>,
    /// The admin password generated on this start (printed once; only its hash is kept).
    pub generated_password: Option<String>,
    pub state: Services,
    shutdown: Arc<Notify>,
    worker_stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    follower: JoinHandle<()>,
    worker: Option<JoinHandle<()>>,
    telegram: Option<Bot>,
    discord: Option<Bot>,
}

impl RunningServer {
    /// Stop accepting requests, let the running training job checkpoint and go back to
    /// the queue, and wait for both.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.notify_one();
        self.worker_stop.store(true, Ordering::SeqCst);
        if let Some(bot) = self.telegram {
            bot.stop().await?;
        }
        // Closes the gateway connection and waits for the shard to end.
        if let Some(bot) = self.discord {
            bot.stop().await?;
        }
        if let Some(server) = self.server {
            server.await?;
        }
        self.follower.abort();
        if let Some(w) = self.worker {
            w.await?;
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

/// Load the model and build the services on it and `db`.
async fn services(config: Config, db: Db) -> anyhow::Result<(Services, candle_core::Device)> {
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
            let hash = loraloop_trainer::fingerprint::hash_model(&path)?;
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
    let engine_limits = config.raw.engine.limits(&model);
    let a = &config.raw.assistant;
    let assistant = db
        .ensure_assistant(&a.name, &config.raw.model, &a.system_prompt)
        .await?;
    let adapters_dir = config.raw.data_dir.join("adapters");
    std::fs::create_dir_all(&adapters_dir)
        .with_context(|| format!("cannot create {}", adapters_dir.display()))?;
    let core = Services::new(Parts {
        db,
        engine: Engine::start_with(model, engine_limits),
        model: info,
        assistant,
        adapters_dir,
        config,
    });
    // The config's `assistants:` are set from it at every start.
    core.assistants
        .sync_config(&core.config.raw.assistants)
        .await
        .context("cannot set up the config's assistants")?;
    match core.adapters.restore().await {
        Ok(Some(name)) => tracing::info!("active adapter: {name}"),
        Ok(None) => {}
        Err(e) => {
            // The database still names it: it is tried again every second (see the
            // follower) and /healthz says the base model answers meanwhile.
            let message = format!(
                "the active adapter cannot be loaded, the base model answers until it can: {e}"
            );
            tracing::error!("{message}");
            core.health.report("adapter", Err(message));
        }
    }
    Ok((core, dev))
}

/// Start what `opts` asks for on `config`: the services, then the worker, the HTTP
/// server and the bots.
pub async fn start(config: Config, opts: ServeOptions) -> anyhow::Result<RunningServer> {
    let db = Db::open(&config.database_path).await.with_context(|| {
        format!(
            "cannot open the database {}",
            config.database_path.display()
        )
    })?;
    let generated_password =
        loraloop_web::auth::ensure_admin(&db, config.secrets.admin_password.as_ref()).await?;
    let (core, dev) = services(config, db).await?;

    let worker_stop = Arc::new(AtomicBool::new(false));
    let worker = (opts.worker && opts.only_bot.is_none()).then(|| {
        let opts = loraloop_trainer::worker::WorkerOptions {
            models_dir: core.config.models_dir.clone(),
            adapters_dir: core.adapters_dir.clone(),
            poll_interval: opts.poll_interval,
            device: dev.clone(),
            // A job on the served model trains on the engine's weights (one copy in memory).
            shared_model: Some((core.model.path.clone(), core.engine.shared_model())),
            gate: loraloop_trainer::job_card::GateOptions {
                after_activation: Some(swap_after_gate(&core)),
                ..loraloop_trainer::job_card::GateOptions::from_config(&core.config)
            },
            // Chat first: a job pauses before each layer while replies are being made.
            yield_to: Some(loraloop_trainer::yield_to::YieldTo::new({
                let engine = core.engine.clone();
                Arc::new(move || engine.busy())
            })),
        };
        let (db, stop, health) = (core.db.clone(), worker_stop.clone(), core.health.clone());
        tokio::spawn(async move {
            supervise(&health, "worker", &stop, || {
                loraloop_trainer::worker::run_worker(db.clone(), opts.clone(), stop.clone())
            })
            .await
        })
    });

    let telegram_inbox = Arc::new(Inbox::default());
    let shutdown = Arc::new(Notify::new());
    let webhook = core.config.raw.telegram.webhook_url.is_some()
        && core.config.secrets.telegram_bot_token.is_some()
        && matches!(opts.only_bot, None | Some(BotKind::Telegram));
    let (addr, server) = if opts.only_bot.is_none() || webhook {
        let bind = match opts.bind {
            Some(b) => b,
            None => {
                let s = &core.config.raw.server;
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
        let state = AppState::new(core.clone(), telegram_inbox.clone());
        let web_state = state.clone();
        let app = match opts.only_bot {
            None => {
                loraloop_web::files::remove_leftovers(&state).await;
                // Jobs a stopped server left in `validating_files`.
                tokio::spawn(loraloop_web::job_files::validate_waiting(state.clone()));
                loraloop_web::router(state)
            }
            Some(_) => loraloop_web::bot_router(state),
        };
        let shutdown = shutdown.clone();
        let limits = crate::listener::Limits {
            header_timeout: Duration::from_secs_f64(core.config.raw.server.header_timeout_secs),
            max_connections: core.config.raw.server.max_connections,
            max_per_address: core.config.raw.server.max_connections_per_address,
            uncapped: core.config.raw.server.trusted_proxies.clone(),
            shutdown_grace: Duration::from_secs_f64(core.config.raw.server.shutdown_grace_secs),
        };
        let server = tokio::spawn(async move {
            crate::listener::serve(
                listener,
                app,
                limits,
                async move { shutdown.notified().await },
                move || web_state.close_streams(),
            )
            .await
        });
        (Some(addr), Some(server))
    } else {
        (None, None)
    };
    let telegram = {
        let (core, inbox) = (core.clone(), telegram_inbox.clone());
        start_bot(
            &core.clone(),
            BotKind::Telegram,
            &opts,
            move |token, stop| {
                loraloop_bots::telegram::run(core.clone(), inbox.clone(), token, stop)
            },
        )?
    };
    let discord = {
        let core2 = core.clone();
        start_bot(&core, BotKind::Discord, &opts, move |token, stop| {
            loraloop_bots::discord::run(core2.clone(), token, stop)
        })?
    };
    // The engine serves what the database says is active, whoever activated it: the
    // gate in a training worker (this process's or `loraloop worker`'s), or `loraloop
    // serve` when this is a bot alone. Every few seconds the running canary, if any, is
    // looked at and ended when its ratings decide.
    let follower = {
        let core = core.clone();
        tokio::spawn(async move {
            for tick in 1u64.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tick % PRUNE_EVERY_SECS == 5 {
                    let retention = core.config.raw.retention.retention();
                    match core.db.prune(&retention).await {
                        Ok(p) if p.total() > 0 => tracing::info!(?p, "retention: old rows removed"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("retention: cannot remove old rows: {e}"),
                    }
                }
                if tick % CANARY_EVERY_SECS == 0 {
                    match core.canary.tick().await {
                        Ok(ended) => {
                            for (c, d) in ended {
                                tracing::info!(
                                    assistant = c.assistant_id,
                                    adapter = c.adapter_id,
                                    "canary ended: {d:?}"
                                )
                            }
                        }
                        Err(e) => tracing::warn!("cannot look at the canaries: {e}"),
                    }
                }
                match core.adapters.follow().await {
                    Ok(Some(a)) => tracing::info!(
                        "active adapter changed: now {}",
                        a.adapter_name.as_deref().unwrap_or("the base model")
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        let message = format!(
                            "the active adapter cannot be loaded, the base model answers until it can: {e}"
                        );
                        // Logged when it starts failing, not every second.
                        if core.health.report("adapter", Err(message.clone())) {
                            tracing::error!("{message}");
                        }
                        continue;
                    }
                }
                if core.health.report("adapter", Ok(())) && tick > 1 {
                    tracing::info!("the active adapter is loaded again");
                }
            }
        })
    };
    Ok(RunningServer {
        addr,
        generated_password,
        state: core,
        shutdown,
        worker_stop,
        server,
        follower,
        worker,
        telegram,
        discord,
    })
}

/// What the gate of this process's worker awaits after it activates an adapter: the
/// engine swaps to it before the job reports success.
fn swap_after_gate(core: &Services) -> loraloop_trainer::job_card::AfterActivation {
    let core = core.clone();
    loraloop_trainer::job_card::AfterActivation(Arc::new(move || {
        let core = core.clone();
        Box::pin(async move {
            match core.adapters.follow_now().await {
                Ok(Some(a)) => tracing::info!(
                    "active adapter changed: now {}",
                    a.adapter_name.as_deref().unwrap_or("the base model")
                ),
                Ok(None) => {}
                // The follower loop tries again each second and reports it.
                Err(e) => tracing::warn!("the gate's adapter cannot be loaded yet: {e}"),
            }
        })
    }))
}

/// Start the `kind` bot under its supervisor when its token is set and this run wants
/// it; a bot run alone without its token is an error naming the variable to set.
fn start_bot<Fut>(
    core: &Services,
    kind: BotKind,
    opts: &ServeOptions,
    run: impl Fn(SecretString, Arc<Notify>) -> Fut + Send + Sync + 'static,
) -> anyhow::Result<Option<Bot>>
where
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (token, name, var) = match kind {
        BotKind::Telegram => (
            core.config.secrets.telegram_bot_token.clone(),
            "telegram",
            "TELEGRAM_BOT_TOKEN",
        ),
        BotKind::Discord => (
            core.config.secrets.discord_bot_token.clone(),
            "discord",
            "DISCORD_BOT_TOKEN",
        ),
    };
    let wanted = opts.only_bot.is_none_or(|k| k == kind);
    match token {
        Some(token) if wanted => {
            let stop = Arc::new(Notify::new());
            let stopping = Arc::new(AtomicBool::new(false));
            let (s, flag, health) = (stop.clone(), stopping.clone(), core.health.clone());
            let task = tokio::spawn(async move {
                supervise(&health, name, &flag, || run(token.clone(), s.clone())).await
            });
            Ok(Some(Bot {
                stop,
                stopping,
                task,
            }))
        }
        None if opts.only_bot == Some(kind) => {
            anyhow::bail!("the {name} bot needs its token: set {var}")
        }
        _ => Ok(None),
    }
}
