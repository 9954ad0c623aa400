//! `gpuwatch-client`: the fleet CLI. Parses the command line and hands it to
//! [`gpuwatch_client::run`]; everything else lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // clap prints help/version (exit 0) or the usage error (exit 2) itself.
    let cli = gpuwatch_client::cli::Cli::parse();
    gpuwatch_client::run(cli)
}
