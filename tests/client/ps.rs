//! Black-box tests of `gpuwatch-client ps` (and the attribution parts of
//! `snapshot --json`), against simulated daemons whose workloads the tests
//! declare: every expectation below comes from [`SCENARIO`], not from a
//! daemon's output.

use std::time::{Duration, Instant};

use crate::support::{Run, closed_port, run_client};
use serde_json::Value;

/// Three GPUs: a pod and a Slurm step on an H100; an A100 in MIG mode with
/// a pod process in one instance and a notebook allocated the other but
/// running nothing; a unit and a bare Docker container on a 4090.
const SCENARIO: &str = r#"
[[simulator.gpus]]
preset = "h100-sxm"
processes = [
  { pid = 5100, name = "python3", uid = 1000, user = "alice", memory_mib = 20000, namespace = "ml", pod = "trainer-0", container = "main" },
  { pid = 5101, name = "train.py", uid = 1001, user = "bob", memory_mib = 10000, slurm_job = "4242", slurm_step = "1" },
]

[[simulator.gpus]]
preset = "a100-sxm"
mig = { enabled = true, instances = ["3g.40gb", "1g.10gb"] }
processes = [
  { pid = 5200, name = "tritonserver", memory_mib = 8000, mig_instance = 0, namespace = "serving", pod = "triton-0", container = "triton" },
]
allocations = [ { namespace = "research", pod = "notebook-1", container = "jupyter", mig_instance = 1 } ]

[[simulator.gpus]]
preset = "rtx-4090"
processes = [
  { pid = 5300, name = "blender", uid = 1002, user = "carol", memory_mib = 3000, unit = "render.service" },
  { pid = 5301, name = "ffmpeg", memory_mib = 500, container_id = "abcdef0123456789abcdef0123456789", runtime = "docker" },
]
"#;

/// Rows the scenario declares: 5 processes and 1 idle allocation.
const ROWS: usize = 6;

