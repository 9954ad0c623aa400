//! Who may act, and over what transport: tokens of each role against every
//! RPC, the safe default without tokens, reads on a non-loopback listener,
//! TLS and mutual TLS (wrong CA, no certificate, expired certificate,
//! plaintext against TLS), certificate files that are missing or mismatched,
//! and the bounds on streams and request sizes.

use std::{net::SocketAddr, process::Command, time::Duration};

use crate::support::{CONTROL_TOKEN, Client, Options, READ_TOKEN, events_since, index};
use gpuwatch_api::{
    self as api, ActorKind, EventKind, gpu_watch_client::GpuWatchClient,
    set_power_limit_request::Target,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

async fn every_rpc(c: &mut Client) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
        r.map(|_| ())
    }
    vec![
        (
            "ListDevices",
            ok(c.list_devices(api::ListDevicesRequest::default()).await),
        ),
        (
            "GetSnapshot",
            ok(c.get_snapshot(api::GetSnapshotRequest::default()).await),
        ),
        ("Watch", ok(c.watch(api::WatchRequest::default()).await)),
        (
            "WatchEvents",
            ok(c.watch_events(api::WatchEventsRequest::default()).await),
        ),
        (
            "GetPolicy",
            ok(c.get_policy(api::GetPolicyRequest::default()).await),
        ),
        (
            "SetPowerLimit",
            ok(c.set_power_limit(api::SetPowerLimitRequest {
                gpus: vec![index(0)],
                target: Some(Target::Watts(500.0)),
            })
            .await),
        ),
        (
            "ResetClocks",
            ok(c.reset_clocks(api::ResetClocksRequest {
                gpus: vec![index(0)],
            })
            .await),
        ),
        (
            "SetThreshold",
            ok(c.set_threshold(api::SetThresholdRequest {
                gpus: vec![index(0)],
                target: Some(api::set_threshold_request::Target::Celsius(75)),
                hysteresis_c: None,
            })
            .await),
        ),
    ]
}

fn is_control(rpc: &str) -> bool {
    matches!(rpc, "SetPowerLimit" | "ResetClocks" | "SetThreshold")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_against_every_rpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::default());

    for (rpc, result) in every_rpc(&mut d.client_with(Some(CONTROL_TOKEN)).await).await {
        assert!(result.is_ok(), "control token, {rpc}: {result:?}");
    }
    for (rpc, result) in every_rpc(&mut d.client_with(Some(READ_TOKEN)).await).await {
        if is_control(rpc) {
            let e = result.expect_err(rpc);
            assert_eq!(e.code(), Code::PermissionDenied, "read token, {rpc}");
            assert!(
                e.message().contains("reader") && e.message().contains("control"),
                "{}",
                e.message()
            );
        } else {
            assert!(result.is_ok(), "read token, {rpc}: {result:?}");
        }
    }
    for (rpc, result) in
        every_rpc(&mut d.client_with(Some("not-a-token-anyone-configured")).await).await
    {
        assert_eq!(
            result.expect_err(rpc).code(),
            Code::Unauthenticated,
            "unknown token, {rpc}"
        );
    }
    // No token on a loopback listener: reads open, control refused.
    for (rpc, result) in every_rpc(&mut d.client_with(None).await).await {
        if is_control(rpc) {
            assert_eq!(
                result.expect_err(rpc).code(),
                Code::Unauthenticated,
                "no token, {rpc}"
            );
        } else {
            assert!(result.is_ok(), "no token, {rpc}: {result:?}");
        }
    }

    // Every refused control call is in the audit log, with who tried.
    let events = events_since(&mut d.client().await, 0).await;
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::ControlRefused)
        .collect();
    assert_eq!(
        refused.len(),
        9,
        "3 control RPCs x 3 refused callers: {refused:?}"
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
