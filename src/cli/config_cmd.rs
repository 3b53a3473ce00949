//! `loraloop config check`.

use loraloop_core::Config;
use std::process::ExitCode;

pub fn check(config: &Config) -> anyhow::Result<ExitCode> {
    // Loading already validated every value; print what the program will use.
    print!("{}", config.redacted_yaml());
    eprintln!("configuration is valid");
    Ok(ExitCode::SUCCESS)
}
