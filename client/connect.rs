//! Connections to daemons: endpoint settings, TLS, the bearer token, and
//! errors turned into short sentences an operator can act on.
//!
//! One [`Connector`] is built from the command line before any host is
//! contacted, so a missing certificate or a malformed token is a usage error
//! up front, never a per-host failure. Every host gets its own HTTP/2
//! connection; every RPC on it carries `authorization: Bearer <token>` when a
//! token is configured.

use std::{error::Error as StdError, fmt, path::Path, time::Duration};

use gpuwatch_api::gpu_watch_client::GpuWatchClient;
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::hosts::HostSpec;

/// A client for one daemon.
pub type Client = GpuWatchClient<InterceptedService<Channel, Auth>>;

/// Adds the bearer token to every request.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// What the command line says about security.
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    pub token: Option<String>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub tls_server_name: Option<String>,
}

/// A problem with the connection options: a usage error.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, OptionsError> {
    std::fs::read(path).map_err(|source| OptionsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Reads a token file: the first line, trimmed.
pub fn read_token_file(path: &Path) -> Result<String, OptionsError> {
    let bytes = read_file("token file", path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        OptionsError::Invalid(format!("token file {} is not UTF-8 text", path.display()))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(OptionsError::Invalid(format!(
            "token file {} is empty; expected the token on its first line",
            path.display()
        )));
    }
    Ok(token)
}

/// Builds clients for hosts, all with the same settings.
#[derive(Debug, Clone)]
pub struct Connector {
    timeout: Duration,
    auth: Auth,
    /// TLS settings from the command line; `Some` forces TLS on every host.
    tls: Option<ClientTlsConfig>,
    /// --tls-server-name was given (it wins over a discovered host's name).
    tls_server_name: Option<String>,
}

impl Connector {
    /// Validates the options (reads every file now).
    pub fn new(timeout: Duration, security: &SecurityOptions) -> Result<Self, OptionsError> {
        let header = match &security.token {
            None => None,
            Some(token) => {
                let token = token.trim();
                if token.is_empty() {
                    return Err(OptionsError::Invalid(
                        "the token is empty; give a non-empty --token or unset GPUWATCH_TOKEN"
                            .into(),
                    ));
                }
                let value = format!("Bearer {token}").parse::<MetadataValue<Ascii>>().map_err(|_| {
                    OptionsError::Invalid(
                        "the token contains characters not allowed in a header (printable ASCII only)"
                            .into(),
                    )
                })?;
                Some(value)
            }
        };
        let tls = match (&security.tls_cert, &security.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(OptionsError::Invalid(
                    "--tls-cert and --tls-key go together (a client certificate needs its key)"
                        .into(),
                ));
            }
            _ if security.tls_ca.is_none()
                && security.tls_cert.is_none()
                && security.tls_server_name.is_none() =>
            {
                None
            }
            (cert, key) => {
                // A private CA replaces the system's roots; without one the
                // system's trust store is used.
                let mut config = ClientTlsConfig::new();
                config = match &security.tls_ca {
                    Some(ca) => {
                        let pem = read_file("CA file", ca)?;
                        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                            return Err(OptionsError::Invalid(format!(
                                "CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                                ca.display()
                            )));
                        }
                        config.ca_certificate(Certificate::from_pem(pem))
                    }
                    None => config.with_native_roots(),
                };
                if let (Some(cert), Some(key)) = (cert, key) {
                    config = config.identity(Identity::from_pem(
                        read_file("certificate file", cert)?,
                        read_file("key file", key)?,
                    ));
                }
                if let Some(name) = &security.tls_server_name {
                    config = config.domain_name(name.clone());
                }
                // Parse the PEM files now so a bad one is a usage error.
                Endpoint::from_static("https://localhost")
                    .tls_config(config.clone())
                    .map_err(|e| {
                        OptionsError::Invalid(format!(
                            "TLS settings: {} (check --tls-ca, --tls-cert and --tls-key)",
                            describe_error(&e)
                        ))
                    })?;
                Some(config)
            }
        };
        Ok(Self {
            timeout,
            auth: Auth { header },
            tls,
            tls_server_name: security.tls_server_name.clone(),
        })
    }

    /// The per-host timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn endpoint(&self, host: &HostSpec) -> Result<Endpoint, HostFailure> {
        let tls = self.tls.is_some() || host.tls;
        let uri = host.uri(tls);
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                HostFailure::Connect(format!("bad endpoint {uri}: {}", describe_error(&e)))
            })?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(self.timeout.max(Duration::from_secs(5)))
            .keep_alive_while_idle(false);
        if tls {
            let mut config = self
                .tls
                .clone()
                .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
            // An address discovery found for a name: verify it as that name
            // (unless --tls-server-name already says which name to expect).
            if let Some(name) = &host.tls_name
                && self.tls_server_name.is_none()
            {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| HostFailure::Connect(format!("TLS: {}", describe_error(&e))))?;
        }
        Ok(endpoint)
    }

    /// Opens a connection to `host` (TCP, TLS, HTTP/2), within the timeout.
    pub async fn connect(&self, host: &HostSpec) -> Result<Client, HostFailure> {
        let endpoint = self.endpoint(host)?;
        let channel = match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Err(_) => return Err(HostFailure::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(HostFailure::Connect(describe_error(&e))),
            Ok(Ok(channel)) => channel,
        };
        Ok(GpuWatchClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(64 << 20))
    }
}

