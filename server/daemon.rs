//! The daemon assembled: backend, device actors, sampler, control plane, hub,
//! event log and the gRPC server, started in order and stopped in order.
//!
//! `main` only parses flags and calls [`start`]; tests do the same in-process
//! with `127.0.0.1:0` and read the bound address back from [`Daemon`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{Server, server::TcpIncoming},
};

use crate::{
    actor::DeviceActor,
    api::{EventKind, Severity, gpu_watch_server::GpuWatchServer},
    attribution::{
        HostRecords,
        tracker::{Join, Tracker},
    },
    auth::Authenticator,
    authz::{Authorize, RefusalGate},
    backend::{
        Backend, BackendError,
        nvml::NvmlBackend,
        sim::{SimBackend, hardware::HardwareStore},
    },
    config::{BackendKind, Config},
    control::{ControlHandle, Controller},
    events::{Actor, EventLog, NewEvent},
    hub::Hub,
    limits::StreamLimiter,
    persist::Persister,
    sampler::{DESCRIBE_TIMEOUT, GpuSlot, Sampler},
    service::{GpuWatchService, ServiceParts},
    state::StateStore,
    statedir::StateDirError,
    watch_frames::SharedFrames,
    watch_wire,
};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The configuration cannot be used (a file it names is missing,
    /// unreadable or wrong).
    #[error("configuration error: {0}")]
    Config(String),
    /// The GPU stack is missing or broken.
    #[error("{0}")]
    Backend(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The state directory cannot be used (locked by another daemon, not
    /// readable or writable, its contents unloadable): exit code 73.
    #[error(transparent)]
    StateDir(#[from] crate::statedir::StateDirError),
    /// Anything else at startup.
    #[error("{0}")]
    Startup(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// Asked to stop (SIGTERM/SIGINT) before it served: startup repairs
    /// under way were finished (bounded), what the governor holds was given
    /// back, and everything recorded was committed. A clean stop.
    #[error("stopped during startup")]
    Stopped,
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), DaemonError>>,
    hub: Arc<Hub>,
    events: Arc<EventLog>,
}

impl Daemon {
    /// The address the gRPC server actually bound.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the HTTP server bound, when it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where desired state and the event log live (None: memory only).
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Asks the daemon to stop (ends streams, restores GPUs).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The token that stops the daemon.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the daemon has stopped.
    pub async fn wait(self) -> Result<(), DaemonError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(DaemonError::Serve(format!("daemon task failed: {e}"))),
        }
    }
}

/// The state directory: configured, else systemd's `$STATE_DIRECTORY`, else
/// `/var/lib/gpuwatch` for real GPUs or a per-user directory for simulated
/// ones (so simulated state never mixes with a real host's).
pub fn resolve_state_dir(config: &Config) -> Option<PathBuf> {
    if let Some(dir) = &config.controller.state_dir {
        return Some(dir.clone());
    }
    if let Ok(dirs) = std::env::var("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').find(|d| !d.is_empty())
    {
        return Some(PathBuf::from(first));
    }
    match config.backend.kind {
        BackendKind::Nvml => Some(PathBuf::from("/var/lib/gpuwatch")),
        BackendKind::Simulator => {
            let base = std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state"))
                })?;
            Some(base.join("gpuwatch").join("simulator"))
        }
    }
}

/// The attribution thread over the host's records or the simulator's.
fn attribution_tracker(
    config: &Config,
    sim_records: Option<Box<dyn HostRecords>>,
    events: &Arc<EventLog>,
) -> Result<Tracker, DaemonError> {
    let a = &config.attribution;
    let simulated = sim_records.is_some();
    let (source, name): (Box<dyn HostRecords>, _) = match sim_records {
        Some(sim) if !a.reads_host(true) => (sim, "simulator"),
        _ => (crate::attribution::host_records(a), "host"),
    };
    if simulated && name == "host" {
        tracing::info!(
            proc_root = %a.proc_root.display(),
            "simulated GPUs, attributed from the host's records"
        );
    }
    let join = Join::new(source, name, a.enabled, Some(events.clone()))
        .command_lines(a.command_lines, a.command_line_max_bytes);
    Tracker::spawn(join)
        .map_err(|e| DaemonError::Startup(format!("cannot start the attribution thread: {e}")))
}

type BackendAndRecords = (Arc<dyn Backend>, Option<Box<dyn HostRecords>>);

