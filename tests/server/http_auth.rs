//! The HTTP side honours the same roles as gRPC (issue 12 row 16): with
//! tokens configured, `/api/v1/*` (the audit log) and `/metrics` need a read
//! token — as a Bearer header or the dashboard's cookie — while `/healthz`
//! and the static page stay open; `auth.open_metrics` opens `/metrics` for a
//! scraper; `tls.http` serves the listener over TLS.

use std::{sync::Arc, time::Duration};

use gpuwatch_testkit::{Daemon, Launch, READ_TOKEN};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A raw HTTP/1.1 GET on a fresh connection: status and the whole reply.
async fn get(daemon: &Daemon, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let addr = daemon.http.expect("HTTP");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut reply = vec![0u8; 64 * 1024];
    // The stream never ends: the head and the first message are enough.
    let mut got = 0;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while got < reply.len() {
            match s.read(&mut reply[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if path.starts_with("/api/v1/stream")
                && String::from_utf8_lossy(&reply[..got]).contains("event: snapshot")
            {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&reply[..got]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {text:?}"));
    (status, text)
}

fn launch(config: &str, tokens: bool) -> Daemon {
    Launch {
        config: Some(config.to_owned()),
        http: true,
        tokens,
        ..Launch::default()
    }
    .start()
}

const BEARER: &str = "authorization";

#[tokio::test]
async fn with_tokens_the_data_paths_need_a_read_token_and_healthz_stays_open() {
    let d = launch("", true);
    let bearer = format!("Bearer {READ_TOKEN}");
    let control = format!("Bearer {}", gpuwatch_testkit::CONTROL_TOKEN);
    for path in ["/api/v1/dashboard", "/api/v1/stream", "/metrics"] {
        let (status, text) = get(&d, path, &[]).await;
        assert_eq!(status, 401, "{path} without a token: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
        assert!(!text.contains("reader"), "{path} leaked data: {text}");
        let (status, text) = get(&d, path, &[(BEARER, "Bearer not-a-token-0123456789")]).await;
        assert_eq!(status, 401, "{path} with an unknown token: {text}");
        let (status, text) = get(&d, path, &[(BEARER, "Basic abc")]).await;
        assert_eq!(status, 401, "{path} with a malformed header: {text}");
        for token in [&bearer, &control] {
            let (status, text) = get(&d, path, &[(BEARER, token)]).await;
            assert_eq!(status, 200, "{path} with a token: {text}");
        }
    }
    // Probes and the page itself (static, no data) need nothing.
    for path in ["/healthz", "/"] {
        let (status, text) = get(&d, path, &[]).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Unknown paths are not served, with or without a token.
    for token in [None, Some(bearer.as_str())] {
        let headers: Vec<(&str, &str)> = token.map(|t| (BEARER, t)).into_iter().collect();
        for path in [
            "/api/v1/events",
            "/api/v2/stream",
            "/admin",
            "/api/v1/dashboard/x",
        ] {
            let (status, _) = get(&d, path, &headers).await;
            assert_eq!(status, 404, "{path}");
        }
    }
}

#[tokio::test]
async fn the_dashboards_cookie_carries_the_token_to_its_event_stream() {
    let d = launch("", true);
    let (status, text) = get(
        &d,
        "/api/v1/stream",
        &[(
            "cookie",
            &format!("theme=dark; gpuwatch_token={READ_TOKEN}"),
        )],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("event: snapshot"), "{text}");
    let (status, _) = get(
        &d,
        "/api/v1/dashboard",
        &[("cookie", "gpuwatch_token=wrong-token-0123456789")],
    )
    .await;
    assert_eq!(status, 401);
    // The page knows how to ask for a token.
    let (_, page) = get(&d, "/", &[]).await;
    assert!(page.contains("gpuwatch_token") && page.contains("id=\"login\""));
}

#[tokio::test]
async fn without_tokens_on_loopback_everything_stays_open() {
    let d = launch("", false);
    for path in [
        "/api/v1/dashboard",
        "/api/v1/stream",
        "/metrics",
        "/healthz",
        "/",
    ] {
        let (status, text) = get(&d, path, &[]).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
}

#[tokio::test]
async fn open_metrics_lets_a_scraper_in_without_a_token_but_not_into_the_api() {
    let d = launch("[auth]\nopen_metrics = true\n", true);
    let (status, text) = get(&d, "/metrics", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("gpuwatch_"), "{text}");
    let (status, _) = get(&d, "/api/v1/dashboard", &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn tls_http_serves_the_listener_over_tls_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert_file = dir.path().join("server.pem");
    let key_file = dir.path().join("server.key");
    std::fs::write(&cert_file, cert.cert.pem()).expect("write");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write");
    let d = launch(
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\nhttp = true\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        ),
        true,
    );
    let addr = d.http.expect("HTTP");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let https_get = async |path: &str, token: Option<&str>| -> String {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    };
    assert!(
        https_get("/healthz", None)
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        https_get("/metrics", None)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert!(
        https_get("/metrics", Some(READ_TOKEN))
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Plain HTTP on the TLS port gets no page.
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut reply)).await;
    assert!(!String::from_utf8_lossy(&reply).contains("200 OK"));
}