/// Why a host could not be used.
#[derive(Debug, Clone)]
pub enum HostFailure {
    /// No answer within the timeout.
    Timeout(Duration),
    /// The connection could not be made (refused, DNS, TLS, ...).
    Connect(String),
    /// The daemon answered with an error.
    Rpc { code: Code, message: String },
}

impl HostFailure {
    pub fn from_status(status: &Status) -> Self {
        // A status with a source was made by the client's transport (the
        // connection broke); its root cause says more than the wrappers.
        let message = match StdError::source(status) {
            Some(source) => {
                let mut root: &(dyn StdError + 'static) = source;
                while let Some(next) = root.source() {
                    root = next;
                }
                format!("connection lost: {}", describe_error(root))
            }
            None if status.message().is_empty() => "no message".to_owned(),
            None => status.message().to_owned(),
        };
        HostFailure::Rpc {
            code: status.code(),
            message,
        }
    }

    /// The gRPC code's name in the contract's spelling, if the daemon answered.
    pub fn code_name(&self) -> Option<&'static str> {
        match self {
            HostFailure::Rpc { code, .. } => Some(code_name(*code)),
            HostFailure::Timeout(_) => Some("DEADLINE_EXCEEDED"),
            HostFailure::Connect(_) => Some("UNAVAILABLE"),
        }
    }

    /// Errors that retrying will not fix (a bad selector, a refused token).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            HostFailure::Rpc {
                code: Code::InvalidArgument
                    | Code::NotFound
                    | Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::Unimplemented,
                ..
            }
        )
    }
}

impl From<Status> for HostFailure {
    fn from(status: Status) -> Self {
        HostFailure::from_status(&status)
    }
}

impl fmt::Display for HostFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostFailure::Timeout(d) => write!(
                f,
                "no answer within {} (--timeout)",
                humantime::format_duration(*d)
            ),
            HostFailure::Connect(m) => write!(f, "cannot connect: {m}"),
            HostFailure::Rpc { code, message } => write!(f, "{}: {message}", code_name(*code)),
        }
    }
}

/// The status code as the gRPC spec spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes in one line, without the generic wrappers
/// ("transport error") that say nothing; a refused connection reads as
/// "connection refused".
pub fn describe_error(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        // A socket error says it all; the wrappers around it add nothing.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            let plain = match io.kind() {
                K::ConnectionRefused => Some("connection refused"),
                K::ConnectionReset => Some("connection reset by peer"),
                K::ConnectionAborted => Some("connection aborted"),
                K::TimedOut => Some("timed out"),
                K::HostUnreachable => Some("host unreachable"),
                K::NetworkUnreachable => Some("network unreachable"),
                K::AddrNotAvailable => Some("address not available"),
                _ => None,
            };
            if let Some(plain) = plain {
                return plain.to_owned();
            }
        }
        let text = e.to_string();
        let generic = matches!(text.as_str(), "transport error" | "");
        if !generic && !parts.iter().any(|p| p.contains(&text)) {
            // A wrapper often repeats its cause's text; keep the longer one.
            parts.retain(|p| !text.contains(p.as_str()));
            parts.push(text);
        }
        current = e.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_becomes_bearer_header() {
        let security = SecurityOptions {
            token: Some("s3cret".into()),
            ..Default::default()
        };
        let connector = Connector::new(Duration::from_secs(1), &security).expect("valid");
        let mut auth = connector.auth.clone();
        let request = auth.call(Request::new(())).expect("interceptor passes");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
    }

    #[test]
    fn bad_tokens_are_usage_errors() {
        for token in ["", "  ", "bad\ntoken"] {
            let security = SecurityOptions {
                token: Some(token.into()),
                ..Default::default()
            };
            assert!(
                Connector::new(Duration::from_secs(1), &security).is_err(),
                "{token:?}"
            );
        }
    }

    #[test]
    fn missing_tls_file_names_the_file() {
        let security = SecurityOptions {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = Connector::new(Duration::from_secs(1), &security)
            .expect_err("missing file")
            .to_string();
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("CA file"),
            "{err}"
        );
        let half = SecurityOptions {
            tls_cert: Some("/x".into()),
            ..Default::default()
        };
        let err = Connector::new(Duration::from_secs(1), &half)
            .expect_err("cert without key")
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
    }

    #[test]
    fn refused_connection_reads_plainly() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(describe_error(&io), "connection refused");
    }

    #[test]
    fn permanent_failures_are_the_ones_retrying_cannot_fix() {
        assert!(HostFailure::from_status(&Status::not_found("no GPU 9")).is_permanent());
        assert!(!HostFailure::from_status(&Status::unavailable("down")).is_permanent());
        assert!(!HostFailure::Timeout(Duration::from_secs(1)).is_permanent());
    }
}
