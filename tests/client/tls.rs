//! The client's half of authentication, before the daemon has its own:
//! TLS with a private CA, mutual TLS, the server name override, and the
//! bearer token on every request. A small stand-in daemon (the generated
//! `GpuWatch` server with one fake GPU) runs in-process behind rustls and
//! records the `authorization` header of each call.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    thread,
};

use crate::support::{run_client, run_client_env, temp_file};
use gpuwatch_api::{
    DeviceInfo, GetPolicyRequest, GetPolicyResponse, GetSnapshotRequest, GetSnapshotResponse,
    HostInfo, ListDevicesRequest, ListDevicesResponse, ResetClocksRequest, ResetClocksResponse,
    SetPowerLimitRequest, SetPowerLimitResponse, SetThresholdRequest, SetThresholdResponse,
    WatchEventsRequest, WatchEventsResponse, WatchRequest, WatchResponse,
    gpu_watch_server::{GpuWatch, GpuWatchServer},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Answers ListDevices with one GPU; everything else is UNIMPLEMENTED.
struct OneGpu;

#[tonic::async_trait]
impl GpuWatch for OneGpu {
    async fn list_devices(
        &self,
        _: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        Ok(Response::new(ListDevicesResponse {
            host: Some(HostInfo {
                hostname: "stand-in".into(),
                backend: "test".into(),
                ..Default::default()
            }),
            devices: vec![DeviceInfo {
                index: 0,
                uuid: "GPU-00000000-0000-0000-0000-00000000tls0".into(),
                name: "Stand-in GPU".into(),
                ..Default::default()
            }],
            throttle_reasons: Vec::new(),
        }))
    }
    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type WatchStream = Stream<WatchResponse>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type WatchEventsStream = Stream<WatchEventsResponse>;
    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_policy(
        &self,
        _: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn set_power_limit(
        &self,
        _: Request<SetPowerLimitRequest>,
    ) -> Result<Response<SetPowerLimitResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn reset_clocks(
        &self,
        _: Request<ResetClocksRequest>,
    ) -> Result<Response<ResetClocksResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn set_threshold(
        &self,
        _: Request<SetThresholdRequest>,
    ) -> Result<Response<SetThresholdResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn set_power_budget(
        &self,
        _: Request<gpuwatch_api::SetPowerBudgetRequest>,
    ) -> Result<Response<gpuwatch_api::SetPowerBudgetResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn pick_gpus(
        &self,
        _: Request<gpuwatch_api::PickGpusRequest>,
    ) -> Result<Response<gpuwatch_api::PickGpusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn lease_gpus(
        &self,
        _: Request<gpuwatch_api::LeaseGpusRequest>,
    ) -> Result<Response<gpuwatch_api::PickGpusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn renew_lease(
        &self,
        _: Request<gpuwatch_api::RenewLeaseRequest>,
    ) -> Result<Response<gpuwatch_api::RenewLeaseResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn release_lease(
        &self,
        _: Request<gpuwatch_api::ReleaseLeaseRequest>,
    ) -> Result<Response<gpuwatch_api::ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn list_leases(
        &self,
        _: Request<gpuwatch_api::ListLeasesRequest>,
    ) -> Result<Response<gpuwatch_api::ListLeasesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_history(
        &self,
        _: Request<gpuwatch_api::GetHistoryRequest>,
    ) -> Result<Response<gpuwatch_api::GetHistoryResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A CA, a server certificate for "localhost" only, and a client certificate.
struct Pki {
    dir: tempfile::TempDir,
    server_cert: String,
    server_key: String,
    ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = CertificateParams::new(vec!["operator".to_owned()])
            .expect("client params")
            .signed_by(&client_key, &issuer)
            .expect("client certificate");

        let dir = tempfile::tempdir().expect("dir");
        temp_file(dir.path(), "ca.pem", &ca_cert.pem());
        temp_file(dir.path(), "client.pem", &client_cert.pem());
        temp_file(dir.path(), "client.key", &client_key.serialize_pem());
        temp_file(dir.path(), "token", "s3cret-from-file\n");
        temp_file(dir.path(), "not-a-cert.pem", "hello\n");
        Pki {
            dir,
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

/// Serves [`OneGpu`] over TLS on a free port (requiring a client
/// certificate when `mutual`); returns the address and the recorded
/// `authorization` headers ("" when absent).
fn serve(pki: &Pki, mutual: bool) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(&pki.server_cert, &pki.server_key));
    if mutual {
        tls = tls.client_ca_root(Certificate::from_pem(&pki.ca_pem));
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let service = GpuWatchServer::with_interceptor(OneGpu, move |req: Request<()>| {
                let header = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                record.lock().expect("lock").push(header);
                Ok(req)
            });
            Server::builder()
                .tls_config(tls)
                .expect("server TLS")
                // One service, no router: the CLI only calls GpuWatch.
                .serve_with_incoming(
                    service,
                    tonic::transport::server::TcpIncoming::from(listener),
                )
                .await
                .expect("serve");
        });
    });
    (addr, seen)
}

