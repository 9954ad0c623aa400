//! Who may act, and over what transport: tokens of each role against every
//! RPC, the safe default without tokens, reads on a non-loopback listener,
//! TLS and mutual TLS (wrong CA, no certificate, expired certificate,
//! plaintext against TLS), certificate files that are missing or mismatched,
//! and the bounds on streams and request sizes.

use std::{net::SocketAddr, process::Command, time::Duration};

use crate::support::{CONTROL_TOKEN, Daemon, Options, READ_TOKEN, events_since, index};
use bytes::{Buf, BufMut, Bytes};
use gpuwatch_api::{
    self as api, ActorKind, EventKind, gpu_watch_client::GpuWatchClient,
    set_power_limit_request::Target,
};
use gpuwatch_server::{auth::Role, authz};
use prost::Message;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// One method of the contract, as its compiled descriptor describes it.
struct Method {
    /// `/gpuwatch.v1.Service/Method`
    path: String,
    /// `Method`
    name: String,
    server_streaming: bool,
}

/// Every method of every service in package `gpuwatch.v1`, read from the
/// descriptor set compiled into the library (not from a list kept here, so
/// a new RPC is tested the day it is added).
fn contract_methods() -> Vec<Method> {
    let set = prost_types::FileDescriptorSet::decode(api::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set decodes");
    let mut methods = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "gpuwatch.v1") {
        for service in &file.service {
            for method in &service.method {
                assert!(
                    !method.client_streaming(),
                    "{}: this test sends one request message",
                    method.name()
                );
                methods.push(Method {
                    path: format!("/gpuwatch.v1.{}/{}", service.name(), method.name()),
                    name: method.name().to_owned(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    assert!(methods.len() >= 8, "the contract's methods");
    methods
}

/// A request `method` carries out for a caller allowed to make it; the
/// empty (all-default) request for the methods that need nothing more.
fn sample_request(method: &str) -> Vec<u8> {
    match method {
        "SetPowerLimit" => api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(Target::Watts(500.0)),
        }
        .encode_to_vec(),
        "ResetClocks" => api::ResetClocksRequest {
            gpus: vec![index(0)],
        }
        .encode_to_vec(),
        "SetThreshold" => api::SetThresholdRequest {
            gpus: vec![index(0)],
            target: Some(api::set_threshold_request::Target::Celsius(75)),
            hysteresis_c: None,
        }
        .encode_to_vec(),
        // Dropping the budget is valid on any host.
        "SetPowerBudget" => api::SetPowerBudgetRequest {
            target: Some(api::set_power_budget_request::Target::RestoreDefault(true)),
        }
        .encode_to_vec(),
        _ => Vec::new(),
    }
}

/// Sends and receives messages as the bytes they are, so any method can be
/// called by path.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

/// Calls the method at `path` with `body` and `token`: Ok once the daemon
/// accepted the call (a unary answer, or a stream's headers).
async fn call_by_path(
    channel: &Channel,
    path: &str,
    server_streaming: bool,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let mut request = tonic::Request::new(Bytes::from(body));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    let path = PathAndQuery::try_from(path.to_owned()).expect("a method path");
    if server_streaming {
        grpc.server_streaming(request, path, RawCodec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(request, path, RawCodec).await.map(|_| ())
    }
}

/// Calls `method` with its sample request.
async fn call(channel: &Channel, method: &Method, token: Option<&str>) -> Result<(), Status> {
    call_by_path(
        channel,
        &method.path,
        method.server_streaming,
        sample_request(&method.name),
        token,
    )
    .await
}

async fn channel(d: &Daemon) -> Channel {
    Channel::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_against_every_rpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::default());
    let channel = channel(&d).await;
    let methods = contract_methods();
    let needs = |m: &Method| match authz::need(&m.path) {
        Some(authz::Need::Role(role)) => role,
        other => panic!("{}: the authorization table says {other:?}", m.path),
    };

    for m in &methods {
        let result = call(&channel, m, Some(CONTROL_TOKEN)).await;
        assert!(result.is_ok(), "control token, {}: {result:?}", m.name);
    }
    for m in &methods {
        let result = call(&channel, m, Some(READ_TOKEN)).await;
        if needs(m) >= Role::Lease {
            let e = result.expect_err(&m.name);
            assert_eq!(e.code(), Code::PermissionDenied, "read token, {}", m.name);
            let role = if needs(m) == Role::Control {
                "role control"
            } else {
                "role lease"
            };
            assert!(
                e.message().contains("reader") && e.message().contains(role),
                "{}",
                e.message()
            );
        } else {
            assert!(result.is_ok(), "read token, {}: {result:?}", m.name);
        }
    }
    // A scheduler's lease token: reads and leases, never control.
    for m in &methods {
        let result = call(&channel, m, Some(crate::support::LEASE_TOKEN)).await;
        if needs(m) == Role::Control {
            let e = result.expect_err(&m.name);
            assert_eq!(e.code(), Code::PermissionDenied, "lease token, {}", m.name);
            assert!(e.message().contains("scheduler"), "{}", e.message());
        } else {
            assert!(result.is_ok(), "lease token, {}: {result:?}", m.name);
        }
    }
    for m in &methods {
        let result = call(&channel, m, Some("not-a-token-anyone-configured")).await;
        assert_eq!(
            result.expect_err(&m.name).code(),
            Code::Unauthenticated,
            "unknown token, {}",
            m.name
        );
    }
    // No token on a loopback listener: reads open, control refused.
    for m in &methods {
        let result = call(&channel, m, None).await;
        if needs(m) >= Role::Lease {
            assert_eq!(
                result.expect_err(&m.name).code(),
                Code::Unauthenticated,
                "no token, {}",
                m.name
            );
        } else {
            assert!(result.is_ok(), "no token, {}: {result:?}", m.name);
        }
    }
    // A method the table does not list is refused, whoever asks.
    for token in [Some(CONTROL_TOKEN), None] {
        let e = call_by_path(
            &channel,
            "/gpuwatch.v1.GpuWatch/DropEverything",
            false,
            Vec::new(),
            token,
        )
        .await
        .expect_err("not in the table");
        assert_eq!(e.code(), Code::Unimplemented);
        assert!(e.message().contains("not served"), "{}", e.message());
    }

    // Every refused control (and lease) call is in the audit log, with who
    // tried: the read token, the unknown token and no token for each, and
    // the lease token for the control RPCs.
    let gated = methods.iter().filter(|m| needs(m) >= Role::Lease).count();
    let control = methods.iter().filter(|m| needs(m) == Role::Control).count();
    assert!(control >= 3, "SetPowerLimit, ResetClocks, SetThreshold");
    assert!(gated >= control + 3, "LeaseGpus, RenewLease, ReleaseLease");
    let events = events_since(&mut d.client().await, 0).await;
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::ControlRefused)
        .collect();
    assert_eq!(
        refused.len(),
        // Beyond the bound per window, refusals are counted for a summary.
        (3 * gated + control).min(authz::MAX_REFUSALS_PER_WINDOW),
        "{gated} lease and control RPCs x 3 refused callers, and the lease token for {control}: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e.actor.as_ref().is_some_and(|a| a.name == "reader"))
    );
    assert!(
        refused
            .iter()
            .any(|e| e.actor.as_ref().is_some_and(|a| a.name == "unknown token"))
    );
    // Accepted control calls name the token as the actor.
    assert!(events.iter().any(|e| {
        e.kind() == EventKind::ThresholdChanged
            && e.actor
                .as_ref()
                .is_some_and(|a| a.kind() == ActorKind::Operator && a.name == "tester")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_control_is_refused_and_says_how_to_enable_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(
        dir.path(),
        Options {
            no_tokens: true,
            ..Options::default()
        },
    );
    let mut c = d.client_with(None).await;
    c.get_snapshot(api::GetSnapshotRequest::default())
        .await
        .expect("reads open on loopback");
    let e = c
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(Target::Watts(500.0)),
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("no control token") && e.message().contains("auth.tokens"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_a_non_loopback_listener_need_a_token_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wildcard = |extra: &str| Options {
        no_tokens: true,
        listen_ip: Some("0.0.0.0".into()),
        config: Some(extra.into()),
        ..Options::default()
    };
    let d = crate::support::start(&dir.path().join("a"), wildcard(""));
    let url = format!("http://127.0.0.1:{}", d.grpc.port());
    let mut c = crate::support::connect_with(&url, None).await;
    let e = c
        .get_snapshot(api::GetSnapshotRequest::default())
        .await
        .expect_err("closed");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("not loopback"), "{}", e.message());
    // Health and reflection need no credentials, even here: probes and
    // schema, not data.
    let channel = Channel::from_shared(url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection is open")
        .into_inner();
    assert!(
        reflection.message().await.expect("answer").is_some(),
        "reflection answers"
    );
    drop(d);

    let d = crate::support::start(
        &dir.path().join("b"),
        wildcard("[auth]\nallow_unauthenticated_reads = true\n"),
    );
    let url = format!("http://127.0.0.1:{}", d.grpc.port());
    let mut c = crate::support::connect_with(&url, None).await;
    c.get_snapshot(api::GetSnapshotRequest::default())
        .await
        .expect("open by choice");
}

/// A CA, a server certificate for localhost signed by it, and client
/// certificates (valid, expired) signed by it.
struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    expired_cert: String,
    expired_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gpuwatch test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = |names: Vec<String>, cn: &str, expired: bool| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        false,
    );
    let (client_cert, client_key) = leaf(vec![], "alice", false);
    let (expired_cert, expired_key) = leaf(vec![], "mallory", true);
    Pki {
        ca_pem: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        expired_cert,
        expired_key,
    }
}

fn tls_config(dir: &std::path::Path, pki: &Pki, mutual: bool) -> String {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let cert = write("server.pem", &pki.server_cert);
    let key = write("server.key", &pki.server_key);
    let mut toml = format!("[tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n");
    if mutual {
        let ca = write("ca.pem", &pki.ca_pem);
        toml.push_str(&format!(
            "client_ca_file = \"{ca}\"\n[auth]\nmtls_role = \"control\"\n"
        ));
    }
    toml
}

async fn tls_client(
    addr: SocketAddr,
    ca: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<GpuWatchClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(GpuWatchClient::new(channel))
}

async fn snapshot_works(client: Result<GpuWatchClient<Channel>, String>) -> bool {
    match client {
        Ok(mut c) => c
            .get_snapshot(api::GetSnapshotRequest::default())
            .await
            .is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_trusting_clients_only_and_refuses_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let config = tls_config(dir.path(), &pki, false);
    let d = crate::support::start(&dir.path().join("state"), Options::with_config(config));
    assert!(
        snapshot_works(tls_client(d.grpc, Some(&pki.ca_pem), None).await).await,
        "TLS with the right CA"
    );
    let other = pki_other_ca();
    assert!(
        !snapshot_works(tls_client(d.grpc, Some(&other), None).await).await,
        "wrong CA must fail"
    );
    // Plaintext against a TLS-only listener fails.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", d.grpc.port()))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => GpuWatchClient::new(ch)
            .get_snapshot(api::GetSnapshotRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "plaintext must not be served");
}

fn pki_other_ca() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("ca").pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_valid_client_certificate_whose_subject_is_the_actor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let config = tls_config(dir.path(), &pki, true);
    let d = crate::support::start(&dir.path().join("state"), Options::with_config(config));
    assert!(
        !snapshot_works(tls_client(d.grpc, Some(&pki.ca_pem), None).await).await,
        "no certificate"
    );
    assert!(
        !snapshot_works(
            tls_client(
                d.grpc,
                Some(&pki.ca_pem),
                Some((&pki.expired_cert, &pki.expired_key))
            )
            .await
        )
        .await,
        "expired certificate"
    );
    let mut c = tls_client(
        d.grpc,
        Some(&pki.ca_pem),
        Some((&pki.client_cert, &pki.client_key)),
    )
    .await
    .expect("valid certificate");
    c.set_threshold(api::SetThresholdRequest {
        gpus: vec![index(0)],
        target: Some(api::set_threshold_request::Target::Celsius(75)),
        hysteresis_c: None,
    })
    .await
    .expect("mtls_role = control");
    let mut events = c
        .watch_events(api::WatchEventsRequest {
            since_seq: Some(0),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner();
    let mut actor = None;
    while let Ok(Ok(Some(msg))) =
        tokio::time::timeout(Duration::from_secs(5), events.message()).await
    {
        match msg.message {
            Some(api::watch_events_response::Message::Event(e))
                if e.kind() == EventKind::ThresholdChanged =>
            {
                actor = e.actor.map(|a| a.name);
                break;
            }
            Some(api::watch_events_response::Message::CaughtUp(_)) => break,
            _ => {}
        }
    }
    assert_eq!(actor.as_deref(), Some("cert:alice"));
}

#[test]
fn missing_or_mismatched_certificate_files_stop_startup_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).expect("cert");
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, &pki.server_cert).expect("write");
    let wrong_key = dir.path().join("wrong.key");
    std::fs::write(&wrong_key, other.signing_key.serialize_pem()).expect("write");
    let run = |cert: &std::path::Path, key: &std::path::Path| {
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            ),
        )
        .expect("write");
        Command::new(env!("CARGO_BIN_EXE_gpuwatch-server"))
            .args([
                "--simulate",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "off",
                "--state-dir",
            ])
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run")
    };
    let out = run(&cert, &wrong_key);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrong.key") && stderr.contains("server.pem"),
        "{stderr}"
    );
    let out = run(&dir.path().join("missing.pem"), &wrong_key);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_answer_resource_exhausted_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        "[limits]\nmax_streams = 3\nmax_streams_per_connection = 2\nmax_request_bytes = 2048\n";
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut a = d.client().await;
    let _s1 = a.watch(api::WatchRequest::default()).await.expect("1");
    let _s2 = a
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("2");
    let e = a
        .watch(api::WatchRequest::default())
        .await
        .expect_err("per connection");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_streams_per_connection"),
        "{}",
        e.message()
    );
    let mut b = d.client().await;
    let _s3 = b
        .watch(api::WatchRequest::default())
        .await
        .expect("3 on another connection");
    let e = b
        .watch(api::WatchRequest::default())
        .await
        .expect_err("server-wide");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("limits.max_streams"),
        "{}",
        e.message()
    );
    drop(_s1);
    // The place is freed once the stream is gone.
    crate::support::eventually(Duration::from_secs(5), "a freed stream slot", || {
        let mut b = b.clone();
        async move { b.watch(api::WatchRequest::default()).await.ok().map(|_| ()) }
    })
    .await;

    // A request far beyond the size limit is refused, not parsed.
    let huge = api::GetSnapshotRequest {
        gpus: vec![api::GpuSelector {
            selector: Some(api::gpu_selector::Selector::Uuid("x".repeat(10_000))),
        }],
    };
    let e = a.get_snapshot(huge).await.expect_err("too big");
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{e:?}"
    );
}
