//! From a parsed command line to an exit code: resolve the hosts, build the
//! connector, run the command.
//!
//! Exit codes: 0 when every host answered and every action succeeded, 1 when
//! any host or action failed (everything else is still printed), 2 for usage
//! errors (clap's own, and ours: bad hosts, unreadable files).

use std::process::ExitCode;

use crate::{
    cli::{Cli, Command, GlobalArgs, HostArgs},
    commands,
    connect::{Connector, SecurityOptions, read_token_file},
    hosts::{self, HostSpec},
    watch,
};

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok,
    Failed,
}

impl Exit {
    pub fn from_failures(any_failed: bool) -> Self {
        if any_failed { Exit::Failed } else { Exit::Ok }
    }
}

/// A problem with what the user typed (exit 2).
#[derive(Debug)]
pub struct UsageError(pub String);

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// Resolves SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn resolve_hosts(global: &GlobalArgs, args: &HostArgs) -> Result<Vec<HostSpec>, UsageError> {
    let mut from_args = Vec::with_capacity(args.hosts.len());
    for text in &args.hosts {
        from_args.push(hosts::parse_host(text).map_err(|e| UsageError(e.to_string()))?);
    }
    for text in &global.k8s_service {
        from_args.push(hosts::k8s_service(text).map_err(|e| UsageError(e.to_string()))?);
    }
    let from_file = match &global.hosts_file {
        Some(path) => hosts::read_hosts_file(path).map_err(|e| UsageError(e.to_string()))?,
        None => Vec::new(),
    };
    let all = hosts::merge(from_args, from_file);
    if all.is_empty() {
        return Err(UsageError(
            "no hosts: give HOST arguments or --hosts-file FILE (or set GPUWATCH_HOSTS_FILE)"
                .to_owned(),
        ));
    }
    Ok(all)
}

fn connector(global: &GlobalArgs) -> Result<Connector, UsageError> {
    let token = match &global.token_file {
        Some(path) => Some(read_token_file(path).map_err(|e| UsageError(e.to_string()))?),
        None => global.token.clone(),
    };
    let security = SecurityOptions {
        token,
        tls_ca: global.tls_ca.clone(),
        tls_cert: global.tls_cert.clone(),
        tls_key: global.tls_key.clone(),
        tls_server_name: global.tls_server_name.clone(),
    };
    Connector::new(global.timeout, &security).map_err(|e| UsageError(e.to_string()))
}

fn host_args(command: &Command) -> &HostArgs {
    match command {
        Command::Watch(a) => &a.hosts,
        Command::Snapshot(a) | Command::Ps(a) | Command::List(a) => &a.hosts,
        Command::Events(a) => &a.hosts,
        Command::SetPowerLimit(a) => &a.target.hosts,
        Command::SetPowerBudget(a) => &a.hosts,
        Command::ResetClocks(a) => &a.target.hosts,
        Command::SetThreshold(a) => &a.target.hosts,
        Command::Pick(a) => &a.hosts,
        Command::Release(a) => &a.hosts,
        Command::History(a) => &a.hosts,
        Command::Record(a) => &a.hosts,
    }
}

async fn dispatch(cli: Cli) -> Result<Exit, UsageError> {
    if let Command::Watch(args) = &cli.command
        && let Some(file) = &args.replay
    {
        return watch::replay(file, args, cli.global.json).await;
    }
    let hosts = hosts::discover(resolve_hosts(&cli.global, host_args(&cli.command))?).await;
    let connector = connector(&cli.global)?;
    let json = cli.global.json;
    match cli.command {
        Command::Watch(args) => watch::run(args, hosts, connector, json).await,
        Command::Snapshot(args) => Ok(commands::snapshot::run(args, hosts, connector, json).await),
        Command::Ps(args) => Ok(commands::ps::run(args, hosts, connector, json).await),
        Command::History(args) => Ok(commands::history::run(args, hosts, connector, json).await),
        Command::Record(args) => watch::record(args, hosts, connector).await,
        Command::List(args) => Ok(commands::list::run(args, hosts, connector, json).await),
        Command::Events(args) => commands::events::run(args, hosts, connector, json).await,
        Command::SetPowerLimit(args) => {
            Ok(commands::control::set_power_limit(args, hosts, connector, json).await)
        }
        Command::SetPowerBudget(args) => {
            Ok(commands::control::set_power_budget(args, hosts, connector, json).await)
        }
        Command::ResetClocks(args) => {
            Ok(commands::control::reset_clocks(args, hosts, connector, json).await)
        }
        Command::SetThreshold(args) => {
            Ok(commands::control::set_threshold(args, hosts, connector, json).await)
        }
        Command::Pick(args) => Ok(commands::pick::run(args, hosts, connector, json).await),
        Command::Release(args) => Ok(commands::pick::release(args, hosts, connector, json).await),
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuwatch-client: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Host tasks still retrying (or a DNS lookup in flight) must not hold
    // the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Failed) => ExitCode::from(EXIT_FAILED),
        Err(UsageError(message)) => {
            eprintln!("gpuwatch-client: error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
