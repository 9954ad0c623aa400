//! The state directory under faults, through the real daemon (issue 12):
//! a change that cannot be made durable is never answered OK and what was
//! durable survives a restart; the operator's hysteresis survives exactly;
//! a second daemon, a read-only directory or an unreadable event log is
//! refused at start (exit 73) instead of silently starting a new history;
//! a token file others can read is refused; saved values out of range for
//! a GPU are dropped with a warning naming it.

use std::{path::Path, time::Duration};

use gpuwatch_api::{self as api, EventKind};
use gpuwatch_testkit::{Launch, LaunchError};

use crate::support::{Client, Options, events_since, index, sim_config};

fn one_h100() -> String {
    sim_config(
        1.0,
        "[sampler]\ninterval = \"100ms\"\n",
        &["preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 300 } ]"],
    )
}

async fn set_watts(
    c: &mut Client,
    watts: f64,
) -> Result<api::SetPowerLimitResponse, tonic::Status> {
    c.set_power_limit(api::SetPowerLimitRequest {
        gpus: vec![index(0)],
        target: Some(api::set_power_limit_request::Target::Watts(watts)),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn policy(c: &mut Client) -> api::GpuPolicy {
    c.get_policy(api::GetPolicyRequest {
        gpus: vec![index(0)],
    })
    .await
    .expect("policy")
    .into_inner()
    .policies
    .remove(0)
}

/// Starts a daemon expected to refuse to start; its error (with the exit
/// status and log).
fn refused_start(state_dir: &Path, config: Option<String>) -> String {
    let launch = Launch {
        config,
        state_dir: Some(state_dir.to_path_buf()),
        ..Launch::default()
    };
    match launch.try_start() {
        Ok(_) => panic!("the daemon started on {}", state_dir.display()),
        Err(LaunchError(text)) => text,
    }
}

/// True when permissions are enforced for this user (not root).
fn permissions_enforced(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe");
    std::fs::create_dir(&probe).expect("mkdir");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let enforced = std::fs::write(probe.join("x"), "x").is_err();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let _ = std::fs::remove_dir_all(&probe);
    if !enforced {
        eprintln!("running as root: file permissions are not enforced; skipped");
    }
    enforced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_cannot_be_made_durable_is_an_error_and_the_durable_ceiling_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut d = crate::support::start(
        &state,
        Options {
            http: true,
            ..Options::with_config(one_h100())
        },
    );
    let mut c = d.client().await;
    set_watts(&mut c, 500.0)
        .await
        .expect("a durable change is OK");

    // The disk refuses the next save: its temporary file cannot be created.
    let blocker = state.join("state.json.tmp");
    std::fs::create_dir(&blocker).expect("a directory where the temporary file goes");
    let err = set_watts(&mut c, 400.0)
        .await
        .expect_err("a change that is not durable is not an OK");
    assert!(
        err.message().contains("state.json"),
        "the error names the state file: {err:?}"
    );

    // An event and a metric say persistence is failing (the writer records
    // the event right after it answers the failed save).
    let events =
        crate::support::eventually(Duration::from_secs(10), "a PERSIST_FAILED event", || {
            let mut c = c.clone();
            async move {
                let events = events_since(&mut c, 0).await;
                events
                    .iter()
                    .any(|e| e.kind() == EventKind::PersistFailed)
                    .then_some(events)
            }
        })
        .await;
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::PersistFailed)
        .collect();
    assert_eq!(failed.len(), 1, "announced once: {events:#?}");
    assert!(failed[0].reason.contains("state.json.tmp"), "{failed:?}");
    let metrics =
        crate::http_support::get_bearer(&d.http_url("/metrics"), gpuwatch_testkit::READ_TOKEN)
            .await;
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("gpuwatch_persist_failing{file=\"state.json\"} 1")),
        "{}",
        metrics.body
    );

    // Restart (the blocker still there): the ceiling is what was durable.
    d.restart();
    let mut c = d.client().await;
    assert_eq!(policy(&mut c).await.operator_ceiling_mw, Some(500_000));
    let events = events_since(&mut c, 0).await;
    assert!(
        events.iter().any(|e| e.kind() == EventKind::PersistFailed),
        "the failure is still in the event log after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_hysteresis_survives_a_new_threshold_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::with_config(one_h100()));
    let mut c = d.client().await;
    for (celsius, hysteresis_c) in [(75, Some(8)), (76, None)] {
        c.set_threshold(api::SetThresholdRequest {
            gpus: vec![index(0)],
            target: Some(api::set_threshold_request::Target::Celsius(celsius)),
            hysteresis_c,
        })
        .await
        .expect("threshold");
    }
    let before = policy(&mut c).await;
    assert_eq!((before.threshold_c, before.hysteresis_c), (76, 8));
    d.stop().expect("clean stop");
    d.restart();
    let mut c = d.client().await;
    let after = policy(&mut c).await;
    assert_eq!(
        (after.threshold_c, after.hysteresis_c),
        (76, 8),
        "what the operator set comes back exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = crate::support::start(dir.path(), Options::with_config(one_h100()));
    let before = std::fs::read_to_string(dir.path().join("state.json")).ok();
    let error = refused_start(dir.path(), Some(one_h100()));
    assert!(error.contains("exit status: 73"), "{error}");
    assert!(
        error.contains(&format!("pid {}", first.pid())),
        "names the other process: {error}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state.json")).ok(),
        before,
        "the second daemon wrote nothing"
    );
    let mut c = first.client().await;
    let events = events_since(&mut c, 0).await;
    assert!(
        events.windows(2).all(|w| w[0].seq < w[1].seq),
        "no seq handed out twice"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind() == EventKind::DaemonStarted)
            .count(),
        1,
        "the second daemon recorded nothing in the first one's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_dir_is_refused_with_exit_73_and_its_history_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    if !permissions_enforced(dir.path()) {
        return;
    }
    let state = dir.path().join("state");
    let mut d = crate::support::start(&state, Options::with_config(one_h100()));
    d.stop().expect("clean stop");
    let history = std::fs::read_to_string(state.join("events.log")).expect("a history");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let error = refused_start(&state, Some(one_h100()));
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(error.contains("exit status: 73"), "{error}");
    assert!(
        error.contains(&state.display().to_string()),
        "names it: {error}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("events.log")).expect("still there"),
        history
    );

    // A directory that cannot be created at all (under a read-only one).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let error = refused_start(&dir.path().join("new"), Some(one_h100()));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(error.contains("exit status: 73"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_event_log_is_refused_not_restarted_at_seq_1() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    if !permissions_enforced(dir.path()) {
        return;
    }
    let mut d = crate::support::start(dir.path(), Options::with_config(one_h100()));
    d.stop().expect("clean stop");
    let log = dir.path().join("events.log");
    for mode in [0o000, 0o400] {
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let error = refused_start(dir.path(), Some(one_h100()));
        assert!(error.contains("exit status: 73"), "mode {mode:o}: {error}");
        assert!(error.contains("events.log"), "names the file: {error}");
    }
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let d = crate::support::start(dir.path(), Options::with_config(one_h100()));
    let mut c = d.client().await;
    let events = events_since(&mut c, 0).await;
    assert_eq!(
        events.first().map(|e| e.seq),
        Some(1),
        "the history is whole"
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind() == EventKind::DaemonStarted)
            .count()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_others_can_read_is_refused_naming_the_file_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[tokens]]\nname = \"ops\"\nrole = \"control\"\ntoken = \"0123456789abcdef0123\"\n",
    )
    .expect("write");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let launch = Launch {
        config: Some(format!(
            "{}\n[auth]\ntoken_file = \"{}\"\n",
            one_h100(),
            tokens.display()
        )),
        tokens: false,
        state_dir: Some(dir.path().join("state")),
        ..Launch::default()
    };
    let error = match launch.try_start() {
        Ok(_) => panic!("started with a token file others can read"),
        Err(LaunchError(text)) => text,
    };
    assert!(error.contains("exit status: 64"), "{error}");
    assert!(error.contains(&tokens.display().to_string()), "{error}");
    assert!(error.contains("0644"), "names the mode: {error}");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    launch.try_start().expect("starts with mode 0600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_values_out_of_range_are_dropped_with_a_warning_naming_the_gpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(one_h100()));
    let uuid = d
        .client()
        .await
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("devices")
        .into_inner()
        .devices[0]
        .uuid
        .clone();
    drop(d);
    std::fs::write(
        dir.path().join("state.json"),
        format!(
            r#"{{"version":1,"gpus":{{"{uuid}":{{"operator_ceiling_mw":0,"threshold_c":500,"hysteresis_c":0}}}}}}"#
        ),
    )
    .expect("a hand-edited state file");
    let d = crate::support::start(dir.path(), Options::with_config(one_h100()));
    let mut c = d.client().await;
    let warnings: Vec<_> = events_since(&mut c, 0)
        .await
        .into_iter()
        .filter(|e| e.kind() == EventKind::StateDamaged && e.gpu_index == Some(0))
        .collect();
    assert_eq!(warnings.len(), 3, "one per value: {warnings:#?}");
    for needle in ["0 mW", "500 °C", "hysteresis of 0"] {
        assert!(
            warnings
                .iter()
                .any(|e| e.reason.contains(needle) && e.reason.contains(&uuid)),
            "{needle}: {warnings:#?}"
        );
    }
    let p = policy(&mut c).await;
    assert_eq!(p.operator_ceiling_mw, None);
    assert!(p.threshold_c < 100 && p.hysteresis_c >= 1, "{p:?}");
    // The governor still runs on sane numbers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(policy(&mut c).await.ceiling_mw.is_some_and(|c| c > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_cannot_push_the_operators_events_out_of_the_log_or_the_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("{}\n[events]\nretain = 100\n", one_h100());
    let d = crate::support::start(dir.path(), Options::with_config(config));
    let mut c = d.client().await;
    set_watts(&mut c, 500.0)
        .await
        .expect("the operator's change");
    let mut anonymous = d.client_with(None).await;
    for _ in 0..250 {
        set_watts(&mut anonymous, 400.0)
            .await
            .expect_err("refused without a token");
    }
    let events = events_since(&mut c, 0).await;
    let operator: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::CeilingChanged)
        .collect();
    assert_eq!(operator.len(), 1, "the replay keeps the operator's event");
    assert!(
        events.iter().any(|e| e.kind() == EventKind::DaemonStarted),
        "and the lifecycle's"
    );
    let on_disk = std::fs::read_to_string(dir.path().join("events.log")).expect("events.log");
    assert!(
        on_disk.contains("EVENT_KIND_CEILING_CHANGED"),
        "the log on disk keeps it"
    );
    assert!(
        !on_disk.contains("EVENT_KIND_CONTROL_REFUSED"),
        "refused calls are kept apart"
    );
}
