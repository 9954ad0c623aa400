//! PickGpus and leases through the real daemon: 50 concurrent lease
//! requests on a 4-GPU host hand out each GPU at most once; a lease that is
//! not renewed ends after its TTL (with an event); live leases survive a
//! restart; criteria rule GPUs out with reasons; the lease role, the
//! per-caller bound, and who may release a lease.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use crate::support::{
    LEASE_TOKEN, LEASE_TOKEN_B, Options, READ_TOKEN, connect_with, events_since, eventually,
    sim_config,
};
use gpuwatch_api::{self as api, EventKind};
use tonic::Code;

/// Four idle simulated H100s, sampled every 100 ms, with `extra` TOML.
fn four_gpus(extra: &str) -> String {
    let gpu = "preset = \"h100-sxm\"\ndemand = [ { at = \"0s\", watts = 200 } ]";
    sim_config(
        1.0,
        &format!("[sampler]\ninterval = \"100ms\"\n{extra}"),
        &[gpu, gpu, gpu, gpu],
    )
}

fn lease_request(count: u32, ttl_s: u32) -> api::LeaseGpusRequest {
    api::LeaseGpusRequest {
        criteria: Some(api::PickCriteria {
            count,
            allow_busy: true,
            ..Default::default()
        }),
        ttl_s,
        purpose: "test".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_lease_requests_hand_out_each_gpu_at_most_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(four_gpus("")));
    let url = d.url();
    // 50 callers on their own connections, released at once.
    let mut clients = Vec::new();
    for i in 0..50 {
        let token = if i % 2 == 0 {
            LEASE_TOKEN
        } else {
            LEASE_TOKEN_B
        };
        clients.push(connect_with(&url, Some(token)).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for mut c in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            c.lease_gpus(lease_request(1, 600)).await
        }));
    }
    let mut granted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let reply = t
            .await
            .expect("task")
            .expect("LeaseGpus answers OK")
            .into_inner();
        if reply.satisfied {
            assert_eq!(reply.leases.len(), 1, "{reply:?}");
            granted.push(reply.leases[0].clone());
        } else {
            assert!(reply.leases.is_empty());
            assert!(
                reply.shortfall.contains("lease"),
                "the shortfall names the leases: {}",
                reply.shortfall
            );
            refused += 1;
        }
    }
    let gpus: BTreeSet<u32> = granted.iter().map(|l| l.index).collect();
    assert_eq!(
        granted.len(),
        gpus.len(),
        "a GPU was leased twice: {granted:?}"
    );
    assert_eq!(granted.len(), 4, "every GPU is leased once: {granted:?}");
    assert_eq!(refused, 46);

    // Visible in ListDevices and ListLeases, and a pick now finds nothing.
    let mut reader = d.client_with(Some(READ_TOKEN)).await;
    let devices = reader
        .list_devices(api::ListDevicesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .devices;
    for dev in &devices {
        let lease = dev.lease.as_ref().expect("every GPU shows its lease");
        assert!(granted.iter().any(|l| l.id == lease.id));
    }
    let listed = reader
        .list_leases(api::ListLeasesRequest {})
        .await
        .expect("list leases")
        .into_inner()
        .leases;
    assert_eq!(listed.len(), 4);
    let pick = reader
        .pick_gpus(api::PickGpusRequest {
            criteria: Some(api::PickCriteria {
                allow_busy: true,
                ..Default::default()
            }),
        })
        .await
        .expect("pick")
        .into_inner();
    assert!(!pick.satisfied);
    assert!(pick.candidates.iter().all(|c| c.lease.is_some() && !c.fits));
    // One granted event per lease, naming the holder.
    let events = events_since(&mut reader, 0).await;
    let grants: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::LeaseGranted)
        .collect();
    assert_eq!(grants.len(), 4);
    assert!(grants.iter().all(|e| {
        e.actor
            .as_ref()
            .is_some_and(|a| a.name.starts_with("scheduler"))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_renewed_ends_after_its_ttl_and_a_renewed_one_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(four_gpus("")));
    let mut c = d.client_with(Some(LEASE_TOKEN)).await;
    let held = c
        .lease_gpus(lease_request(1, 2))
        .await
        .expect("lease")
        .into_inner();
    let renewed = c
        .lease_gpus(lease_request(1, 2))
        .await
        .expect("lease")
        .into_inner();
    assert!(held.satisfied && renewed.satisfied);
    let (held, renewed) = (held.leases[0].clone(), renewed.leases[0].clone());
    assert_ne!(held.index, renewed.index);
    let started = Instant::now();
    // Keep one alive past the other's TTL.
    while started.elapsed() < Duration::from_secs(3) {
        c.renew_lease(api::RenewLeaseRequest {
            lease_ids: vec![renewed.id.clone()],
            ttl_s: 0,
        })
        .await
        .expect("renew");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut reader = d.client_with(Some(READ_TOKEN)).await;
    let leases = eventually(Duration::from_secs(10), "the lease to expire", || {
        let mut reader = reader.clone();
        async move {
            let leases = reader
                .list_leases(api::ListLeasesRequest {})
                .await
                .expect("list")
                .into_inner()
                .leases;
            (leases.len() == 1).then_some(leases)
        }
    })
    .await;
    assert_eq!(leases[0].id, renewed.id, "the renewed lease is still held");
    let events = events_since(&mut reader, 0).await;
    let expired: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::LeaseExpired)
        .collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].gpu_uuid.as_deref(), Some(held.uuid.as_str()));
    assert!(expired[0].reason.contains(&held.id));
    // Renewing an expired lease is NOT_FOUND.
    let err = c
        .renew_lease(api::RenewLeaseRequest {
            lease_ids: vec![held.id.clone()],
            ttl_s: 0,
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_leases_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = crate::support::start(dir.path(), Options::with_config(four_gpus("")));
    let mut c = d.client_with(Some(LEASE_TOKEN)).await;
    let long = c
        .lease_gpus(lease_request(2, 3600))
        .await
        .expect("lease")
        .into_inner();
    let short = c
        .lease_gpus(lease_request(1, 1))
        .await
        .expect("lease")
        .into_inner();
    assert!(long.satisfied && short.satisfied);
    // Killed, not stopped: the grant was durable before it was answered.
    d.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.restart();
    let mut reader = d.client_with(Some(READ_TOKEN)).await;
    let listed = reader
        .list_leases(api::ListLeasesRequest {})
        .await
        .expect("list")
        .into_inner()
        .leases;
    let ids: BTreeSet<&str> = listed.iter().map(|l| l.id.as_str()).collect();
    let want: BTreeSet<&str> = long.leases.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(
        ids, want,
        "the live leases came back, the expired one did not"
    );
    assert!(listed.iter().all(|l| l.holder == "scheduler"));
    // And they still keep picks apart.
    let mut c = d.client_with(Some(LEASE_TOKEN_B)).await;
    let next = c
        .lease_gpus(lease_request(2, 60))
        .await
        .expect("lease")
        .into_inner();
    assert!(next.satisfied);
    let taken: BTreeSet<u32> = long.leases.iter().map(|l| l.index).collect();
    assert!(next.leases.iter().all(|l| !taken.contains(&l.index)));
    let third = c
        .lease_gpus(lease_request(1, 60))
        .await
        .expect("lease")
        .into_inner();
    assert!(!third.satisfied, "all four GPUs are held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criteria_rule_gpus_out_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(dir.path(), Options::with_config(four_gpus("")));
    let reader = d.client_with(Some(READ_TOKEN)).await;
    let pick = |criteria: api::PickCriteria| {
        let mut reader = reader.clone();
        async move {
            reader
                .pick_gpus(api::PickGpusRequest {
                    criteria: Some(criteria),
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let two = pick(api::PickCriteria {
        count: 2,
        allow_busy: true,
        ..Default::default()
    })
    .await
    .expect("pick");
    assert!(two.satisfied, "{two:?}");
    assert_eq!(two.picked.len(), 2);
    assert_eq!(two.cuda_visible_devices.split(',').count(), 2);
    assert!(two.cuda_visible_devices.starts_with("GPU-"));
    assert_eq!(two.candidates.len(), 4);
    let ranks: Vec<u32> = two.candidates.iter().map(|c| c.rank).collect();
    assert_eq!(ranks, vec![1, 2, 3, 4]);
    for c in &two.candidates {
        let criteria: Vec<&str> = c.reasons.iter().map(|r| r.criterion.as_str()).collect();
        assert_eq!(
            criteria,
            [
                "health",
                "lease",
                "busy",
                "mig",
                "free_memory",
                "utilization",
                "headroom",
                "slowdown"
            ]
        );
        assert!(c.free_memory_bytes.is_some() && c.headroom_c.is_some());
    }
    // 1 PiB free: nothing fits, and the shortfall says why.
    let huge = pick(api::PickCriteria {
        count: 1,
        min_free_memory_bytes: Some(1 << 50),
        allow_busy: true,
        ..Default::default()
    })
    .await
    .expect("pick");
    assert!(!huge.satisfied);
    assert!(huge.picked.is_empty() && huge.cuda_visible_devices.is_empty());
    assert!(
        huge.shortfall.starts_with("0 of 1 wanted fit") && huge.shortfall.contains("free_memory"),
        "{}",
        huge.shortfall
    );
    // Headroom beyond any threshold.
    let hot = pick(api::PickCriteria {
        min_headroom_c: Some(500),
        allow_busy: true,
        ..Default::default()
    })
    .await
    .expect("pick");
    assert!(!hot.satisfied && hot.shortfall.contains("headroom"));
    // More than the host has.
    let five = pick(api::PickCriteria {
        count: 5,
        allow_busy: true,
        ..Default::default()
    })
    .await
    .expect("pick");
    assert!(!five.satisfied && five.shortfall.starts_with("4 of 5"));
    // Bad criteria are INVALID_ARGUMENT.
    let bad = pick(api::PickCriteria {
        max_utilization_pct: Some(101),
        ..Default::default()
    })
    .await
    .expect_err("101%");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasing_needs_the_lease_role_is_bounded_per_caller_and_only_the_holder_releases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = crate::support::start(
        dir.path(),
        Options::with_config(four_gpus("[leases]\nmax_per_caller = 2\n")),
    );
    let mut reader = d.client_with(Some(READ_TOKEN)).await;
    let err = reader
        .lease_gpus(lease_request(1, 60))
        .await
        .expect_err("a read token cannot lease");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("lease"), "{}", err.message());

    let mut a = d.client_with(Some(LEASE_TOKEN)).await;
    let first = a
        .lease_gpus(lease_request(2, 60))
        .await
        .expect("lease")
        .into_inner();
    assert!(first.satisfied);
    let err = a
        .lease_gpus(lease_request(1, 60))
        .await
        .expect_err("over the bound");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_per_caller"));

    // Another scheduler may neither renew nor release them.
    let mut b = d.client_with(Some(LEASE_TOKEN_B)).await;
    let id = first.leases[0].id.clone();
    let err = b
        .release_lease(api::ReleaseLeaseRequest {
            lease_ids: vec![id.clone()],
        })
        .await
        .expect_err("not the holder");
    assert_eq!(err.code(), Code::PermissionDenied);
    // The holder may; the GPU is free again.
    let released = a
        .release_lease(api::ReleaseLeaseRequest {
            lease_ids: vec![id.clone()],
        })
        .await
        .expect("release")
        .into_inner()
        .released;
    assert_eq!(released.len(), 1);
    let again = b
        .lease_gpus(lease_request(2, 60))
        .await
        .expect("lease")
        .into_inner();
    assert!(again.satisfied, "{}", again.shortfall);
    assert!(again.leases.iter().any(|l| l.index == released[0].index));
    // The control token may release anyone's lease.
    let mut ops = d.client().await;
    ops.release_lease(api::ReleaseLeaseRequest {
        lease_ids: again.leases.iter().map(|l| l.id.clone()).collect(),
    })
    .await
    .expect("control releases");
    let events = events_since(&mut reader, 0).await;
    let released: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == EventKind::LeaseReleased)
        .collect();
    assert_eq!(released.len(), 3);
    assert_eq!(
        released[0].actor.as_ref().map(|a| a.name.as_str()),
        Some("scheduler")
    );
    assert_eq!(
        released[2].actor.as_ref().map(|a| a.name.as_str()),
        Some("tester")
    );
    // A TTL beyond leases.max_ttl is refused.
    let err = a
        .lease_gpus(lease_request(1, 10 * 24 * 3600))
        .await
        .expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_show_in_metrics_with_their_holder() {
    let d = gpuwatch_testkit::Launch {
        config: Some(four_gpus("")),
        http: true,
        ..gpuwatch_testkit::Launch::default()
    }
    .start();
    let mut c = d.client_with(Some(LEASE_TOKEN)).await;
    let got = c
        .lease_gpus(lease_request(2, 600))
        .await
        .expect("lease")
        .into_inner();
    assert!(got.satisfied);
    let metrics = crate::http_support::get_bearer(&d.http_url("/metrics"), READ_TOKEN).await;
    assert_eq!(metrics.status, 200);
    let body = metrics.body;
    assert!(body.contains("gpuwatch_leases 2"), "{body}");
    for lease in &got.leases {
        let line = body
            .lines()
            .find(|l| l.starts_with("gpuwatch_gpu_leased{") && l.contains(&lease.id))
            .unwrap_or_else(|| panic!("no gpuwatch_gpu_leased for {}: {body}", lease.id));
        assert!(
            line.contains("holder=\"scheduler\"") && line.ends_with(" 1.0"),
            "{line}"
        );
        assert!(body.lines().any(
            |l| l.starts_with("gpuwatch_gpu_lease_expiry_timestamp_seconds{")
                && l.contains(&lease.id)
        ));
    }
    // Released: gone from /metrics.
    c.release_lease(api::ReleaseLeaseRequest {
        lease_ids: got.leases.iter().map(|l| l.id.clone()).collect(),
    })
    .await
    .expect("release");
    let body = crate::http_support::get_bearer(&d.http_url("/metrics"), READ_TOKEN)
        .await
        .body;
    assert!(body.contains("gpuwatch_leases 0"), "{body}");
    assert!(!body.contains("gpuwatch_gpu_leased{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_cannot_be_made_durable_is_withdrawn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let d = crate::support::start(&state, Options::with_config(four_gpus("")));
    let mut c = d.client_with(Some(LEASE_TOKEN)).await;
    // The disk refuses the next save of leases.json.
    std::fs::create_dir(state.join("leases.json.tmp")).expect("a directory where the file goes");
    let err = c
        .lease_gpus(lease_request(1, 600))
        .await
        .expect_err("a grant that is not durable is not an OK");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("nothing was leased"), "{err:?}");
    let mut reader = d.client_with(Some(READ_TOKEN)).await;
    let live = reader
        .list_leases(api::ListLeasesRequest {})
        .await
        .expect("list")
        .into_inner()
        .leases;
    assert!(live.is_empty(), "withdrawn: {live:?}");
    // Once the disk works again, leasing does too.
    std::fs::remove_dir(state.join("leases.json.tmp")).expect("unblock");
    let ok = eventually(Duration::from_secs(10), "a durable grant", || {
        let mut c = c.clone();
        async move {
            c.lease_gpus(lease_request(1, 600))
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    })
    .await;
    assert!(ok.satisfied);
}