/// Runs `ps` until `done` holds of its output (processes and their owners
/// are read on the daemon's slow cadence, so a just-started daemon may not
/// have them yet), or fails after 30 s with the last output.
fn ps_until(args: &[&str], done: impl Fn(&Run) -> bool) -> Run {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = run_client(args);
        if done(&run) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "ps {args:?} never settled: code {:?}\nstdout: {}\nstderr: {}",
            run.code,
            run.stdout,
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn attributed_rows(run: &Run) -> usize {
    run.json_lines()
        .iter()
        .filter(|v| v.get("owner").is_some())
        .count()
}

fn row_of(rows: &[Value], pid: u64) -> &Value {
    rows.iter()
        .find(|r| r["pid"].as_u64() == Some(pid))
        .unwrap_or_else(|| panic!("no row for pid {pid}: {rows:#?}"))
}

#[test]
fn ps_json_has_a_typed_row_per_process_and_idle_allocation() {
    let daemon = crate::support::start(Some(SCENARIO));
    let host = daemon.host();
    let run = ps_until(&["ps", "--json", &host], |r| {
        r.code == Some(0) && attributed_rows(r) == ROWS
    });
    let rows = run.json_lines();
    assert_eq!(rows.len(), ROWS, "{rows:#?}");
    for r in &rows {
        assert_eq!(r["host"], host.as_str());
        assert!(
            r["gpu_uuid"]
                .as_str()
                .is_some_and(|u| u.starts_with("GPU-"))
        );
    }

    let pod = row_of(&rows, 5100);
    assert_eq!(pod["row"], "process");
    assert_eq!(pod["gpu_index"], 0);
    assert_eq!(pod["name"], "python3");
    assert_eq!(pod["user"], "alice");
    assert_eq!(pod["uid"], 1000);
    assert_eq!(pod["used_memory_mib"], 20000);
    assert_eq!(pod["owner"], "ml/trainer-0/main");
    assert_eq!(pod["owner_kind"], "pod");
    assert_eq!(
        (&pod["namespace"], &pod["pod"], &pod["container"]),
        (
            &Value::from("ml"),
            &Value::from("trainer-0"),
            &Value::from("main")
        )
    );
    assert_eq!(pod["device_id"], pod["gpu_uuid"], "not in a MIG instance");
    assert!(pod.get("mig_uuid").is_none() && pod.get("idle").is_none());
    // Command lines are off by default: absent, never an empty string.
    assert!(pod.get("command_line").is_none(), "{pod}");

    let job = row_of(&rows, 5101);
    assert_eq!(job["gpu_index"], 0);
    assert_eq!(job["owner"], "slurm:4242.1");
    assert_eq!(job["owner_kind"], "slurm");
    assert_eq!(
        (&job["slurm_job"], &job["slurm_step"]),
        (&"4242".into(), &"1".into())
    );
    assert!(job.get("namespace").is_none(), "{job}");

    let triton = row_of(&rows, 5200);
    assert_eq!(triton["gpu_index"], 1);
    assert_eq!(triton["mig_profile"], "3g.40gb");
    let mig = triton["mig_uuid"].as_str().expect("a MIG UUID");
    assert!(mig.starts_with("MIG-"), "{mig}");
    assert_eq!(triton["device_id"], mig);
    assert_eq!(triton["owner"], "serving/triton-0/triton");

    let idle = rows
        .iter()
        .find(|r| r["row"] == "allocation")
        .expect("the idle allocation's row");
    assert!(idle.get("pid").is_none(), "{idle}");
    assert_eq!(idle["idle"], true);
    assert_eq!(idle["gpu_index"], 1);
    assert_eq!(idle["mig_profile"], "1g.10gb");
    assert_ne!(idle["mig_uuid"], triton["mig_uuid"]);
    assert_eq!(idle["owner"], "research/notebook-1/jupyter");
    assert!(idle["resource_name"].is_string());

    let unit = row_of(&rows, 5300);
    assert_eq!(unit["gpu_index"], 2);
    assert_eq!(unit["owner"], "render.service");
    assert_eq!(unit["owner_kind"], "unit");
    assert_eq!(unit["systemd_unit"], "render.service");

    let docker = row_of(&rows, 5301);
    assert_eq!(docker["owner_kind"], "container");
    assert_eq!(docker["owner"], "abcdef012345", "docker ps's short id");
    assert_eq!(docker["container_id"], "abcdef0123456789abcdef0123456789");
    assert_eq!(docker["container_runtime"], "docker");
    assert!(docker.get("user").is_none(), "no user declared: {docker}");
}

#[test]
fn ps_table_names_owners_and_marks_idle_allocations() {
    let daemon = crate::support::start(Some(SCENARIO));
    let host = daemon.host();
    ps_until(&["ps", "--json", &host], |r| attributed_rows(r) == ROWS);
    let run = run_client(&["ps", &host]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let mut lines = run.stdout.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["HOST", "GPU", "PID", "USER", "NAME", "OWNER", "MEM", "SM%"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), ROWS, "{}", run.stdout);
    let by_pid = |pid: &str| {
        rows.iter()
            .find(|r| r.contains(&pid))
            .unwrap_or_else(|| panic!("no row for {pid}: {}", run.stdout))
    };
    assert_eq!(
        by_pid("5100")[..7],
        [
            host.as_str(),
            "0",
            "5100",
            "alice",
            "python3",
            "ml/trainer-0/main",
            "20000"
        ]
    );
    assert!(by_pid("5101").contains(&"slurm:4242.1"));
    // The MIG instance reads as GPU/MIG PROFILE.
    assert_eq!(by_pid("5200")[1..3], ["1/MIG", "3g.40gb"]);
    assert!(by_pid("5200").contains(&"serving/triton-0/triton"));
    assert!(by_pid("5300").contains(&"render.service"));
    assert!(by_pid("5301").contains(&"abcdef012345"));
    let idle = rows
        .iter()
        .find(|r| r.contains(&"<idle>"))
        .expect("an <idle> row");
    assert_eq!(
        idle[..],
        [
            host.as_str(),
            "1/MIG",
            "1g.10gb",
            "-",
            "-",
            "<idle>",
            "research/notebook-1/jupyter",
            "-",
            "-"
        ]
    );
}

#[test]
fn ps_across_two_hosts_reports_the_dead_one_and_exits_1() {
    let live = crate::support::start(Some(SCENARIO));
    let dead = closed_port();
    let live_host = live.host();
    ps_until(&["ps", "--json", &live_host], |r| {
        attributed_rows(r) == ROWS
    });

    let run = run_client(&["ps", "--json", &live_host, &dead]);
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    let lines = run.json_lines();
    assert_eq!(
        lines
            .iter()
            .filter(|v| v["host"] == live_host.as_str())
            .count(),
        ROWS,
        "{lines:#?}"
    );
    let failure = lines
        .iter()
        .find(|v| v["host"] == dead.as_str())
        .expect("an error object for the dead host");
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{failure}"
    );
    assert!(failure.get("pid").is_none());

    let table = run_client(&["ps", &live_host, &dead]);
    assert_eq!(table.code, Some(1));
    assert_eq!(
        table
            .stdout
            .lines()
            .filter(|l| l.contains(&live_host))
            .count(),
        ROWS,
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with(&dead) && l.contains("error")),
        "{}",
        table.stdout
    );
}

