//! Logging and progress: an `indicatif` bar when stderr is a terminal, plain `tracing` log
//! lines otherwise (CI logs, pipes, systemd).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// `-v` raises the level to debug, `-vv` to trace; `-q` lowers it to errors. `LORALOOP_LOG`
/// or `RUST_LOG` (an `EnvFilter` directive) override both.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = std::env::var("LORALOOP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            // Our crates at the chosen level, dependencies one step quieter.
            EnvFilter::new(format!(
                "warn,loraloop={level},loraloop_model={level},loraloop_core={level},loraloop_trainer={level}"
            ))
        });
    let stderr_is_terminal = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal)
        .with_target(verbose > 0)
        .without_time()
        .init();
}

/// Progress of one long task: a bar on a terminal, else a log line every few seconds.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_log: Instant,
    total: u64,
}

impl Progress {
    /// `bytes`: show sizes and rates in bytes instead of item counts.
    pub fn new(label: &str, total: u64, bytes: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = if bytes {
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}"
            };
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            label: label.to_string(),
            last_log: Instant::now(),
            total,
        }
    }

    pub fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                if self.last_log.elapsed() >= Duration::from_secs(2) || done == self.total {
                    self.last_log = Instant::now();
                    let pct = (done * 100).checked_div(self.total).unwrap_or(100);
                    tracing::info!("{}: {done}/{} ({pct}%)", self.label, self.total);
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
