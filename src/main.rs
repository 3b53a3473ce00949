//! The `loraloop` binary: parse arguments, load the configuration, wire the parts, run them.

mod cli;
mod progress;

use clap::Parser;
use std::process::ExitCode;

/// Every candle op allocates its output; a training step allocates and frees gigabytes
/// of activations (the output head's logits alone are 50 MB per chunk). glibc maps
/// blocks that large afresh each time, and the kernel zeroes every new page. mimalloc,
/// told never to return freed memory to the OS, reuses it instead: +17% training
/// tokens/s on the 135M model (`loraloop bench train`, 2 steps after a warm-up), at the
/// cost of keeping the peak heap resident, as PyTorch's caching allocator does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`: index 15 of `mi_option_e` in mimalloc.h (the same in v2 and
/// v3); -1 means freed memory is never purged.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; it takes no
    // pointers and may be called at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
    };
}

/// candle captures a backtrace into every error it makes when `RUST_BACKTRACE` is set and
/// prints it with the message, so a user's one-line error became forty lines of frames.
/// `RUST_LIB_BACKTRACE=0` turns that capture off and leaves panics' backtraces to
/// `RUST_BACKTRACE`; one set by the user is kept.
///
/// # Safety
/// As [`loraloop_model::pin_candle_thread_count`]: before any other thread exists.
#[allow(unsafe_code)]
unsafe fn keep_backtraces_out_of_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        loraloop_model::pin_candle_thread_count();
        keep_backtraces_out_of_errors();
    };
    keep_freed_memory();
    let args = cli::Cli::parse();
    progress::init_logging(args.verbose, args.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
