//! Black-box tests of `gpuwatch-client record` and `watch --replay`: a
//! recording is a gzip file that replays every recorded sample, in order,
//! faster with --speed; what is not a recording is refused.

use std::time::{Duration, Instant};

use gpuwatch_testkit::Launch;

const FLEET: &str = r#"
[simulator]
gpus = [{ preset = "h100-sxm" }, { preset = "rtx-4090" }]

[sampler]
interval = "100ms"
"#;

#[test]
fn a_recording_replays_every_sample_in_order_and_faster() {
    let d = Launch::with_config(FLEET).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("run.gwrec");
    let file_arg = file.to_str().expect("utf-8 path");
    let run = crate::support::run_client(&[
        "record",
        &d.host(),
        "--out",
        file_arg,
        "--interval",
        "100ms",
        "--duration",
        "3s",
    ]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let bytes = std::fs::read(&file).expect("the recording exists");
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip-compressed");

    let started = Instant::now();
    let replay =
        crate::support::run_client(&["watch", "--replay", file_arg, "--speed", "10", "--json"]);
    let took = started.elapsed();
    assert_eq!(replay.code, Some(0), "stderr: {}", replay.stderr);
    assert!(
        took < Duration::from_secs(3),
        "10x faster than the 3 s recorded: {took:?}"
    );
    let lines = replay.json_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "connected" && l["host"] == d.host()),
        "the stream's start is replayed: {lines:#?}"
    );
    for gpu in [0, 1] {
        let seqs: Vec<u64> = lines
            .iter()
            .filter(|l| l["index"] == gpu && l.get("temperature_c").is_some())
            .map(|l| l["seq"].as_u64().expect("seq"))
            .collect();
        assert!(
            seqs.len() >= 15,
            "GPU {gpu}: {} samples replayed",
            seqs.len()
        );
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    }
}

#[test]
fn a_file_that_is_not_a_recording_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "not a recording").expect("write");
    let run =
        crate::support::run_client(&["watch", "--replay", file.to_str().expect("utf-8 path")]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("not a gpuwatch recording"),
        "{}",
        run.stderr
    );
}
