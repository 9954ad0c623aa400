//! The dashboard at `/` and its data endpoints, against a real daemon: the
//! page is self-contained, the JSON snapshot holds what the charts need, and
//! the server-sent-events stream starts with a snapshot, keeps delivering
//! frames in order, carries events, and ends when the daemon stops.
//!
//! That the page draws and updates in a real browser is checked by
//! `.ci/dashboard.sh` (headless Chromium).

use std::time::Duration;

use crate::http_support::{Daemon, SseReader, eventually, get};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);
const NEXT: Duration = Duration::from_secs(30);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("the test took too long");
}

const FLEET: &str = r#"
[simulator]
speed = 5.0

[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "0s", watts = 650.0 } ]

[[simulator.gpus]]
preset = "laptop"
demand = [ { at = "0s", watts = 90.0 } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained_and_forbids_loading_anything_else() {
    bounded(async {
        let d = Daemon::start(Some(FLEET));
        let page = get(&d.url("/"), None).await;
        assert_eq!(page.status, 200);
        assert!(page.header("content-type").starts_with("text/html"));
        let csp = page.header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        // No external URL anywhere: no script or stylesheet from elsewhere.
        for needle in [
            "http://",
            "https://",
            "//cdn",
            "<script src",
            "<link rel=\"stylesheet\"",
        ] {
            assert!(!page.body.contains(needle), "the page mentions {needle}");
        }
        for hook in [
            "data-updated",
            "data-points",
            "api/v1/stream",
            "getContext(\"2d\")",
        ] {
            assert!(page.body.contains(hook), "the page lacks {hook}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_holds_devices_policies_history_and_events() {
    bounded(async {
        let d = Daemon::start(Some(FLEET));
        let snap: Value = eventually(LIMIT, "a few frames of history", || async {
            let r = get(&d.url("/api/v1/dashboard"), None).await;
            assert_eq!(r.status, 200);
            assert!(r.header("content-type").starts_with("application/json"));
            let v: Value = serde_json::from_str(&r.body).expect("JSON");
            (v["history"][0]["t_ms"].as_array().map_or(0, Vec::len) >= 5).then_some(v)
        })
        .await;
        let gpus = snap["gpus"].as_array().expect("gpus");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
        assert!(
            gpus[0]["policy"]["threshold_c"]
                .as_u64()
                .is_some_and(|t| t > 30)
        );
        assert!(gpus[0]["power_max_w"].as_f64().is_some_and(|w| w > 600.0));
        assert!(
            gpus[1].get("power_max_w").is_none(),
            "the laptop GPU reports no power limits: {}",
            gpus[1]
        );
        for column in snap["history"].as_array().expect("history") {
            let n = column["t_ms"].as_array().expect("t_ms").len();
            for key in ["temperature_c", "power_draw_w", "power_limit_w"] {
                assert_eq!(column[key].as_array().expect(key).len(), n, "{key}");
            }
        }
        // The laptop's limit is absent, so its limit column is all nulls.
        let laptop = &snap["history"][1];
        assert!(
            laptop["power_limit_w"]
                .as_array()
                .expect("column")
                .iter()
                .all(Value::is_null)
        );
        assert!(
            laptop["temperature_c"]
                .as_array()
                .expect("column")
                .iter()
                .any(Value::is_u64)
        );
        let latest = &snap["latest"];
        assert_eq!(latest["seq"], snap["latest_seq"]);
        assert_eq!(latest["gpus"][0]["health"], "ok");
        assert!(
            snap["events"]
                .as_array()
                .expect("events")
                .iter()
                .any(|e| e["kind"] == "daemon_started"),
            "{}",
            snap["events"]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_starts_with_a_snapshot_then_frames_in_order() {
    bounded(async {
        let d = Daemon::start(Some(FLEET));
        let mut stream = SseReader::open(&d.url("/api/v1/stream?interval_ms=300")).await;
        let first = stream.next(NEXT).await.expect("a first message");
        assert_eq!(first.event, "snapshot");
        let snap: Value = serde_json::from_str(&first.data).expect("snapshot JSON");
        assert_eq!(snap["gpus"].as_array().map(Vec::len), Some(2));
        assert_eq!(snap["stream_interval_ms"], 300);
        let mut last = snap["latest_seq"].as_u64().expect("latest_seq");
        let mut frames = 0;
        while frames < 4 {
            let m = stream.next(NEXT).await.expect("the stream continues");
            if m.event != "frame" {
                continue;
            }
            let frame: Value = serde_json::from_str(&m.data).expect("frame JSON");
            let seq = frame["seq"].as_u64().expect("seq");
            assert_eq!(m.id.as_deref(), Some(seq.to_string().as_str()));
            if last != 0 {
                assert!(seq >= last + 3, "300 ms at 100 ms ticks: {last} then {seq}");
            }
            last = seq;
            assert_eq!(frame["gpus"].as_array().map(Vec::len), Some(2));
            assert!(frame["gpus"][0]["temperature_c"].is_u64());
            assert!(
                frame["gpus"][1].get("power_limit_w").is_none(),
                "absent stays absent"
            );
            frames += 1;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_stream_as_they_happen() {
    bounded(async {
        let d = Daemon::start(Some(
            r#"
[simulator]
[[simulator.gpus]]
preset = "a100-sxm"
lost_at = "3s"
"#,
        ));
        let mut stream = SseReader::open(&d.url("/api/v1/stream")).await;
        assert_eq!(stream.next(NEXT).await.expect("snapshot").event, "snapshot");
        let lost = loop {
            let m = stream.next(NEXT).await.expect("the stream continues");
            if m.event == "event" {
                let e: Value = serde_json::from_str(&m.data).expect("event JSON");
                if e["kind"] == "gpu_lost" {
                    break e;
                }
            }
        };
        assert_eq!(lost["gpu_index"], 0);
        assert_eq!(lost["actor_kind"], "device");
        // Frames after it say the GPU is lost, with no readings.
        loop {
            let m = stream.next(NEXT).await.expect("the stream continues");
            if m.event == "frame" {
                let f: Value = serde_json::from_str(&m.data).expect("frame JSON");
                let gpu = &f["gpus"][0];
                if gpu["health"] == "lost" {
                    assert!(gpu.get("temperature_c").is_none(), "{gpu}");
                    break;
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stream_interval_is_refused_with_the_allowed_range() {
    bounded(async {
        let d = Daemon::start(Some(FLEET));
        let r = get(&d.url("/api/v1/stream?interval_ms=5"), None).await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("between 100 and 60000"), "{}", r.body);
        let r = get(&d.url("/api/v1/stream?interval=1s"), None).await;
        assert_eq!(r.status, 400, "unknown parameters are refused: {}", r.body);
        assert!(r.body.contains("interval"), "{}", r.body);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_and_the_daemon_exits_cleanly_on_sigterm() {
    bounded(async {
        let mut d = Daemon::start(Some(FLEET));
        let mut stream = SseReader::open(&d.url("/api/v1/stream")).await;
        assert_eq!(stream.next(NEXT).await.expect("snapshot").event, "snapshot");
        d.terminate();
        // The stream ends (rather than holding the shutdown open).
        while stream.next(NEXT).await.is_some() {}
        let status = tokio::task::spawn_blocking(move || d.wait_exit(Duration::from_secs(30)))
            .await
            .expect("join");
        let status = status.expect("the daemon exits after SIGTERM");
        assert!(status.success(), "exit status {status}");
    })
    .await;
}

/// A pod and a Slurm step sharing an H100, and an A100 in MIG mode: a pod
/// process in one instance, a notebook allocated the other, idle.
const WORKLOADS: &str = r#"
[[simulator.gpus]]
preset = "h100-sxm"
processes = [
  { pid = 6100, name = "python3", user = "alice", uid = 1000, memory_mib = 20480, namespace = "ml", pod = "trainer-0", container = "main" },
  { pid = 6101, name = "python3", user = "alice", uid = 1000, memory_mib = 10240, namespace = "ml", pod = "trainer-0", container = "main" },
  { pid = 6102, name = "train.py", user = "bob", uid = 1001, memory_mib = 1024, slurm_job = "4242", slurm_step = "0" },
]

[[simulator.gpus]]
preset = "a100-sxm"
mig = { enabled = true, instances = ["3g.40gb", "1g.10gb"] }
processes = [ { pid = 6200, name = "tritonserver", memory_mib = 8000, mig_instance = 0, namespace = "serving", pod = "triton-0", container = "triton" } ]
allocations = [ { namespace = "research", pod = "notebook-1", container = "jupyter", mig_instance = 1 } ]
"#;

/// Whether any owner in `v` is a bare process (not yet attributed).
fn names_an_unattributed_owner(v: &Value) -> bool {
    match v {
        Value::Object(o) => {
            o.get("kind").and_then(Value::as_str) == Some("process")
                || o.values().any(names_an_unattributed_owner)
        }
        Value::Array(a) => a.iter().any(names_an_unattributed_owner),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_card_names_who_runs_on_its_gpu_and_mig_instances() {
    bounded(async {
        let d = Daemon::start(Some(WORKLOADS));
        let snap: Value = eventually(LIMIT, "the GPUs' users", || async {
            let r = get(&d.url("/api/v1/dashboard"), None).await;
            let v: Value = serde_json::from_str(&r.body).expect("JSON");
            // Processes are listed from the first slow reading; their
            // owners join once the attribution thread has read them.
            let ready = v["latest"]["gpus"].as_array().is_some_and(|g| {
                g.len() == 2 && g.iter().all(|p| p["users"]["processes"].as_u64() > Some(0))
            }) && !names_an_unattributed_owner(&v["latest"]);
            ready.then_some(v)
        })
        .await;
        let points = snap["latest"]["gpus"].as_array().expect("points");
        let h100 = &points.iter().find(|p| p["index"] == 0).expect("GPU 0")["users"];
        assert_eq!(h100["processes"], 3);
        let owners = h100["owners"].as_array().expect("owners");
        assert_eq!(owners.len(), 2, "one entry per owner: {owners:#?}");
        let trainer = &owners[0];
        assert_eq!(trainer["owner"], "ml/trainer-0/main");
        assert_eq!(trainer["kind"], "pod");
        assert_eq!(trainer["processes"], 2);
        assert_eq!(trainer["names"], serde_json::json!(["python3"]));
        assert_eq!(trainer["memory_bytes"], (20480u64 + 10240) << 20);
        assert_eq!(owners[1]["owner"], "slurm:4242.0");
        assert!(
            h100.get("mig").is_none() && h100.get("idle").is_none(),
            "{h100}"
        );

        let a100 = &points.iter().find(|p| p["index"] == 1).expect("GPU 1")["users"];
        assert_eq!(a100["processes"], 1);
        assert_eq!(
            a100["owners"],
            serde_json::json!([]),
            "all in MIG instances"
        );
        let mig = a100["mig"].as_array().expect("MIG instances");
        assert_eq!(mig.len(), 2);
        assert_eq!(mig[0]["profile"], "3g.40gb");
        assert_eq!(mig[0]["owners"][0]["owner"], "serving/triton-0/triton");
        assert_eq!(mig[0]["memory_used_bytes"], 8000u64 << 20);
        assert!(mig[0]["memory_total_bytes"].as_u64() > mig[0]["memory_used_bytes"].as_u64());
        assert_eq!(mig[1]["profile"], "1g.10gb");
        assert_eq!(mig[1]["owners"], serde_json::json!([]));
        assert_eq!(
            mig[1]["idle"],
            serde_json::json!(["research/notebook-1/jupyter"])
        );

        // The page draws them: the hooks the browser check reads are there.
        let page = get(&d.url("/"), None).await.body;
        for hook in ["data-owner", "data-processes", "data-mig", "idle: "] {
            assert!(page.contains(hook), "the page lacks {hook}");
        }
    })
    .await;
}
