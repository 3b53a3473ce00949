//! Opt-in timing of the training graph's parts (`LORALOOP_TRAIN_PROFILE=1`): what
//! `loraloop bench train` prints to find where a step's time goes.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pub(super) static ON: OnceLock<bool> = OnceLock::new();
pub(super) static TOTALS: Mutex<BTreeMap<&'static str, (f64, usize)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    *ON.get_or_init(|| std::env::var_os("LORALOOP_TRAIN_PROFILE").is_some())
}

/// Run `f`, adding its wall time to `tag` when profiling is on.
pub fn time<T>(tag: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = m.entry(tag).or_insert((0.0, 0));
    e.0 += t.elapsed().as_secs_f64();
    e.1 += 1;
    out
}

/// The totals so far (seconds, calls), and reset them.
pub fn take() -> Vec<(&'static str, f64, usize)> {
    let mut m = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let out = m.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
    m.clear();
    out
}
