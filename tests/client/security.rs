//! The fleet CLI against a real daemon with TLS and tokens: the certificate
//! is verified, tokens of each role reach the daemon's permission check, and
//! refusals come back as per-host failures with the right codes.

use crate::support::{run_client_env, temp_file};

use gpuwatch_testkit::READ_TOKEN;

struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "client security CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

#[test]
fn tls_and_tokens_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki();
    let ca = temp_file(dir.path(), "ca.pem", &pki.ca);
    let cert = temp_file(dir.path(), "server.pem", &pki.cert);
    let key = temp_file(dir.path(), "server.key", &pki.key);
    let read_token_file = temp_file(dir.path(), "read.token", &format!("{READ_TOKEN}\n"));
    let config = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let daemon = crate::support::start(Some(&config));
    let host = format!("https://localhost:{}", daemon.grpc.port());
    let ca = ca.display().to_string();

    // Reads over TLS with the CA (and the default control token).
    let list = run_client_env(&["list", "--json", &host, "--tls-ca", &ca], &[]);
    assert_eq!(list.code, Some(0), "{}\n{}", list.stdout, list.stderr);
    // Without the CA the daemon's certificate is not trusted.
    let untrusted = run_client_env(&["snapshot", "--json", "--timeout", "3s", &host], &[]);
    assert_eq!(untrusted.code, Some(1), "{}", untrusted.stdout);

    // A read token may read but not control: PERMISSION_DENIED, per host.
    let read_only = [
        ("GPUWATCH_TOKEN", ""),
        (
            "GPUWATCH_TOKEN_FILE",
            read_token_file.to_str().expect("utf-8"),
        ),
    ];
    let snap = run_client_env(&["snapshot", "--json", &host, "--tls-ca", &ca], &read_only);
    assert_eq!(snap.code, Some(0), "{}\n{}", snap.stdout, snap.stderr);
    let refused = run_client_env(
        &[
            "set-threshold",
            "--json",
            &host,
            "--tls-ca",
            &ca,
            "--gpu",
            "0",
            "--celsius",
            "75",
        ],
        &read_only,
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(
        refused.stdout.contains("PERMISSION_DENIED"),
        "{}",
        refused.stdout
    );

    // No token at all: control is UNAUTHENTICATED.
    let anonymous = run_client_env(
        &[
            "set-threshold",
            "--json",
            &host,
            "--tls-ca",
            &ca,
            "--gpu",
            "0",
            "--celsius",
            "75",
        ],
        &[("GPUWATCH_TOKEN", "")],
    );
    assert_eq!(anonymous.code, Some(1), "{}", anonymous.stdout);
    assert!(
        anonymous.stdout.contains("UNAUTHENTICATED"),
        "{}",
        anonymous.stdout
    );

    // The control token (the test default) succeeds, and the audit log names it.
    let ok = run_client_env(
        &[
            "set-threshold",
            "--json",
            &host,
            "--tls-ca",
            &ca,
            "--gpu",
            "0",
            "--celsius",
            "75",
        ],
        &[],
    );
    assert_eq!(ok.code, Some(0), "{}\n{}", ok.stdout, ok.stderr);
    let events = run_client_env(
        &["events", "--json", "--since", "0", &host, "--tls-ca", &ca],
        &[],
    );
    assert_eq!(events.code, Some(0), "{}", events.stderr);
    let records = events.json_lines();
    assert!(
        records
            .iter()
            .any(|e| e["kind"] == "threshold_changed" && e["actor"] == "tester"),
        "{}",
        events.stdout
    );
    assert!(
        records
            .iter()
            .any(|e| e["kind"] == "control_refused" && e["actor"] == "reader"),
        "{}",
        events.stdout
    );
}
