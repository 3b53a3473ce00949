//! The HTTP accept loop: the web router on hyper, with the limits `axum::serve` has no
//! setting for. A connection must send each request's headers within
//! `server.header_timeout_secs` (idle and byte-by-byte clients are closed, so they cannot
//! pile up); at most `server.max_connections` are open at once (one more is closed as
//! soon as it is accepted, so a flood of sockets cannot take every file the process may
//! open: the database's, the models'); and at most `server.max_connections_per_address`
//! from one address, so one client's flood does not shut the others out (a trusted
//! proxy, which speaks for many, has no such cap).

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// What a connection may take.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_per_address: usize,
    /// Addresses without the per-address cap (`server.trusted_proxies`).
    pub uncapped: Vec<IpAddr>,
    /// How long a stop waits for the requests in flight (a reply streaming for a minute
    /// outlasts a supervisor's stop timeout) before it closes them.
    pub shutdown_grace: Duration,
}

/// How long the replies still streaming at the end of the grace have to say so.
const FAREWELL: Duration = Duration::from_millis(500);

/// Serve `app` on `listener` until `shutdown` resolves, then wait for the requests in
/// flight to finish, `shutdown_grace` at most (kept-alive idle connections are closed at
/// once). Then `grace_over` runs (streaming replies say they are cut off) and what is
/// still open a moment later is dropped.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace_over: impl FnOnce(),
) {
    // HTTP/1 only, as `axum::serve` served it here: hyper's protocol sniffing (the auto
    // builder) reads the first bytes with no deadline.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(Mutex::new(HashMap::new()));
    let graceful = GracefulShutdown::new();
    let mut refused = Refusals::default();
    // The connections' tasks, so that what outlives the grace can be closed.
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of files (EMFILE) or a connection reset before it was taken:
                    // waiting lets connections close instead of spinning on the error.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.count("server.max_connections", limits.max_connections);
            drop(stream);
            continue;
        };
        let address_slot = if limits.uncapped.contains(&peer.ip()) {
            None
        } else {
            match PerAddress::take(&per_address, peer.ip(), limits.max_per_address) {
                Some(s) => Some(s),
                None => {
                    refused.count("server.max_connections_per_address", limits.max_per_address);
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        // (No route upgrades a connection.)
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            // A client that leaves mid-request or sends no headers in time ends here; no
            // one else is told.
            let _ = conn.await;
            drop((slot, address_slot));
        });
    }
    drop(listener);
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(limits.shutdown_grace, &mut drained)
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running after {:?} (server.shutdown_grace_secs): their connections are closed",
            limits.shutdown_grace
        );
        grace_over();
        let _ = tokio::time::timeout(FAREWELL, &mut drained).await;
    }
    conns.shutdown().await;
}

/// One open connection of an address; dropped when it closes.
struct PerAddress {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerAddress {
    /// A place for one more connection from `ip`, if it has fewer than `cap` open.
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, cap: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: Arc::clone(counts),
            ip,
        })
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Connections closed at a cap, reported at most once a minute.
#[derive(Default)]
struct Refusals {
    since_report: u64,
    reported: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, key: &str, cap: usize) {
        self.since_report += 1;
        if self
            .reported
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                "{} connection(s) closed on arrival: {cap} open already ({key})",
                self.since_report
            );
            self.since_report = 0;
            self.reported = Some(Instant::now());
        }
    }
}
