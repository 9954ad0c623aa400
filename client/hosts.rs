//! Which daemons to talk to: `HOST` arguments and hosts files, parsed into
//! gRPC endpoint URIs.
//!
//! Accepted forms: `name`, `name:port`, `[v6addr]:port`, a bare IPv6 address,
//! and `http://name[:port]` / `https://name[:port]` (https means TLS). The
//! port defaults to the daemon's default gRPC port. Errors name the input and
//! the forms that are allowed; parsing never touches the network.
//!
//! Discovery ([`discover`]): a name that resolves to several addresses (a
//! Kubernetes headless Service, round-robin DNS) stands for every one of
//! them, so it becomes one host per address, labelled `NAME/ADDR:PORT`; with
//! TLS each is still verified as NAME. A name with one address (or none:
//! its failure is reported when connecting) stays as written.

use std::{fmt, future::Future, io, net::IpAddr, path::Path};

/// The daemon's default gRPC port. Kept here rather than imported from the
/// daemon's config module: the client depends on the wire contract only.
pub const DEFAULT_PORT: u16 = 9450;

/// One daemon to contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// How the user wrote it (trimmed); used as `host` in every output.
    pub label: String,
    /// Host name or IP address, without brackets.
    pub name: String,
    pub port: u16,
    /// `https://` was given: connect with TLS.
    pub tls: bool,
    /// The name to verify a TLS certificate against when `name` is one of
    /// the addresses discovery found for it.
    pub tls_name: Option<String>,
}

impl HostSpec {
    /// The endpoint URI, `http(s)://name:port` (`[addr]` for IPv6).
    pub fn uri(&self, tls: bool) -> String {
        let scheme = if tls || self.tls { "https" } else { "http" };
        if self.name.contains(':') {
            format!("{scheme}://[{}]:{}", self.name, self.port)
        } else {
            format!("{scheme}://{}:{}", self.name, self.port)
        }
    }
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A host that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid host \"{input}\": {reason}; expected NAME, NAME:PORT, [IPV6]:PORT, http://NAME:PORT or https://NAME:PORT"
)]
pub struct HostError {
    pub input: String,
    pub reason: String,
}

fn host_error(input: &str, reason: impl Into<String>) -> HostError {
    HostError {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

fn parse_port(input: &str, text: &str) -> Result<u16, HostError> {
    match text.parse::<u16>() {
        Ok(0) => Err(host_error(
            input,
            "port 0 is not a port a daemon listens on",
        )),
        Ok(p) => Ok(p),
        Err(_) => Err(host_error(
            input,
            format!("\"{text}\" is not a port (1-65535)"),
        )),
    }
}

fn check_name(input: &str, name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(host_error(input, "the host name is empty"));
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(host_error(
            input,
            format!("\"{name}\" is not a host name (letters, digits, '-', '.', '_') or IP address"),
        ));
    }
    Ok(())
}

/// Parses one `HOST`.
pub fn parse_host(input: &str) -> Result<HostSpec, HostError> {
    let label = input.trim();
    if label.is_empty() {
        return Err(host_error(input, "it is empty"));
    }
    let (tls, rest) = if let Some(rest) = label.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = label.strip_prefix("http://") {
        (false, rest)
    } else if label.contains("://") {
        return Err(host_error(input, "only http:// and https:// are supported"));
    } else {
        (false, label)
    };
    // Tolerate one trailing slash ("http://h:1/"), refuse any other path.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') || rest.contains('@') {
        return Err(host_error(
            input,
            "a path, query or user name is not allowed",
        ));
    }
    let (name, port) = if let Some(after) = rest.strip_prefix('[') {
        let Some((addr, tail)) = after.split_once(']') else {
            return Err(host_error(input, "'[' without a closing ']'"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(host_error(
                input,
                format!("\"{addr}\" is not an IPv6 address"),
            ));
        }
        let port = match tail {
            "" => DEFAULT_PORT,
            t => match t.strip_prefix(':') {
                Some(p) => parse_port(input, p)?,
                None => return Err(host_error(input, "expected ':PORT' after ']'")),
            },
        };
        (addr.to_owned(), port)
    } else if rest.matches(':').count() > 1 {
        // A bare IPv6 address: no port can be told apart from it.
        if rest.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(host_error(
                input,
                "several ':' but not an IPv6 address (write [ADDR]:PORT)",
            ));
        }
        (rest.to_owned(), DEFAULT_PORT)
    } else if let Some((name, port)) = rest.split_once(':') {
        check_name(input, name)?;
        (name.to_owned(), parse_port(input, port)?)
    } else {
        check_name(input, rest)?;
        (rest.to_owned(), DEFAULT_PORT)
    };
    Ok(HostSpec {
        label: label.to_owned(),
        name,
        port,
        tls,
        tls_name: None,
    })
}

/// `--k8s-service NAME.NAMESPACE[:PORT]`: the cluster DNS name of a
/// headless Service, `NAME.NAMESPACE.svc.cluster.local`, which [`discover`]
/// expands to every pod behind it.
pub fn k8s_service(input: &str) -> Result<HostSpec, HostError> {
    let text = input.trim();
    let (service, port) = match text.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (text, None),
    };
    let Some((name, namespace)) = service.split_once('.') else {
        return Err(host_error(
            input,
            "--k8s-service takes NAME.NAMESPACE (e.g. gpuwatch.gpus)",
        ));
    };
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return Err(host_error(
            input,
            "--k8s-service takes NAME.NAMESPACE (e.g. gpuwatch.gpus)",
        ));
    }
    let fqdn = format!("{name}.{namespace}.svc.cluster.local");
    let mut spec = parse_host(&match port {
        Some(p) => format!("{fqdn}:{p}"),
        None => fqdn,
    })?;
    spec.label = text.to_owned();
    Ok(spec)
}