/// The GPU stack, and for simulated GPUs the records of who runs on them.
fn make_backend(
    config: &Config,
    state_dir: Option<&Path>,
) -> Result<BackendAndRecords, DaemonError> {
    match config.backend.kind {
        BackendKind::Simulator => {
            let sim = config
                .simulator
                .clone()
                .unwrap_or_else(crate::backend::sim::demo_fleet);
            // The simulated boards keep their settings next to the daemon's
            // state, so a restarted daemon finds what a crashed one left.
            let hardware = match state_dir {
                Some(dir) => HardwareStore::at(dir.join("simulated-gpus.json")),
                None => HardwareStore::volatile(),
            };
            let backend = SimBackend::with_hardware(&sim, hardware);
            let records: Box<dyn HostRecords> = Box::new(backend.host_records());
            Ok((Arc::new(backend), Some(records)))
        }
        BackendKind::Nvml => NvmlBackend::new(config.backend.nvml_library.as_deref())
            .map(|b| (Arc::new(b) as Arc<dyn Backend>, None))
            .map_err(|e| DaemonError::Backend(e.to_string())),
    }
}

/// Opens every GPU and learns its facts, each on its own thread; gives up
/// (nothing has been written to any GPU yet) when `shutdown` is cancelled.
pub(crate) async fn open_devices(
    backend: &dyn Backend,
    shutdown: &CancellationToken,
) -> Result<Vec<GpuSlot>, DaemonError> {
    let count = backend
        .device_count()
        .map_err(|e| DaemonError::Backend(format!("cannot count GPUs: {e}")))?;
    let mut slots = Vec::new();
    for index in 0..count {
        let device = match backend.open(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(gpu = index, error = %e, "cannot open GPU; it will not be watched");
                continue;
            }
        };
        let actor = DeviceActor::spawn(index, device).map_err(|e| {
            DaemonError::Startup(format!("cannot start a thread for GPU {index}: {e}"))
        })?;
        let facts = tokio::select! {
            facts = tokio::time::timeout(DESCRIBE_TIMEOUT, actor.describe()) => facts,
            _ = shutdown.cancelled() => return Err(DaemonError::Stopped),
        };
        slots.push(match facts {
            Ok(Ok(Ok(facts))) => GpuSlot::new(actor, facts),
            Ok(Ok(Err(e))) => {
                tracing::error!(gpu = index, error = %e, "GPU did not describe itself; watching it as lost");
                GpuSlot::lost(actor, index, e.to_string())
            }
            _ => {
                tracing::error!(gpu = index, "GPU did not answer at startup; watching it as lost");
                GpuSlot::lost(actor, index, "did not answer at startup".to_owned())
            }
        });
    }
    if count > 0 && slots.is_empty() {
        return Err(DaemonError::Backend(
            BackendError::Unavailable("no GPU could be opened".into()).to_string(),
        ));
    }
    Ok(slots)
}

/// The HTTP listener's credentials check and TLS configuration.
fn http_gate(
    config: &Config,
    tls: Option<&crate::tls::TlsMaterial>,
    addr: SocketAddr,
) -> Result<
    (
        Arc<crate::http::access::HttpAccess>,
        Option<Arc<rustls::ServerConfig>>,
    ),
    DaemonError,
> {
    let gate = Authenticator::for_http(&config.auth, addr)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let access = crate::http::access::HttpAccess::new(gate, config.auth.open_metrics);
    if access.reads_need_token() && !access.has_tokens() {
        tracing::warn!(
            "HTTP on {addr} (not loopback) without tokens: /api/v1/* and /metrics answer 401; configure [auth] tokens (and open_metrics for an open scrape), or allow_unauthenticated_reads on a trusted network"
        );
    }
    if !access.reads_need_token() && !addr.ip().is_loopback() {
        tracing::warn!(
            "HTTP on {addr} (not loopback) serves the dashboard data and the audit log without a token (auth.allow_unauthenticated_reads)"
        );
    }
    let http_tls = match (config.tls.http, tls) {
        (true, Some(material)) => Some(
            material
                .http_server_config()
                .map_err(|e| DaemonError::Config(format!("TLS for HTTP: {e}")))?,
        ),
        _ => None,
    };
    Ok((Arc::new(access), http_tls))
}

/// Starts the daemon. Returns once it is serving.
pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
    start_until(config, CancellationToken::new()).await
}

