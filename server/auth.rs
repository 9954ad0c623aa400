//! Who is calling and what they may do.
//!
//! Reading (ListDevices, GetSnapshot, Watch, WatchEvents, GetPolicy) and
//! control (SetPowerLimit, ResetClocks, SetThreshold) are separate
//! permissions. Callers prove who they are with a named bearer token
//! (`authorization: Bearer <token>`), compared in constant time against
//! SHA-256 digests of the configured tokens, or with a client certificate
//! verified by mutual TLS. The token's name (or the certificate's subject) is
//! the actor in audit events.
//!
//! The safe default: with no tokens configured, control is refused with a
//! message saying how to enable it, and reads without credentials are served
//! only on a loopback listener (unless `allow_unauthenticated_reads`).
//!
//! This module answers "do this request's credentials reach role R?". Which
//! method needs which role (and that health and reflection need none) is
//! decided in one table, in [`crate::authz`], which calls [`Authenticator`]
//! for every request before any handler runs.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    config::{AuthConfig, ConfigError, RoleName, TokenConfig},
    grpc_listen::GrpcConnectInfo,
};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// ListDevices, GetSnapshot, Watch, WatchEvents, GetPolicy, PickGpus,
    /// ListLeases.
    Read,
    /// Read, and hold GPUs: LeaseGpus, RenewLease, ReleaseLease. Between
    /// read and control because a lease changes what other schedulers are
    /// told (a leased GPU does not fit their picks) but never touches a
    /// GPU: a scheduler's token should not be able to change power limits.
    Lease,
    /// Everything, including SetPowerLimit, ResetClocks, SetThreshold (and
    /// releasing anyone's lease).
    Control,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Lease => "lease",
            Role::Control => "control",
        }
    }
}

impl From<RoleName> for Role {
    fn from(r: RoleName) -> Self {
        match r {
            RoleName::Read => Role::Read,
            RoleName::Lease => Role::Lease,
            RoleName::Control => Role::Control,
        }
    }
}

/// The authenticated identity of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name, `cert:<subject>`, or "anonymous".
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller of an unauthenticated request that was let through.
    pub fn anonymous(role: Role) -> Self {
        Self {
            name: "anonymous".to_owned(),
            role,
        }
    }
}

/// A refused request: the status to return and who it was, for the audit log.
#[derive(Debug)]
pub struct Refusal {
    pub status: Status,
    pub actor: String,
}