/// Test-only: `NAME=ADDR,ADDR;NAME=…` answers for [`discover`] instead of
/// the system resolver (the CLI's suites give a name several loopback
/// addresses this way). Not a setting.
#[doc(hidden)]
pub const TEST_RESOLVE_ENV: &str = "GPUWATCH_TEST_RESOLVE";

/// Every address `name` resolves to, in the resolver's order, each once.
async fn system_resolve(name: String, port: u16) -> io::Result<Vec<IpAddr>> {
    if let Ok(table) = std::env::var(TEST_RESOLVE_ENV) {
        for entry in table.split(';') {
            if let Some((n, addrs)) = entry.split_once('=')
                && n.trim() == name
            {
                return Ok(addrs
                    .split(',')
                    .filter_map(|a| a.trim().parse().ok())
                    .collect());
            }
        }
    }
    let mut out = Vec::new();
    for addr in tokio::net::lookup_host((name.as_str(), port)).await? {
        if !out.contains(&addr.ip()) {
            out.push(addr.ip());
        }
    }
    Ok(out)
}

/// Expands every host whose name resolves to several addresses into one
/// host per address (see the module docs), with the system's resolver.
pub async fn discover(hosts: Vec<HostSpec>) -> Vec<HostSpec> {
    discover_with(hosts, system_resolve).await
}

/// [`discover`] with `resolve` as the resolver.
pub async fn discover_with<F, Fut>(hosts: Vec<HostSpec>, resolve: F) -> Vec<HostSpec>
where
    F: Fn(String, u16) -> Fut,
    Fut: Future<Output = io::Result<Vec<IpAddr>>>,
{
    let mut out: Vec<HostSpec> = Vec::with_capacity(hosts.len());
    for host in hosts {
        if host.name.parse::<IpAddr>().is_ok() {
            out.push(host);
            continue;
        }
        let addrs = resolve(host.name.clone(), host.port)
            .await
            .unwrap_or_default();
        if addrs.len() < 2 {
            out.push(host);
            continue;
        }
        for addr in addrs {
            let name = addr.to_string();
            let shown = if addr.is_ipv6() {
                format!("[{name}]:{}", host.port)
            } else {
                format!("{name}:{}", host.port)
            };
            let expanded = HostSpec {
                label: format!("{}/{shown}", host.name),
                name,
                port: host.port,
                tls: host.tls,
                tls_name: Some(host.name.clone()),
            };
            if !out
                .iter()
                .any(|h| h.name == expanded.name && h.port == expanded.port)
            {
                out.push(expanded);
            }
        }
    }
    out
}

/// A hosts file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsFileError {
    #[error("cannot read hosts file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("hosts file {path}, line {line}: {source}")]
    Host {
        path: String,
        line: usize,
        source: HostError,
    },
}

/// Parses a hosts file's text: one host per line, `#` starts a comment,
/// blank lines are skipped.
pub fn parse_hosts_text(path: &str, text: &str) -> Result<Vec<HostSpec>, HostsFileError> {
    let mut hosts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let host = parse_host(line).map_err(|source| HostsFileError::Host {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        hosts.push(host);
    }
    Ok(hosts)
}

/// Reads and parses a hosts file.
pub fn read_hosts_file(path: &Path) -> Result<Vec<HostSpec>, HostsFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HostsFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_hosts_text(&shown, &text)
}

