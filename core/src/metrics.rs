//! Prometheus metrics of the process (HTTP requests, generation, adapter swaps), kept in
//! atomics and written in the text exposition format by the web's `/metrics` route.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Metrics {
    /// (method, route template, status) -> count
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    generated_tokens: AtomicU64,
    /// Decode time of finished generations, in microseconds.
    decode_micros: AtomicU64,
    generations: AtomicU64,
    failed_generations: AtomicU64,
    /// Generations dropped before they ended (the client left).
    abandoned_generations: AtomicU64,
    /// Generations queued or running in the engine.
    in_flight: AtomicI64,
    adapter_swaps: AtomicU64,
}

impl Metrics {
    pub fn record_request(&self, method: &str, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
    }

    /// A generation queued: it counts in the queue depth until the returned guard is
    /// dropped, and as finished, failed or abandoned by what the guard was told.
    pub fn generation_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            metrics: Arc::clone(self),
            ended: false,
        }
    }

    pub fn adapter_swapped(&self) {
        self.adapter_swaps.fetch_add(1, Ordering::Relaxed);
    }

    pub fn queue_depth(&self) -> i64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The text format. `training` holds (last step seconds, tokens/s) of the running job.
    pub fn render(
        &self,
        queued_jobs: i64,
        running_jobs: i64,
        training: Option<(f64, f64)>,
    ) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP loraloop_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(s, "# TYPE loraloop_http_requests_total counter");
        for ((method, route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "loraloop_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                route.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        let tokens = self.generated_tokens.load(Ordering::Relaxed);
        let secs = self.decode_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let counters = [
            (
                "loraloop_generated_tokens_total",
                "Tokens generated.",
                tokens as f64,
            ),
            (
                "loraloop_generation_decode_seconds_total",
                "Time spent decoding.",
                secs,
            ),
            (
                "loraloop_generations_total",
                "Finished generations.",
                self.generations.load(Ordering::Relaxed) as f64,
            ),
            (
                "loraloop_generations_failed_total",
                "Generations that failed.",
                self.failed_generations.load(Ordering::Relaxed) as f64,
            ),
            (
                "loraloop_generations_abandoned_total",
                "Generations stopped before they ended because the client left.",
                self.abandoned_generations.load(Ordering::Relaxed) as f64,
            ),
            (
                "loraloop_adapter_swaps_total",
                "Adapter activations and rollbacks.",
                self.adapter_swaps.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let tps = if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        };
        let mut gauges = vec![
            (
                "loraloop_generation_tokens_per_second",
                "Decode tokens/s over all finished generations.",
                tps,
            ),
            (
                "loraloop_generation_queue_depth",
                "Generations queued or running.",
                self.queue_depth() as f64,
            ),
            (
                "loraloop_training_jobs_queued",
                "Training jobs waiting.",
                queued_jobs as f64,
            ),
            (
                "loraloop_training_jobs_running",
                "Training jobs running.",
                running_jobs as f64,
            ),
        ];
        if let Some((step_secs, tok_s)) = training {
            gauges.push((
                "loraloop_training_step_seconds",
                "Duration of the running job's last step.",
                step_secs,
            ));
            gauges.push((
                "loraloop_training_tokens_per_second",
                "Training tokens/s of the running job's last step.",
                tok_s,
            ));
        }
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}

/// A generation in the queue depth until dropped. Told how it ended (only the first word
/// counts); dropped untold, it was abandoned: its client left and the engine stopped it.
pub struct InFlight {
    metrics: Arc<Metrics>,
    ended: bool,
}

impl InFlight {
    /// It finished with `tokens` generated in `decode_secs`.
    pub fn finished(&mut self, tokens: usize, decode_secs: f64) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let m = &self.metrics;
        m.generations.fetch_add(1, Ordering::Relaxed);
        m.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        m.decode_micros
            .fetch_add((decode_secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// The engine failed it.
    pub fn failed(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            self.metrics
                .failed_generations
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.ended {
            self.metrics
                .abandoned_generations
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(m: &Metrics, name: &str) -> String {
        let text = m.render(0, 0, None);
        let prefix = format!("{name} ");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .to_string()
    }

    #[test]
    fn a_generation_counts_once_as_what_it_was_told_and_untold_as_abandoned() {
        let m = Arc::new(Metrics::default());
        let mut done = m.generation_started();
        let mut broken = m.generation_started();
        let left = m.generation_started();
        assert_eq!(m.queue_depth(), 3);
        done.finished(10, 0.5);
        done.failed(); // a second word does not count
        broken.failed();
        drop((done, broken, left));
        assert_eq!(m.queue_depth(), 0);
        for (name, value) in [
            ("loraloop_generations_total", 1),
            ("loraloop_generated_tokens_total", 10),
            ("loraloop_generations_failed_total", 1),
            ("loraloop_generations_abandoned_total", 1),
        ] {
            assert_eq!(line(&m, name), format!("{name} {value}"));
        }
    }
}
