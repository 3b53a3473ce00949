//! The HTTP accept loop: the web router on hyper, with the two limits `axum::serve` has no
//! setting for. A connection must send each request's headers within
//! `server.header_timeout_secs` (idle and byte-by-byte clients are closed, so they cannot
//! pile up), and at most `server.max_connections` are open at once (one more is closed as
//! soon as it is accepted, so a flood of sockets cannot take every file the process may
//! open: the database's, the models', `/healthz`'s).

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// What a connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serve `app` on `listener` until `shutdown` resolves, then wait for the requests in
/// flight to finish (kept-alive idle connections are closed).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    // HTTP/1 only, as `axum::serve` served it here: hyper's protocol sniffing (the auto
    // builder) reads the first bytes with no deadline.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut refused = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
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
            refused.count(limits.max_connections);
            drop(stream);
            continue;
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
        tokio::spawn(async move {
            // A client that leaves mid-request or sends no headers in time ends here; no
            // one else is told.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Connections closed at the cap, reported at most once a minute.
#[derive(Default)]
struct Refusals {
    since_report: u64,
    reported: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, cap: usize) {
        self.since_report += 1;
        if self
            .reported
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                "{} connection(s) closed on arrival: {cap} open already (server.max_connections)",
                self.since_report
            );
            self.since_report = 0;
            self.reported = Some(Instant::now());
        }
    }
}
