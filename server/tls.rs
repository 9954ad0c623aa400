//! TLS for the gRPC listener (and, with `tls.http`, the HTTP listener): loading and checking certificate files before
//! the daemon starts, so a missing, unreadable, malformed or mismatched file
//! is a startup error that names the file — not a handshake failure later.
//!
//! rustls with the `ring` provider does the checking (it refuses a key that
//! does not match its certificate); tonic serves with the same PEM bytes.

use std::{fs, path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// Checked TLS material, ready for tonic.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    require_client_cert: bool,
}

impl TlsMaterial {
    /// Mutual TLS is configured.
    pub fn mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The rustls configuration of the HTTP listener (`tls.http`): the
    /// same certificate and key, HTTP/1.1, no client certificates (tokens
    /// authenticate on HTTP).
    pub fn http_server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls.cert_file: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("tls.key_file: {e}"))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("tls.key_file: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The tonic server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(!self.require_client_cert);
        }
        config
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

fn certificates(
    key: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "{key}: {} is not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{key}: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Loads and checks the files named in `config`; `None` when TLS is off.
pub fn load(config: &TlsConfig) -> Result<Option<TlsMaterial>, String> {
    let (Some(cert_path), Some(key_path)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let cert_pem = read("tls.cert_file", cert_path)?;
    let key_pem = read("tls.key_file", key_path)?;
    let certs = certificates("tls.cert_file", cert_path, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "tls.key_file: {} is not a PEM private key: {e}",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let client_ca_pem = match &config.client_ca_file {
        Some(ca_path) => {
            let pem = read("tls.client_ca_file", ca_path)?;
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls.client_ca_file", ca_path, &pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.client_ca_file: {}: {e}", ca_path.display()))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca_file: {}: {e}", ca_path.display()))?;
            Some(pem)
        }
        None => None,
    };
    builder
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "tls.key_file: {} does not go with tls.cert_file {}: {e}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    Ok(Some(TlsMaterial {
        cert_pem,
        key_pem,
        client_ca_pem,
        require_client_cert: config.require_client_cert.unwrap_or(true),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).expect("write");
        path
    }

    fn cert(name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert")
    }

    #[test]
    fn good_pair_loads_and_mismatched_key_names_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cert("localhost");
        let b = cert("other");
        let cert_file = write(dir.path(), "a.pem", &a.cert.pem());
        let key_a = write(dir.path(), "a.key", &a.signing_key.serialize_pem());
        let key_b = write(dir.path(), "b.key", &b.signing_key.serialize_pem());
        let ok = TlsConfig {
            cert_file: Some(cert_file.clone()),
            key_file: Some(key_a),
            ..TlsConfig::default()
        };
        assert!(load(&ok).expect("valid").is_some());
        let bad = TlsConfig {
            cert_file: Some(cert_file),
            key_file: Some(key_b.clone()),
            ..TlsConfig::default()
        };
        let err = load(&bad).expect_err("mismatch");
        assert!(err.contains("b.key") && err.contains("a.pem"), "{err}");
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cert("localhost");
        let key = write(dir.path(), "a.key", &a.signing_key.serialize_pem());
        let missing = TlsConfig {
            cert_file: Some(dir.path().join("nope.pem")),
            key_file: Some(key.clone()),
            ..TlsConfig::default()
        };
        let err = load(&missing).expect_err("missing");
        assert!(
            err.contains("tls.cert_file") && err.contains("nope.pem"),
            "{err}"
        );
        let garbage = write(dir.path(), "garbage.pem", "hello");
        let bad = TlsConfig {
            cert_file: Some(garbage),
            key_file: Some(key),
            ..TlsConfig::default()
        };
        let err = load(&bad).expect_err("garbage");
        assert!(err.contains("garbage.pem"), "{err}");
    }
}