/// Hosts from the command line and the hosts file, in order, each once
/// (the first spelling of an endpoint wins).
pub fn merge(args: Vec<HostSpec>, file: Vec<HostSpec>) -> Vec<HostSpec> {
    let mut out: Vec<HostSpec> = Vec::with_capacity(args.len() + file.len());
    for host in args.into_iter().chain(file) {
        let same = |h: &HostSpec| h.name == host.name && h.port == host.port && h.tls == host.tls;
        if !out.iter().any(same) {
            out.push(host);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> HostSpec {
        parse_host(input).expect("host parses")
    }

    #[test]
    fn bare_name_gets_default_port() {
        let h = ok("gpu-node-7");
        assert_eq!(
            (h.name.as_str(), h.port, h.tls),
            ("gpu-node-7", DEFAULT_PORT, false)
        );
        assert_eq!(h.uri(false), "http://gpu-node-7:9450");
    }

    #[test]
    fn name_and_port() {
        let h = ok("10.0.0.5:7000");
        assert_eq!((h.name.as_str(), h.port), ("10.0.0.5", 7000));
        assert_eq!(h.label, "10.0.0.5:7000");
    }

    #[test]
    fn schemes_select_tls() {
        assert!(!ok("http://a:1").tls);
        let h = ok("https://a.example:443/");
        assert!(h.tls);
        assert_eq!(h.uri(false), "https://a.example:443");
        assert_eq!(ok("http://a").port, DEFAULT_PORT);
        // --tls-ca turns TLS on for plain hosts too.
        assert_eq!(ok("a:5").uri(true), "https://a:5");
    }

    #[test]
    fn ipv6_forms() {
        let h = ok("[::1]:9000");
        assert_eq!((h.name.as_str(), h.port), ("::1", 9000));
        assert_eq!(h.uri(false), "http://[::1]:9000");
        assert_eq!(ok("[fe80::1]").port, DEFAULT_PORT);
        assert_eq!(ok("::1").port, DEFAULT_PORT);
        assert_eq!(ok("https://[::1]:1").uri(false), "https://[::1]:1");
    }

    #[test]
    fn bad_hosts_name_the_problem() {
        for (input, needle) in [
            ("", "empty"),
            ("a:0", "port 0"),
            ("a:70000", "not a port"),
            ("a:x", "not a port"),
            ("ftp://a", "only http"),
            ("http://a:1/path", "path"),
            ("[::1", "closing"),
            ("[zz]:1", "IPv6"),
            ("a b", "not a host name"),
            ("1:2:3", "IPv6"),
            ("user@host", "user"),
        ] {
            let err = parse_host(input).expect_err(input).to_string();
            assert!(err.contains(needle), "{input:?}: {err}");
            assert!(err.contains("expected NAME"), "{err}");
        }
    }

    #[test]
    fn hosts_file_comments_and_line_numbers() {
        let text = "# fleet\nnode1\n\n  node2:9000   # rack 2\nhttps://node3\n";
        let hosts = parse_hosts_text("f", text).expect("parses");
        let labels: Vec<_> = hosts.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["node1", "node2:9000", "https://node3"]);
        let err = parse_hosts_text("f", "ok\nbad:port\n")
            .expect_err("bad line")
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn merge_keeps_first_spelling_of_each_endpoint() {
        let args = vec![ok("a"), ok("a:9450"), ok("b:1")];
        let file = vec![ok("http://a:9450"), ok("c")];
        let labels: Vec<_> = merge(args, file).into_iter().map(|h| h.label).collect();
        assert_eq!(labels, ["a", "b:1", "c"]);
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_becomes_one_host_per_address() {
        let resolve = |name: String, _port: u16| async move {
            Ok(match name.as_str() {
                "gpuwatch.gpus.svc" => vec![
                    "127.0.0.2".parse().expect("ip"),
                    "127.0.0.3".parse().expect("ip"),
                    "127.0.0.2".parse().expect("ip"),
                    "::1".parse().expect("ip"),
                ],
                "single" => vec!["127.0.0.9".parse().expect("ip")],
                _ => Vec::new(),
            })
        };
        let hosts = vec![
            ok("gpuwatch.gpus.svc:9451"),
            ok("single"),
            ok("10.0.0.1"),
            ok("unknown.example"),
        ];
        let out = discover_with(hosts, resolve).await;
        let labels: Vec<&str> = out.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "gpuwatch.gpus.svc/127.0.0.2:9451",
                "gpuwatch.gpus.svc/127.0.0.3:9451",
                "gpuwatch.gpus.svc/[::1]:9451",
                "single",
                "10.0.0.1",
                "unknown.example"
            ]
        );
        assert_eq!(out[0].uri(false), "http://127.0.0.2:9451");
        assert_eq!(out[2].uri(false), "http://[::1]:9451");
        assert_eq!(out[0].tls_name.as_deref(), Some("gpuwatch.gpus.svc"));
        assert_eq!(out[3].tls_name, None);
    }

    #[test]
    fn a_k8s_service_is_its_cluster_dns_name() {
        let h = k8s_service("gpuwatch.gpus").expect("parses");
        assert_eq!(h.name, "gpuwatch.gpus.svc.cluster.local");
        assert_eq!(h.port, DEFAULT_PORT);
        assert_eq!(h.label, "gpuwatch.gpus");
        assert_eq!(k8s_service("gw.ns:9999").expect("parses").port, 9999);
        assert!(k8s_service("gpuwatch").is_err());
        assert!(k8s_service("a.b.c").is_err());
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost() {
        let addrs = system_resolve("localhost".to_owned(), 9450)
            .await
            .expect("localhost resolves");
        assert!(addrs.iter().all(IpAddr::is_loopback), "{addrs:?}");
    }
}
