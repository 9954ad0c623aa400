//! Property test over request validation: arbitrary, malformed and extreme
//! requests to every RPC of a real in-process daemon must get either an
//! answer or a clean, specific error — never a panic, never INTERNAL or
//! UNKNOWN — and the daemon must keep serving afterwards.
//!
//! Cases per run: `PROPTEST_CASES` (default 256; `.ci/fuzz.sh` runs many
//! more for a bounded time).

use std::time::Duration;

use gpuwatch_server::{
    api::{
        self, GpuSelector, gpu_selector::Selector, gpu_watch_client::GpuWatchClient,
        set_power_limit_request, set_threshold_request,
    },
    config::{self, Overrides},
};
use proptest::{prelude::*, test_runner::TestRunner};
use tonic::{Code, transport::Channel};

const TOKEN: &str = "fuzz-control-token-0123456789";

#[derive(Debug, Clone)]
enum Call {
    List(Vec<GpuSelector>),
    Snapshot(Vec<GpuSelector>),
    Policy(Vec<GpuSelector>),
    Watch(api::WatchRequest),
    Events(api::WatchEventsRequest),
    SetPowerLimit(api::SetPowerLimitRequest),
    ResetClocks(Vec<GpuSelector>),
    SetThreshold(api::SetThresholdRequest),
}

fn selector() -> impl Strategy<Value = GpuSelector> {
    let s = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(Selector::All(b))),
        prop_oneof![0u32..6, edge_u32()].prop_map(|i| Some(Selector::Index(i))),
        prop_oneof![".{0,200}", "GPU-[0-9a-f-]{0,40}"].prop_map(|u| Some(Selector::Uuid(u))),
    ];
    s.prop_map(|selector| GpuSelector { selector })
}

fn selectors() -> impl Strategy<Value = Vec<GpuSelector>> {
    prop::collection::vec(selector(), 0..80)
}

fn watts() -> impl Strategy<Value = f64> {
    prop_oneof![
        100.0..800.0f64,
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MAX),
        Just(f64::MIN),
        Just(f64::MIN_POSITIVE),
        Just(-0.0),
        Just(1e300),
        Just(4_294_967.295),
        Just(4_294_967.296)
    ]
}

/// Any u64, with the extremes drawn often (issue 12 row 11: `since_seq =
/// 2^64-1` panicked in debug builds; `any` alone almost never draws it).
fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::MAX / 2),
        Just(1u64 << 63),
        Just(0u64),
        Just(1u64),
        0u64..1_000,
        any::<u64>(),
    ]
}

fn edge_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(u32::MAX - 1),
        Just(0u32),
        Just(1u32),
        Just(3_600_000u32),
        Just(3_600_001u32),
        0u32..1_000,
        any::<u32>(),
    ]
}

fn edge_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(i32::MIN),
        Just(i32::MAX),
        Just(-1i32),
        Just(0i32),
        0i32..20,
        any::<i32>(),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        selectors().prop_map(Call::List),
        selectors().prop_map(Call::Snapshot),
        selectors().prop_map(Call::Policy),
        (selectors(), edge_u32(), prop::option::of(edge_u64())).prop_map(
            |(gpus, interval_ms, resume_after_seq)| {
                Call::Watch(api::WatchRequest {
                    gpus,
                    interval_ms,
                    resume_after_seq,
                })
            }
        ),
        (
            selectors(),
            prop::option::of(edge_u64()),
            prop::collection::vec(edge_i32(), 0..80)
        )
            .prop_map(
                |(gpus, since_seq, kinds)| Call::Events(api::WatchEventsRequest {
                    gpus,
                    since_seq,
                    kinds
                })
            ),
        (
            selectors(),
            prop_oneof![
                Just(None),
                watts().prop_map(|w| Some(set_power_limit_request::Target::Watts(w))),
                any::<bool>()
                    .prop_map(|b| Some(set_power_limit_request::Target::RestoreDefault(b))),
            ]
        )
            .prop_map(
                |(gpus, target)| Call::SetPowerLimit(api::SetPowerLimitRequest { gpus, target })
            ),
        selectors().prop_map(Call::ResetClocks),
        (
            selectors(),
            prop_oneof![
                Just(None),
                prop_oneof![0u32..130, edge_u32()]
                    .prop_map(|c| Some(set_threshold_request::Target::Celsius(c))),
                any::<bool>().prop_map(|b| Some(set_threshold_request::Target::RestoreDefault(b))),
            ],
            prop::option::of(prop_oneof![0u32..30, edge_u32()]),
        )
            .prop_map(|(gpus, target, hysteresis_c)| Call::SetThreshold(
                api::SetThresholdRequest {
                    gpus,
                    target,
                    hysteresis_c
                }
            )),
    ]
}

