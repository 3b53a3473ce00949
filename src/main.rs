//! The `loraloop` binary: parse arguments, load the configuration, wire the parts, run them.

mod cli;
mod progress;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc keeps freed blocks for reuse: training allocates and frees large activation
/// tensors every step, which glibc's allocator hands back to the kernel (`munmap`) and
/// then faults in again, zero page by page.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
