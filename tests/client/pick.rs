//! Black-box tests of `pick` and `release`: the best GPUs over several real
//! daemons, `HOST CUDA_VISIBLE_DEVICES=…` lines or JSON, exit 1 with the
//! criteria that ruled GPUs out, leases that keep a second pick away, and
//! `release` ending them wherever they are held.

use gpuwatch_testkit::{LEASE_TOKEN, READ_TOKEN};

use crate::support::{run_client, run_client_env};

/// Two idle H100s.
const TWO_H100: &str = r#"
[simulator]
gpus = [{ preset = "h100-sxm" }, { preset = "h100-sxm" }]
"#;

#[test]
fn pick_prints_cuda_visible_devices_per_host_and_fails_naming_the_criteria() {
    let a = crate::support::start(Some(TWO_H100));
    let b = crate::support::start(Some(TWO_H100));
    let (ha, hb) = (a.host(), b.host());

    let run = run_client_env(
        &["pick", &ha, &hb, "--count", "3", "--allow-busy"],
        &[("GPUWATCH_TOKEN", READ_TOKEN)],
    );
    assert_eq!(
        run.code,
        Some(0),
        "stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "both hosts get GPUs: {}", run.stdout);
    let mut total = 0;
    for line in &lines {
        let (host, env) = line.split_once(' ').expect("HOST CUDA_VISIBLE_DEVICES=…");
        assert!(host == ha || host == hb, "{line}");
        let devices = env
            .strip_prefix("CUDA_VISIBLE_DEVICES=")
            .expect("the variable");
        total += devices.split(',').filter(|d| d.starts_with("GPU-")).count();
    }
    assert_eq!(total, 3);

    // 1 TiB free memory: nothing fits; exit 1 and the reasons on stderr.
    let none = run_client_env(
        &[
            "pick",
            &ha,
            &hb,
            "--count",
            "2",
            "--min-free",
            "1TiB",
            "--allow-busy",
        ],
        &[("GPUWATCH_TOKEN", READ_TOKEN)],
    );
    assert_eq!(none.code, Some(1), "stderr {}", none.stderr);
    assert!(none.stdout.is_empty());
    assert!(
        none.stderr.contains("0 of 2 wanted") && none.stderr.contains("free_memory"),
        "{}",
        none.stderr
    );
    assert!(none.stderr.contains(&ha) && none.stderr.contains(&hb));

    // A size that is not one is a usage error.
    let bad = run_client(&["pick", &ha, "--min-free", "20 parsecs"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}

#[test]
fn a_leased_pick_keeps_the_next_pick_away_until_released() {
    let a = crate::support::start(Some(TWO_H100));
    let ha = a.host();
    let lease = [("GPUWATCH_TOKEN", LEASE_TOKEN)];

    let first = run_client_env(
        &[
            "pick",
            &ha,
            "--count",
            "2",
            "--allow-busy",
            "--lease",
            "10m",
            "--json",
        ],
        &lease,
    );
    assert_eq!(first.code, Some(0), "stderr {}", first.stderr);
    let records = first.json_lines();
    assert_eq!(records.len(), 1);
    let leases = records[0]["leases"].as_array().expect("leases").clone();
    assert_eq!(leases.len(), 2, "{}", records[0]);
    assert_eq!(records[0]["gpus"].as_array().map(Vec::len), Some(2));
    assert!(leases.iter().all(|l| l["holder"] == "scheduler"));

    // Both GPUs are held: a second pick finds nothing and says why.
    let second = run_client_env(&["pick", &ha, "--allow-busy", "--lease", "1m"], &lease);
    assert_eq!(second.code, Some(1), "stdout {}", second.stdout);
    assert!(second.stderr.contains("lease"), "{}", second.stderr);

    // A read token cannot lease.
    let read = run_client_env(
        &["pick", &ha, "--allow-busy", "--lease", "1m"],
        &[("GPUWATCH_TOKEN", READ_TOKEN)],
    );
    assert_eq!(read.code, Some(1));

    // Release one by id; then exactly one GPU can be picked again.
    let id = leases[0]["id"].as_str().expect("id").to_owned();
    let released = run_client_env(&["release", &ha, "--lease", &id], &lease);
    assert_eq!(released.code, Some(0), "stderr {}", released.stderr);
    assert!(released.stdout.contains(&id), "{}", released.stdout);
    let again = run_client_env(&["pick", &ha, "--allow-busy", "--lease", "1m"], &lease);
    assert_eq!(again.code, Some(0), "stderr {}", again.stderr);
    let line = again.stdout.trim();
    assert!(
        line.contains(" CUDA_VISIBLE_DEVICES=GPU-") && line.contains(" GPUWATCH_LEASES="),
        "{line}"
    );
    assert!(
        line.contains(leases[0]["uuid"].as_str().expect("uuid")),
        "the released GPU is the one picked: {line}"
    );

    // Releasing an id no host holds fails.
    let gone = run_client_env(&["release", &ha, "--lease", &id], &lease);
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains("not held"), "{}", gone.stderr);
}

/// A name that resolves to two loopback addresses (the test resolver hook)
/// stands for both daemons, in every command: here snapshot and pick.
#[test]
fn a_name_with_several_addresses_reaches_every_daemon() {
    let a = crate::support::start(Some(TWO_H100));
    let port = a.host().rsplit(':').next().expect("port").to_owned();
    // The second daemon on the same port, on another loopback address.
    let b = gpuwatch_testkit::Launch {
        config: Some(TWO_H100.to_owned()),
        listen: format!("127.0.0.2:{port}").parse().expect("addr"),
        ..gpuwatch_testkit::Launch::default()
    }
    .start();
    let name = format!("fleet.test:{port}");
    let resolve = [
        // client/hosts.rs TEST_RESOLVE_ENV.
        ("GPUWATCH_TEST_RESOLVE", "fleet.test=127.0.0.1,127.0.0.2"),
        ("GPUWATCH_TOKEN", READ_TOKEN),
    ];
    let snap = run_client_env(&["snapshot", &name, "--json"], &resolve);
    assert_eq!(snap.code, Some(0), "stderr {}", snap.stderr);
    let hosts: std::collections::BTreeSet<String> = snap
        .json_lines()
        .iter()
        .filter_map(|v| v["host"].as_str().map(str::to_owned))
        .collect();
    let want: std::collections::BTreeSet<String> = [
        format!("fleet.test/127.0.0.1:{port}"),
        format!("fleet.test/127.0.0.2:{port}"),
    ]
    .into();
    assert_eq!(hosts, want);
    let pick = run_client_env(&["pick", &name, "--count", "4", "--allow-busy"], &resolve);
    assert_eq!(pick.code, Some(0), "stderr {}", pick.stderr);
    assert_eq!(pick.stdout.lines().count(), 2, "{}", pick.stdout);
    // The same through --k8s-service NAME.NAMESPACE: the Service's cluster
    // DNS name, expanded to every pod behind it.
    let service = format!("gpuwatch.gpus:{port}");
    let k8s = run_client_env(
        &["list", "--k8s-service", &service, "--json"],
        &[
            (
                "GPUWATCH_TEST_RESOLVE",
                "gpuwatch.gpus.svc.cluster.local=127.0.0.1,127.0.0.2",
            ),
            ("GPUWATCH_TOKEN", READ_TOKEN),
        ],
    );
    assert_eq!(k8s.code, Some(0), "stderr {}", k8s.stderr);
    let hosts: std::collections::BTreeSet<String> = k8s
        .json_lines()
        .iter()
        .filter_map(|v| v["host"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert!(
        hosts
            .iter()
            .all(|h| h.starts_with("gpuwatch.gpus.svc.cluster.local/127.0.0."))
    );
    drop(b);
}