type Client = GpuWatchClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn add_token(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    Ok(r)
}

/// Makes the call; returns the error code, if any.
async fn perform(client: &mut Client, call: Call) -> Option<Code> {
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
    match call {
        Call::List(gpus) => code(
            client
                .list_devices(api::ListDevicesRequest { gpus })
                .await
                .map(|_| ()),
        ),
        Call::Snapshot(gpus) => code(
            client
                .get_snapshot(api::GetSnapshotRequest { gpus })
                .await
                .map(|_| ()),
        ),
        Call::Policy(gpus) => code(
            client
                .get_policy(api::GetPolicyRequest { gpus })
                .await
                .map(|_| ()),
        ),
        Call::Watch(req) => match client.watch(req).await {
            Ok(r) => {
                let mut s = r.into_inner();
                match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
                    Ok(Ok(Some(first))) => {
                        assert!(
                            matches!(first.message, Some(api::watch_response::Message::Start(_))),
                            "a stream starts with `start`"
                        );
                        None
                    }
                    Ok(Err(e)) => Some(e.code()),
                    other => panic!("stream gave no first message: {other:?}"),
                }
            }
            Err(e) => Some(e.code()),
        },
        Call::Events(req) => match client.watch_events(req).await {
            Ok(r) => {
                let mut s = r.into_inner();
                // Replay ends with caught_up; a stream must reach it.
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
                        Ok(Ok(Some(m))) => {
                            if matches!(
                                m.message,
                                Some(api::watch_events_response::Message::CaughtUp(_))
                            ) {
                                break None;
                            }
                        }
                        Ok(Err(e)) => break Some(e.code()),
                        other => panic!("event stream did not catch up: {other:?}"),
                    }
                }
            }
            Err(e) => Some(e.code()),
        },
        Call::SetPowerLimit(req) => code(client.set_power_limit(req).await.map(|_| ())),
        Call::ResetClocks(gpus) => code(
            client
                .reset_clocks(api::ResetClocksRequest { gpus })
                .await
                .map(|_| ()),
        ),
        Call::SetThreshold(req) => code(client.set_threshold(req).await.map(|_| ())),
    }
}

#[test]
fn arbitrary_requests_get_answers_or_clean_errors_and_never_break_the_daemon() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("c.toml");
    std::fs::write(
        &toml,
        format!(
            "[[auth.tokens]]\nname = \"fuzzer\"\nrole = \"control\"\ntoken = \"{TOKEN}\"\n\
             [[simulator.gpus]]\npreset = \"h100-sxm\"\n[[simulator.gpus]]\npreset = \"laptop\"\n\
             [[simulator.gpus]]\npreset = \"rtx-4090\"\n"
        ),
    )
    .expect("write");
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        http_listen: Some(None),
        simulate: true,
        state_dir: Some(dir.path().join("state")),
        ..Overrides::default()
    };
    let cfg = config::load(Some(&toml), Vec::new(), &overrides).expect("config");
    let (daemon, client) = runtime.block_on(async {
        let daemon = gpuwatch_server::daemon::start(cfg).await.expect("daemon");
        let channel = Channel::from_shared(format!("http://{}", daemon.grpc_addr()))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let client: Client = GpuWatchClient::with_interceptor(channel, add_token as fn(_) -> _);
        (daemon, client)
    });

    let mut runner = TestRunner::default();
    let result = runner.run(&call(), |c| {
        let described = format!("{c:?}");
        let outcome = runtime.block_on(perform(&mut client.clone(), c));
        if let Some(code) = outcome {
            prop_assert!(
                !matches!(
                    code,
                    Code::Internal | Code::Unknown | Code::Unimplemented | Code::DataLoss
                ),
                "{described} -> {code:?}"
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still healthy.
    runtime.block_on(async {
        let snap = client
            .clone()
            .get_snapshot(api::GetSnapshotRequest::default())
            .await
            .expect("still serving");
        assert_eq!(snap.into_inner().samples.len(), 3);
        daemon.shutdown();
        tokio::time::timeout(Duration::from_secs(15), daemon.wait())
            .await
            .expect("stops")
            .expect("clean stop");
    });
}
