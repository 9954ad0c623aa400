//! The deployment files agree with the code they deploy.
//!
//! No Docker engine or systemd runs on the build machines, so what can be
//! checked without them is checked here against the real binaries:
//! - every `COPY` source in the Dockerfile exists in a checkout and is sent
//!   in the build context (`.dockerignore` is an allowlist);
//! - the `ENV` the image sets (and the systemd unit's `ExecStart`) is a
//!   configuration `gpuwatch-server --check-config` accepts;
//! - the image's HEALTHCHECK script passes against a live daemon and fails
//!   once it is gone.
//!
//! `.ci/deploy.sh` adds the linters (hadolint, systemd-analyze,
//! kubernetes-validate) on top, and `.ci/image.sh` builds the image with
//! podman and runs it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use gpuwatch_testkit::Launch;

const SERVER: &str = env!("CARGO_BIN_EXE_gpuwatch-server");

fn repo() -> PathBuf {
    gpuwatch_testkit::repo_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

/// `COPY`/`ADD` sources taken from the build context (not `--from=` a stage).
fn context_sources() -> Vec<String> {
    let mut sources = Vec::new();
    for (keyword, args) in dockerfile_instructions() {
        if keyword != "COPY" && keyword != "ADD" {
            continue;
        }
        let words: Vec<String> = if args.starts_with('[') {
            serde_json::from_str(&args).expect("JSON-form COPY parses")
        } else {
            args.split_whitespace().map(str::to_owned).collect()
        };
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let paths: Vec<_> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        assert!(
            paths.len() >= 2,
            "{keyword} {args}: needs a source and a destination"
        );
        sources.extend(paths[..paths.len() - 1].iter().cloned());
    }
    sources
}

/// Docker's pattern match for one path segment list: `*` and `?` within a
/// segment, `**` across any number of segments.
fn glob_match(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| glob_match(rest, &path[skip..])),
        Some((seg, rest)) => {
            !path.is_empty()
                && segment_match(seg.as_bytes(), path[0].as_bytes())
                && glob_match(rest, &path[1..])
        }
    }
}

fn segment_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|skip| segment_match(rest, &s[skip..])),
        Some((b'?', rest)) => !s.is_empty() && segment_match(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && segment_match(rest, &s[1..]),
    }
}

/// Whether `.dockerignore` keeps `rel` out of the build context: the last
/// pattern matching the path or one of its parent directories decides.
fn ignored(patterns: &[(bool, String)], rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let mut excluded = false;
    for (negated, pattern) in patterns {
        let pat: Vec<&str> = pattern.split('/').collect();
        if (1..=parts.len()).any(|n| glob_match(&pat, &parts[..n])) {
            excluded = !negated;
        }
    }
    excluded
}

fn dockerignore() -> Vec<(bool, String)> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (negated, p) = match l.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, l),
            };
            (negated, p.trim_matches('/').to_owned())
        })
        .collect()
}

fn files_under(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .expect("read dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            files_under(&entry, out);
        }
    } else {
        out.push(path.to_owned());
    }
}

#[test]
fn dockerfile_copies_only_paths_that_exist_and_are_in_the_build_context() {
    let patterns = dockerignore();
    let sources = context_sources();
    for expected in ["Cargo.lock", "proto", "server", "client"] {
        assert!(
            sources.iter().any(|s| s == expected),
            "COPY of {expected} missing: {sources:?}"
        );
    }
    for source in &sources {
        let path = repo().join(source);
        assert!(
            path.exists(),
            "Dockerfile copies {source}, which does not exist"
        );
        let mut files = Vec::new();
        files_under(&path, &mut files);
        assert!(
            !files.is_empty(),
            "Dockerfile copies {source}, which is empty"
        );
        for file in files {
            let rel = file
                .strip_prefix(repo())
                .expect("inside the repo")
                .to_string_lossy()
                .into_owned();
            assert!(
                !ignored(&patterns, &rel),
                "Dockerfile copies {rel}, but .dockerignore keeps it out of the build context"
            );
        }
    }
}

#[test]
fn dockerignore_keeps_build_output_and_git_out_of_the_context() {
    let patterns = dockerignore();
    for rel in [
        "target/release/gpuwatch-server",
        ".git/config",
        "clients/python/setup.py",
    ] {
        assert!(
            ignored(&patterns, rel),
            "{rel} would be sent to the builder"
        );
    }
    assert!(!ignored(&patterns, "server/main.rs"));
}

fn check_config(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    Command::new(SERVER)
        .args(args)
        .arg("--check-config")
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .expect("run gpuwatch-server --check-config")
}