#[derive(Debug)]
struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// Checks every request against the configured credentials.
#[derive(Debug)]
pub struct Authenticator {
    tokens: Vec<Token>,
    /// Reads without credentials are allowed.
    open_reads: bool,
    /// Role granted to a verified client certificate (mutual TLS only).
    certificate_role: Option<Role>,
    listen: SocketAddr,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Authenticator {
    /// Builds the gate from `[auth]` (reading the token file), for a gRPC
    /// listener on `listen`, with mutual TLS on or off.
    pub fn new(
        auth: &AuthConfig,
        mutual_tls: bool,
        listen: SocketAddr,
    ) -> Result<Self, ConfigError> {
        let configured: Vec<TokenConfig> = crate::config::tokens(auth)?;
        let tokens = configured
            .iter()
            .map(|t| Token {
                name: t.name.clone(),
                role: t.role.into(),
                digest: digest(&t.token),
            })
            .collect();
        Ok(Self {
            tokens,
            open_reads: auth.allow_unauthenticated_reads || listen.ip().is_loopback(),
            certificate_role: mutual_tls.then(|| auth.mtls_role.map_or(Role::Read, Role::from)),
            listen,
        })
    }

    /// The gate of the HTTP listener on `listen`: the same tokens, no
    /// client certificates, and reads without a token only when no token is
    /// configured and `listen` is loopback (or with
    /// `allow_unauthenticated_reads`): once tokens exist, the HTTP data
    /// paths need one (see `crate::http::access`).
    pub fn for_http(auth: &AuthConfig, listen: SocketAddr) -> Result<Self, ConfigError> {
        let mut gate = Self::new(auth, false, listen)?;
        gate.open_reads = auth.allow_unauthenticated_reads
            || (listen.ip().is_loopback() && gate.tokens.is_empty());
        Ok(gate)
    }

    /// An authenticator that lets everything through (the HTTP gate when
    /// HTTP is off; tests of the handlers).
    pub fn open(listen: SocketAddr) -> Self {
        Self {
            tokens: Vec::new(),
            open_reads: true,
            certificate_role: None,
            listen,
        }
    }

    /// True when some credential can grant control.
    pub fn control_possible(&self) -> bool {
        self.tokens.iter().any(|t| t.role == Role::Control)
            || self.certificate_role == Some(Role::Control)
    }

    /// True when reads need no credentials.
    pub fn reads_open(&self) -> bool {
        self.open_reads
    }

    /// Number of tokens configured.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The token matching `presented`, compared in constant time against
    /// every configured token (no early exit).
    fn find_token(&self, presented: &str) -> Option<&Token> {
        let wanted = digest(presented);
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&wanted)) {
                found = Some(token);
            }
        }
        found
    }

    /// Decides whether `request` may call `method`, which needs `need`. It
    /// reads the request's `authorization` header and, with mutual TLS, the
    /// client certificate the connection presented (in the extensions the
    /// transport puts on every request); the body is never looked at.
    #[allow(clippy::result_large_err)]
    pub fn authorize<B>(
        &self,
        request: &http::Request<B>,
        method: &str,
        need: Role,
    ) -> Result<Caller, Refusal> {
        let refuse = |status: Status, actor: &str| Refusal {
            status,
            actor: actor.to_owned(),
        };
        let header = request.headers().get(http::header::AUTHORIZATION);
        if let Some(value) = header {
            let Some(token) = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim())
                .filter(|t| !t.is_empty())
            else {
                return Err(refuse(
                    Status::unauthenticated("the authorization header must be `Bearer <token>`"),
                    "anonymous",
                ));
            };
            let Some(found) = self.find_token(token) else {
                return Err(refuse(
                    Status::unauthenticated(
                        "unknown token; check the token your client sends (--token or GPUWATCH_TOKEN)",
                    ),
                    "unknown token",
                ));
            };
            if found.role < need {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "token \"{}\" has role {}; {method} needs role {}",
                        found.name,
                        found.role.name(),
                        need.name()
                    )),
                    &found.name,
                ));
            }
            return Ok(Caller {
                name: found.name.clone(),
                role: found.role,
            });
        }
        if let Some(role) = self.certificate_role
            && let Some(subject) = certificate_subject(request)
        {
            let name = format!("cert:{subject}");
            if role < need {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "client certificate \"{subject}\" grants role {}; {method} needs role {} (send a control token, or set auth.mtls_role = \"control\")",
                        role.name(),
                        need.name()
                    )),
                    &name,
                ));
            }
            return Ok(Caller { name, role });
        }
        match need {
            Role::Read if self.open_reads => Ok(Caller::anonymous(Role::Read)),
            Role::Read => Err(refuse(
                Status::unauthenticated(format!(
                    "this daemon listens on {} (not loopback): reads need a token. Send one (--token / GPUWATCH_TOKEN), \
                     or set [auth] allow_unauthenticated_reads = true on a trusted network",
                    self.listen
                )),
                "anonymous",
            )),
            Role::Control if !self.control_possible() => Err(refuse(
                Status::unauthenticated(format!(
                    "{method} is refused: control is disabled because no control token is configured. Add one, e.g. \
                     [[auth.tokens]] name = \"ops\", role = \"control\", token = \"<secret>\" (or a token_file), \
                     restart, and call with --token <secret>"
                )),
                "anonymous",
            )),
            Role::Control => Err(refuse(
                Status::unauthenticated(format!(
                    "{method} needs a token with role control; send it as `authorization: Bearer <token>` (--token / GPUWATCH_TOKEN)"
                )),
                "anonymous",
            )),
            Role::Lease => Err(refuse(
                Status::unauthenticated(format!(
                    "{method} needs a token with role lease (or control); send it as `authorization: Bearer <token>` (--token / GPUWATCH_TOKEN). \
                     Configure one with [[auth.tokens]] name = \"scheduler\", role = \"lease\", token = \"<secret>\""
                )),
                "anonymous",
            )),
        }
    }
}

/// The peer address of the connection `request` came on.
pub fn remote_addr<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    peer_in(request.extensions())
}

/// The peer address in a request's extensions: the gRPC listener's
/// [`GrpcConnectInfo`] (plain or under TLS), or tonic's plain TCP info.
pub fn peer_in(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<GrpcConnectInfo>()
        .and_then(GrpcConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<GrpcConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .or_else(|| tcp_peer(extensions))
}

/// The connection's in-flight counter, when it came through the gRPC
/// listener's cap.
pub fn grpc_connection<B>(request: &http::Request<B>) -> Option<&GrpcConnectInfo> {
    let extensions = request.extensions();
    extensions.get::<GrpcConnectInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<GrpcConnectInfo>>()
            .map(TlsConnectInfo::get_ref)
    })
}

