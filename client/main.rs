//! `gpuwatch-client`: the fleet CLI. Parses the command line and hands it to
//! [`app::run`]; everything else lives in the modules below.
//!
//! The client takes only the wire contract (`gpuwatch::api`) from the
//! library, never the daemon's modules.

mod app;
mod backoff;
mod cli;
mod commands;
mod connect;
mod fleet;
mod hosts;
mod output;
mod record;
mod units;
mod watch;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // clap prints help/version (exit 0) or the usage error (exit 2) itself.
    let cli = cli::Cli::parse();
    app::run(cli)
}