#[test]
fn tls_with_private_ca_server_name_and_token() {
    let pki = Pki::new();
    let (addr, seen) = serve(&pki, false);
    let ca = pki.path("ca.pem");
    let https = format!("https://127.0.0.1:{}", addr.port());

    // The certificate names "localhost"; connecting by IP needs the override.
    let ok = run_client(&[
        "list",
        "--json",
        &https,
        "--tls-ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "--token",
        "s3cret",
    ]);
    assert_eq!(
        ok.code,
        Some(0),
        "stdout {} stderr {}",
        ok.stdout,
        ok.stderr
    );
    let lines = ok.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["name"], "Stand-in GPU");
    assert_eq!(lines[0]["hostname"], "stand-in");
    assert_eq!(
        seen.lock().expect("lock").last().map(String::as_str),
        Some("Bearer s3cret")
    );

    // A plain host form with --tls-ca uses TLS too; the token comes from the
    // environment, then from a file (which wins).
    let plain_form = format!("localhost:{}", addr.port());
    let env = run_client_env(
        &["list", &plain_form, "--tls-ca", &ca],
        &[("GPUWATCH_TOKEN", "from-env")],
    );
    assert_eq!(
        env.code,
        Some(0),
        "stdout {} stderr {}",
        env.stdout,
        env.stderr
    );
    assert_eq!(
        seen.lock().expect("lock").last().map(String::as_str),
        Some("Bearer from-env")
    );
    let file = run_client_env(
        &[
            "list",
            &plain_form,
            "--tls-ca",
            &ca,
            "--token-file",
            &pki.path("token"),
        ],
        &[("GPUWATCH_TOKEN", "from-env")],
    );
    assert_eq!(file.code, Some(0), "{}", file.stderr);
    assert_eq!(
        seen.lock().expect("lock").last().map(String::as_str),
        Some("Bearer s3cret-from-file")
    );

    // Without the server-name override the name check fails: a host error.
    let wrong_name = run_client(&["list", &https, "--tls-ca", &ca]);
    assert_eq!(wrong_name.code, Some(1), "{}", wrong_name.stdout);
    assert!(wrong_name.stdout.contains("error"), "{}", wrong_name.stdout);
    // Plain HTTP/2 to a TLS daemon: a host error, not a hang.
    let plain = run_client(&[
        "list",
        "--timeout",
        "3s",
        &format!("http://127.0.0.1:{}", addr.port()),
    ]);
    assert_eq!(plain.code, Some(1), "{}", plain.stdout);
    // No token: the request carries no authorization header.
    let before = seen.lock().expect("lock").len();
    let anonymous = run_client_env(
        &["list", &plain_form, "--tls-ca", &ca],
        &[("GPUWATCH_TOKEN", "")],
    );
    assert_eq!(anonymous.code, Some(0));
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), before + 1);
    assert_eq!(seen.last().map(String::as_str), Some(""));
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let (addr, _) = serve(&pki, true);
    let host = format!("localhost:{}", addr.port());
    let ca = pki.path("ca.pem");
    let with_cert = run_client(&[
        "list",
        &host,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &pki.path("client.pem"),
        "--tls-key",
        &pki.path("client.key"),
    ]);
    assert_eq!(
        with_cert.code,
        Some(0),
        "stdout {} stderr {}",
        with_cert.stdout,
        with_cert.stderr
    );
    assert!(
        with_cert.stdout.contains("Stand-in GPU"),
        "{}",
        with_cert.stdout
    );
    let without = run_client(&["list", &host, "--tls-ca", &ca, "--timeout", "3s"]);
    assert_eq!(without.code, Some(1), "{}", without.stdout);
}

#[test]
fn bad_tls_files_are_usage_errors_naming_the_file() {
    let pki = Pki::new();
    let not_a_cert = pki.path("not-a-cert.pem");
    let run = run_client(&["list", "localhost", "--tls-ca", &not_a_cert]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("not-a-cert.pem"), "{}", run.stderr);
    let run = run_client(&["list", "localhost", "--tls-cert", &pki.path("client.pem")]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("--tls-key"), "{}", run.stderr);
    let run = run_client(&[
        "list",
        "localhost",
        "--token-file",
        &pki.path("missing-token"),
    ]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("missing-token"), "{}", run.stderr);
}