fn image_env() -> Vec<(String, String)> {
    let mut env = Vec::new();
    for (keyword, args) in dockerfile_instructions() {
        if keyword == "ENV" {
            for pair in args.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                env.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    env
}

#[test]
fn the_images_environment_is_a_valid_configuration() {
    let env = image_env();
    for key in ["GPUWATCH_SERVER__LISTEN", "GPUWATCH_SERVER__HTTP_LISTEN"] {
        let value = env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the image does not set {key}"));
        assert!(
            value.starts_with("0.0.0.0:"),
            "{key}={value}: a container must listen on every interface"
        );
    }
    let out = check_config(&[], &env);
    assert!(
        out.status.success(),
        "gpuwatch-server rejects the image's ENV: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same check fails when a value is wrong, so the ENV really is read.
    let mut broken = env.clone();
    broken.push(("GPUWATCH_SERVER__LISTEN".into(), "0.0.0.0".into()));
    let out = check_config(&[], &broken);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a bad listen address must be a usage error"
    );
}

#[test]
fn the_images_entrypoint_is_the_server_binary() {
    let entrypoint = dockerfile_instructions()
        .into_iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, a)| a)
        .expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(&entrypoint).expect("exec-form ENTRYPOINT");
    assert_eq!(argv, ["/usr/local/bin/gpuwatch-server"]);
    assert!(read("server/Cargo.toml").contains("name = \"gpuwatch-server\""));
}

#[test]
fn the_systemd_units_command_line_is_accepted() {
    let unit = read("deploy/gpuwatch.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/gpuwatch-server"));
    let example = repo().join("deploy/gpuwatch.toml");
    let args: Vec<String> = words
        .map(|w| {
            if w == "/etc/gpuwatch/gpuwatch.toml" {
                example.to_string_lossy().into_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = check_config(&args, &[]);
    assert!(
        out.status.success(),
        "gpuwatch-server {exec} --check-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for directive in [
        "Restart=on-failure",
        "StateDirectory=gpuwatch",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DevicePolicy=closed",
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
    ] {
        assert!(
            unit.lines().any(|l| l == directive),
            "the unit lacks {directive}"
        );
    }
}

#[test]
fn the_unit_raises_the_file_descriptor_limit_well_above_the_http_connection_cap() {
    // Issue 12 row 4: 1,024 idle HTTP connections at the default fd limit
    // took gRPC down with them. The unit must leave gRPC room beyond the
    // HTTP listener's own cap.
    let unit = read("deploy/gpuwatch.service");
    let limits: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("LimitNOFILE="))
        .collect();
    assert_eq!(
        limits.len(),
        1,
        "the unit sets LimitNOFILE= once: {limits:?}"
    );
    let nofile: usize = limits[0]
        .split(':')
        .next_back()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("LimitNOFILE={} is not a number", limits[0]));
    let cap = gpuwatch_server::config::LimitsConfig::default().http_max_connections;
    assert!(
        nofile >= 8 * cap && nofile >= 16_384,
        "LimitNOFILE={nofile} leaves too little beyond limits.http_max_connections = {cap}"
    );
}

fn healthcheck(env: &[(&str, &str)]) -> std::process::Output {
    Command::new("bash")
        .arg(repo().join("deploy/container/healthcheck.sh"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run the health check")
}

#[test]
fn the_container_healthcheck_follows_the_daemon() {
    let mut daemon = Launch {
        http: true,
        tokens: false,
        ..Launch::default()
    }
    .start();
    let (grpc, http) = (
        daemon.grpc.to_string(),
        daemon.http.map(|a| a.to_string()).unwrap_or_default(),
    );
    let wildcard = format!("0.0.0.0:{}", http.rsplit(':').next().unwrap_or(""));
    for http in [http.as_str(), wildcard.as_str()] {
        let out = healthcheck(&[("GPUWATCH_SERVER__HTTP_LISTEN", http)]);
        assert!(
            out.status.success(),
            "health check against {http} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = healthcheck(&[
        ("GPUWATCH_SERVER__HTTP_LISTEN", "off"),
        ("GPUWATCH_SERVER__LISTEN", &grpc),
    ]);
    assert!(out.status.success(), "gRPC fallback check failed");
    // The gRPC port speaks HTTP/2 only: no "200" there, so unhealthy.
    let out = healthcheck(&[("GPUWATCH_SERVER__HTTP_LISTEN", &grpc)]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a port without /healthz must be unhealthy"
    );

    daemon
        .stop()
        .unwrap_or_else(|e| panic!("gpuwatch-server on SIGTERM: {e}"));
    let out = healthcheck(&[("GPUWATCH_SERVER__HTTP_LISTEN", &http)]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped daemon must be unhealthy"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/healthz"));
    let out = healthcheck(&[
        ("GPUWATCH_SERVER__HTTP_LISTEN", "off"),
        ("GPUWATCH_SERVER__LISTEN", &grpc),
    ]);
    assert_eq!(out.status.code(), Some(1));
}