fn tcp_peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The subject CN (else the whole subject) of a verified client certificate.
fn certificate_subject<B>(request: &http::Request<B>) -> Option<String> {
    let extensions = request.extensions();
    let certs = extensions
        .get::<TlsConnectInfo<GrpcConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
        })?;
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok().map(str::to_owned));
    Some(cn.unwrap_or_else(|| subject.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn token(name: &str, role: RoleName, secret: &str) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            role,
            token: secret.into(),
        }
    }

    fn auth(tokens: Vec<TokenConfig>, listen: &str) -> Authenticator {
        let config = AuthConfig {
            tokens,
            ..AuthConfig::default()
        };
        Authenticator::new(&config, false, listen.parse().expect("addr")).expect("auth")
    }

    fn request(bearer: Option<&str>) -> http::Request<()> {
        let mut r = http::Request::new(());
        if let Some(b) = bearer {
            r.headers_mut()
                .insert("authorization", b.parse().expect("ascii"));
        }
        r
    }

    const READ: &str = "read-secret-0123456789";
    const CONTROL: &str = "control-secret-0123456789";

    fn two_tokens(listen: &str) -> Authenticator {
        auth(
            vec![
                token("dashboard", RoleName::Read, READ),
                token("ops", RoleName::Control, CONTROL),
            ],
            listen,
        )
    }

    #[test]
    fn roles_separate_reading_from_control() {
        let a = two_tokens("0.0.0.0:9450");
        let read = a
            .authorize(
                &request(Some(&format!("Bearer {READ}"))),
                "GetSnapshot",
                Role::Read,
            )
            .expect("read ok");
        assert_eq!(read.name, "dashboard");
        let refused = a
            .authorize(
                &request(Some(&format!("Bearer {READ}"))),
                "SetPowerLimit",
                Role::Control,
            )
            .expect_err("read token cannot control");
        assert_eq!(refused.status.code(), Code::PermissionDenied);
        assert_eq!(refused.actor, "dashboard");
        let ops = a
            .authorize(
                &request(Some(&format!("bearer {CONTROL}"))),
                "SetPowerLimit",
                Role::Control,
            )
            .expect("control ok");
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Control));
    }

    #[test]
    fn unknown_or_malformed_credentials_are_unauthenticated() {
        let a = two_tokens("127.0.0.1:9450");
        for header in [
            "Bearer not-a-real-token-at-all",
            "Basic abc",
            "Bearer ",
            "Token x",
        ] {
            let refused = a
                .authorize(&request(Some(header)), "GetSnapshot", Role::Read)
                .expect_err(header);
            assert_eq!(refused.status.code(), Code::Unauthenticated, "{header}");
        }
    }

    #[test]
    fn without_tokens_control_is_refused_with_how_to_enable_it() {
        let a = auth(Vec::new(), "127.0.0.1:9450");
        let refused = a
            .authorize(&request(None), "SetPowerLimit", Role::Control)
            .expect_err("refused");
        assert_eq!(refused.status.code(), Code::Unauthenticated);
        assert!(
            refused.status.message().contains("auth.tokens"),
            "{}",
            refused.status.message()
        );
        // Reads stay open on loopback.
        assert!(
            a.authorize(&request(None), "GetSnapshot", Role::Read)
                .is_ok()
        );
    }

    #[test]
    fn on_http_tokens_close_reads_even_on_loopback() {
        let open = Authenticator::for_http(
            &AuthConfig::default(),
            "127.0.0.1:9451".parse().expect("addr"),
        )
        .expect("auth");
        assert!(open.reads_open());
        let config = AuthConfig {
            tokens: vec![token("dashboard", RoleName::Read, READ)],
            ..AuthConfig::default()
        };
        let closed = Authenticator::for_http(&config, "127.0.0.1:9451".parse().expect("addr"))
            .expect("auth");
        assert!(!closed.reads_open());
        assert!(
            closed
                .authorize(&request(None), "/api/v1/stream", Role::Read)
                .is_err()
        );
        assert!(
            closed
                .authorize(
                    &request(Some(&format!("Bearer {READ}"))),
                    "/api/v1/stream",
                    Role::Read
                )
                .is_ok()
        );
        let network = Authenticator::for_http(
            &AuthConfig::default(),
            "0.0.0.0:9451".parse().expect("addr"),
        )
        .expect("auth");
        assert!(!network.reads_open());
    }

    #[test]
    fn reads_without_a_token_are_open_only_on_loopback_unless_allowed() {
        let a = auth(Vec::new(), "0.0.0.0:9450");
        let refused = a
            .authorize(&request(None), "Watch", Role::Read)
            .expect_err("closed");
        assert_eq!(refused.status.code(), Code::Unauthenticated);
        let config = AuthConfig {
            allow_unauthenticated_reads: true,
            ..AuthConfig::default()
        };
        let a = Authenticator::new(&config, false, "0.0.0.0:9450".parse().expect("addr"))
            .expect("auth");
        assert!(a.authorize(&request(None), "Watch", Role::Read).is_ok());
        let v6 = auth(Vec::new(), "[::1]:9450");
        assert!(v6.authorize(&request(None), "Watch", Role::Read).is_ok());
    }
}