/// Starts the daemon, which stops when `shutdown` is cancelled. Cancelled
/// while it is still starting (a signal during startup), it does not serve:
/// it stops opening GPUs, or, once the startup repairs are under way,
/// finishes them (bounded), gives back what the governor holds, commits
/// what was recorded and returns [`DaemonError::Stopped`].
pub async fn start_until(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Daemon, DaemonError> {
    // Credentials and certificates first: a bad file stops the daemon before
    // it touches a GPU.
    let tls = crate::tls::load(&config.tls).map_err(DaemonError::Config)?;
    let mutual_tls = tls.as_ref().is_some_and(crate::tls::TlsMaterial::mutual);
    let auth = Arc::new(
        Authenticator::new(&config.auth, mutual_tls, config.server.listen)
            .map_err(|e| DaemonError::Config(e.to_string()))?,
    );
    let state_dir = resolve_state_dir(&config);
    // The state directory is this daemon's alone, and usable, before the
    // backend (or anything else) writes anything — to a GPU or to the disk.
    let state_lock = state_dir
        .as_deref()
        .map(crate::statedir::claim)
        .transpose()?;
    let (backend, sim_records) = make_backend(&config, state_dir.as_deref())?;
    let host_facts = backend.host_facts();

    // One writer for everything in the state directory, off the sampling loop.
    let writer = Persister::start(state_dir.as_deref())
        .map_err(|e| DaemonError::Startup(format!("cannot start the state writer: {e}")))?;
    let (events, log_report) = EventLog::with_writer(&writer, config.events.retain);
    let events = Arc::new(events);
    if let Some(e) = &log_report.io_error {
        return Err(StateDirError::Unusable(format!("the event log cannot be used: {e}")).into());
    }
    if log_report.damaged() {
        tracing::warn!("{}", log_report.describe());
        events.record(
            NewEvent::new(
                EventKind::StateDamaged,
                Actor::startup(),
                log_report.describe(),
            )
            .severity(Severity::Warning),
        );
    }
    let (store, state_report) = StateStore::with_writer(&writer);
    if let Some(e) = &state_report.unreadable {
        return Err(
            StateDirError::Unusable(format!("the desired state cannot be read: {e}")).into(),
        );
    }
    for problem in &state_report.problems {
        tracing::warn!("state: {problem}");
        events.record(
            NewEvent::new(
                EventKind::StateDamaged,
                Actor::startup(),
                format!("state file: {problem}"),
            )
            .severity(Severity::Warning),
        );
    }

    // History: the tiered store in the state directory (none without one).
    let history_store = match (&state_dir, config.history.enabled) {
        (Some(dir), true) => match crate::history::Store::open(dir, &config.history) {
            Ok((store, report)) => {
                if let Some(damaged) = &report.damaged {
                    tracing::warn!("{damaged}");
                    events.record(
                        NewEvent::new(EventKind::StateDamaged, Actor::startup(), damaged.clone())
                            .severity(Severity::Warning),
                    );
                }
                for note in &report.notes {
                    tracing::info!("{note}");
                }
                Some(store)
            }
            Err(e) => {
                let why = format!("history is off for this run: {e}");
                tracing::error!("{why}");
                events.record(
                    NewEvent::new(EventKind::StateDamaged, Actor::startup(), why)
                        .severity(Severity::Warning),
                );
                None
            }
        },
        _ => None,
    };

    let slots = match open_devices(backend.as_ref(), &shutdown).await {
        Err(DaemonError::Stopped) => {
            tracing::info!("stop requested while opening GPUs; nothing was written to any GPU");
            let _ = writer.flush().await;
            return Err(DaemonError::Stopped);
        }
        other => other?,
    };
    let hub = Arc::new(Hub::new(
        config.sampler.interval,
        config.sampler.slow_interval,
        config.sampler.history,
    ));
    let history_writer = match &history_store {
        Some(store) => {
            if let Err(e) = store.record_first_seq(hub.first_seq()) {
                tracing::warn!(error = %e, "history: cannot record this run's first seq");
            }
            let writer = crate::history::HistoryWriter::start(store.clone(), &config.history)
                .map_err(|e| {
                    DaemonError::Startup(format!("cannot start the history writer: {e}"))
                })?;
            hub.set_history_sink(writer.sink());
            Some(Arc::new(writer))
        }
        None => None,
    };
    let history = crate::service::HistoryParts {
        store: history_store,
        limits: crate::history::Limits {
            max_points: config.history.max_points_per_request,
            max_bytes: config.history.max_bytes_per_request,
        },
    };
    let tracker = attribution_tracker(&config, sim_records, &events)?;
    // Leases granted before a restart are still held (those that expired
    // while the daemon was down are dropped, with an event each).
    let (leases, lease_report) =
        crate::leases::Leases::open(&writer, events.clone(), hub.clone(), config.leases.clone());
    for problem in &lease_report.problems {
        tracing::warn!("leases: {problem}");
        events.record(
            NewEvent::new(
                EventKind::StateDamaged,
                Actor::startup(),
                format!("lease file: {problem}"),
            )
            .severity(Severity::Warning),
        );
    }
    if lease_report.loaded > 0 || lease_report.expired > 0 {
        tracing::info!(
            live = lease_report.loaded,
            expired = lease_report.expired,
            "leases restored from the state directory"
        );
    }
    let sampler = Sampler::new(slots, hub.clone(), events.clone(), config.sampler.clone())
        .with_attribution(tracker.clone());
    sampler.publish_devices();
    let mut controller = Controller::new(
        sampler,
        hub.clone(),
        events.clone(),
        store,
        config.controller.clone(),
    );
    // Before serving: a first frame for the first subscriber, and the
    // startup repairs done and recorded.
    controller.start().await;
    let (control, requests) = ControlHandle::channel();
    if shutdown.is_cancelled() {
        // Asked to stop while the repairs ran: they are finished (or timed
        // out); stop the control plane as on any stop, which records it and
        // gives back whatever the governor holds, then commit and exit.
        tracing::info!("stop requested during startup; stopping before serving");
        controller.run(requests, shutdown.clone()).await;
        if let Err(e) = writer.flush().await {
            tracing::error!(error = %e, "could not commit the last events and state");
        }
        return Err(DaemonError::Stopped);
    }

    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: config.server.listen,
        source,
    })?;

    let http = match config.server.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| DaemonError::Bind { addr, source })?;
            Some((listener, bound))
        }
        None => None,
    };

    // One count of open streams for every service: GpuWatch streams take
    // their place in the service, health and reflection streams in the
    // authorization layer.
    let streams = StreamLimiter::new(
        config.limits.max_streams,
        config.limits.max_streams_per_connection,
    );
    let service = GpuWatchService::new(
        ServiceParts {
            hub: hub.clone(),
            events: events.clone(),
            control,
            streams: streams.clone(),
            shutdown: shutdown.clone(),
            attribution: Some(tracker),
            leases: leases.clone(),
            history: history.clone(),
        },
        &host_facts,
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GpuWatchServer<GpuWatchService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| DaemonError::Startup(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| DaemonError::Startup(format!("reflection: {e}")))?;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Per-connection streams beyond the limit get RESOURCE_EXHAUSTED
        // from the service; the HTTP/2 setting is a backstop above it.
        .max_concurrent_streams(Some(
            u32::try_from(config.limits.max_streams_per_connection + 64).unwrap_or(u32::MAX),
        ));
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.server_config())
            .map_err(|e| DaemonError::Config(format!("TLS: {e}")))?;
    }
    // Every service, and Watch's shared-encoding route beside the generated
    // server's other methods, behind the one authorization table: a method
    // it does not list is refused before any of them sees it.
    let services = watch_wire::add_gpuwatch(
        Routes::new(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha),
        service,
        SharedFrames::new(),
        config.limits.max_request_bytes,
    );
    let refusals = Arc::new(RefusalGate::new());
    tokio::spawn(crate::authz::sweep_refusals(
        refusals.clone(),
        events.clone(),
        shutdown.clone(),
    ));
    let authorized = Authorize::new(services, auth.clone(), events.clone(), streams, refusals);
    let router = builder.add_routes(Routes::from(
        axum::Router::new().fallback_service(authorized),
    ));

    events.record(NewEvent::new(
        EventKind::DaemonStarted,
        Actor::startup(),
        format!(
            "gpuwatch {} started: {} backend, {} GPU(s)",
            env!("CARGO_PKG_VERSION"),
            host_facts.backend,
            hub.devices().len()
        ),
    ));
    // Serve (and say so) only once the startup repairs and this event are
    // committed, so the first WatchEvents replay or scrape already holds them.
    if let Err(e) = writer.flush().await {
        tracing::error!(error = %e, "startup events could not be committed");
    }

    if !auth.reads_open() && auth.token_count() == 0 && !mutual_tls {
        tracing::warn!(
            "listening on {grpc_addr} (not loopback) without tokens or mutual TLS: every read and control request will be refused; configure [auth] tokens"
        );
    }
    if !auth.control_possible() {
        tracing::info!("control RPCs are disabled: no token with role \"control\" is configured");
    }
    tracing::info!(
        backend = host_facts.backend,
        tls = tls.is_some(),
        mutual_tls,
        tokens = auth.token_count(),
        gpus = hub.devices().len(),
        state_dir = %state_dir.as_deref().map_or("(memory only)".into(), |d| d.display().to_string()),
        "gRPC listening on {grpc_addr}"
    );
    let http_addr = http.as_ref().map(|(_, addr)| *addr);
    // Both listeners' connection caps fit in the open-files limit, so a
    // flood on one cannot take the file descriptors the other needs.
    let nofile = crate::grpc_listen::open_files_limit();
    let (http_cap, grpc_cap) = crate::grpc_listen::fit_caps(
        config.limits.http_max_connections,
        config.limits.grpc_max_connections,
        nofile,
    );
    if (http_cap, grpc_cap)
        != (
            config.limits.http_max_connections,
            config.limits.grpc_max_connections,
        )
    {
        tracing::warn!(
            open_files = nofile.unwrap_or(0),
            http_max_connections = http_cap,
            grpc_max_connections = grpc_cap,
            "the connection caps were lowered to fit the open-files limit (raise it: LimitNOFILE= in the unit, ulimit -n)"
        );
    }
    let http_parts = match http_addr {
        Some(addr) => http_gate(&config, tls.as_ref(), addr)?,
        None => (Arc::new(crate::http::access::HttpAccess::open()), None),
    };
    let http_task = http.map(|(listener, addr)| {
        tracing::info!("HTTP (metrics, dashboard, healthz) listening on {addr}");
        let (access, http_tls) = http_parts;
        let state = crate::http::HttpState {
            hub: hub.clone(),
            events: events.clone(),
            hostname: crate::service::hostname(),
            access,
            write_timeout: config.limits.http_write_timeout,
            leases: Some(leases.clone()),
            history: history.clone(),
            metrics_profile: config.metrics.profile,
            driver_version: host_facts.driver_version.clone(),
        };
        let limits = crate::http::conn::ConnLimits {
            max_connections: http_cap,
            header_timeout: config.limits.http_header_timeout,
            max_header_bytes: config.limits.http_max_header_bytes,
            write_timeout: config.limits.http_write_timeout,
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, state, limits, http_tls, stop).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    });

    // Expired leases end (with an event) within a second of their TTL.
    {
        let leases = leases.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => leases.sweep().await,
                }
            }
        });
    }
    let control_task = tokio::spawn(controller.run(requests, shutdown.clone()));
    let grace = config.server.shutdown_grace;
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        // The builder's TCP options are ignored for an incoming stream, so
        // they are set here. Without TCP_NODELAY, Nagle holds a small
        // response back until the client's delayed ACK (~40 ms on Linux):
        // measured by gpuwatch-bench, GetSnapshot polling ran at 44 ms a
        // request and fan-out p99 at 62 ms (see BENCHMARKS.md).
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let incoming =
            crate::grpc_listen::capped(incoming, grpc_cap, crate::grpc_listen::FIRST_BYTE_TIMEOUT);
        let serve = router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        tokio::pin!(serve);
        let served = tokio::select! {
            r = &mut serve => r.map_err(|e| DaemonError::Serve(e.to_string())),
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("connections did not close within {grace:?}; stopping anyway");
                Ok(())
            }
        };
        health_reporter
            .set_not_serving::<GpuWatchServer<GpuWatchService>>()
            .await;
        // Whatever ended serving, the control plane must restore the GPUs.
        stop.cancel();
        if control_task.await.is_err() {
            tracing::error!("control plane task failed during shutdown");
        }
        // No more frames: the history writer commits what it holds.
        if let Some(writer) = history_writer {
            let _ = tokio::task::spawn_blocking(move || writer.stop(Duration::from_secs(10))).await;
        }
        // A clean stop loses nothing: every event and state change queued
        // (the restores above included) is on disk before the daemon exits.
        if let Err(e) = writer.flush().await {
            tracing::error!(error = %e, "could not commit the last events and state");
        }
        if let Some(http) = http_task {
            let _ = tokio::time::timeout(grace, http).await;
        }
        // Another daemon may have the directory once everything is on disk.
        drop(state_lock);
        served
    });

    Ok(Daemon {
        grpc_addr,
        http_addr,
        state_dir,
        shutdown,
        task,
        hub,
        events,
    })
}