#[test]
fn gpu_selectors_take_mig_uuids_and_narrow_ps_to_the_instance() {
    let daemon = crate::support::start(Some(SCENARIO));
    let host = daemon.host();
    let all = ps_until(&["ps", "--json", &host], |r| attributed_rows(r) == ROWS);
    let rows = all.json_lines();
    let idle_mig = rows
        .iter()
        .find(|r| r["row"] == "allocation")
        .and_then(|r| r["mig_uuid"].as_str())
        .expect("the idle instance's MIG UUID")
        .to_owned();

    // ps: only that instance's rows.
    let run = run_client(&["ps", "--json", &host, "--gpu", &idle_mig]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let only = run.json_lines();
    assert_eq!(only.len(), 1, "{only:#?}");
    assert_eq!(only[0]["owner"], "research/notebook-1/jupyter");

    // An index keeps the whole GPU; a MIG UUID and an index add up.
    let gpu0 = run_client(&["ps", "--json", &host, "--gpu", "0"]);
    let pids: Vec<u64> = gpu0
        .json_lines()
        .iter()
        .filter_map(|r| r["pid"].as_u64())
        .collect();
    assert_eq!(pids, [5100, 5101]);
    let both = run_client(&["ps", "--json", &host, "--gpu", &format!("0,{idle_mig}")]);
    assert_eq!(both.json_lines().len(), 3, "{}", both.stdout);

    // snapshot: the MIG UUID selects its parent GPU, whose record lists the
    // instances and the allocation.
    let snap = run_client(&["snapshot", "--json", &host, "--gpu", &idle_mig]);
    assert_eq!(snap.code, Some(0), "stderr: {}", snap.stderr);
    let samples = snap.json_lines();
    assert_eq!(samples.len(), 1, "{samples:#?}");
    let a100 = &samples[0];
    assert_eq!(a100["index"], 1);
    assert_eq!(a100["mig_enabled"], true);
    let profiles: Vec<&str> = a100["mig_instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|m| m["profile"].as_str())
        .collect();
    assert_eq!(profiles, ["3g.40gb", "1g.10gb"]);
    let notebook = a100["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .find(|a| a["pod"] == "notebook-1")
        .expect("the notebook's allocation");
    assert_eq!(notebook["idle"], true);
    assert_eq!(notebook["namespace"], "research");
    assert_eq!(notebook["device_ids"], serde_json::json!([idle_mig]));
    let triton = a100["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == 5200)
        .expect("triton");
    assert_eq!(triton["attribution"]["owner"], "serving/triton-0/triton");
    assert_eq!(triton["used_memory_mib"], 8000);

    // list: the parent GPU's MIG mode and instances, and the host's
    // attribution status.
    let list = run_client(&["list", "--json", &host, "--gpu", &idle_mig]);
    assert_eq!(list.code, Some(0), "stderr: {}", list.stderr);
    let devices = list.json_lines();
    assert_eq!(devices.len(), 1, "{devices:#?}");
    assert_eq!(devices[0]["index"], 1);
    assert_eq!(devices[0]["mig_enabled"], true);
    assert_eq!(
        devices[0]["mig_instances"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(devices[0]["attribution"]["enabled"], true);
    assert_eq!(devices[0]["attribution"]["source"], "simulator");

    // A GPU UUID is still a GPU UUID; a MIG UUID the daemon does not know
    // is refused by the daemon, not by the client's parser.
    let unknown = run_client(&[
        "ps",
        &host,
        "--gpu",
        "MIG-00000000-0000-0000-0000-000000000000",
    ]);
    assert_eq!(
        unknown.code,
        Some(1),
        "stdout {} stderr {}",
        unknown.stdout,
        unknown.stderr
    );
}

#[test]
fn events_carry_who_started_using_a_device_and_mig_changes() {
    let config = format!(
        "{SCENARIO}\n{}",
        r#"
[[simulator.gpus]]
preset = "h100-sxm"
mig = { enabled = true, instances = ["3g.40gb"], changes = [ { at = "1s", enabled = true, instances = ["7g.80gb"] } ] }
"#
    );
    let daemon = crate::support::start(Some(&config));
    let host = daemon.host();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (attribution, mig) = loop {
        let run = run_client(&[
            "events",
            "--json",
            &host,
            "--kind",
            "attribution_changed,mig_changed",
        ]);
        assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
        let lines = run.json_lines();
        let notebook = lines
            .iter()
            .find(|e| e["attribution"]["pod"] == "notebook-1")
            .cloned();
        let mig = lines.iter().find(|e| e["kind"] == "mig_changed").cloned();
        if let (Some(n), Some(m)) = (notebook, mig) {
            break (n, m);
        }
        assert!(Instant::now() < deadline, "events never came: {lines:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(attribution["kind"], "attribution_changed");
    assert_eq!(attribution["gpu_index"], 1);
    let change = &attribution["attribution"];
    assert_eq!(change["started"], true);
    assert_eq!(change["via"], "allocation");
    assert_eq!(change["namespace"], "research");
    assert!(
        change["device_id"]
            .as_str()
            .is_some_and(|d| d.starts_with("MIG-"))
    );
    assert_eq!(mig["gpu_index"], 3);

    let table = run_client(&["events", &host, "--kind", "attribution_changed,mig_changed"]);
    assert_eq!(table.code, Some(0));
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.contains("attribution_changed") && l.contains("notebook-1")),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("mig_changed"), "{}", table.stdout);
}
