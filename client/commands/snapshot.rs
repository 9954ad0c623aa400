//! `gpuwatch-client snapshot`: the latest sample of every GPU on every host,
//! one poll, all hosts at once.
//!
//! With `--json`, objects are written as each host answers (a dead host
//! never holds the others back); the table waits for all and keeps the
//! order the hosts were given in.

use gpuwatch_api::names;
use std::time::Duration;

use gpuwatch_api::{
    GetSnapshotRequest, GetSnapshotResponse, ListDevicesRequest, ListDevicesResponse,
};

use tonic::Code;

use crate::{
    app::Exit,
    cli::{ReadArgs, read_selectors},
    commands::{HostAnswer, print_answers, print_table, table},
    connect::{Client, Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    owner,
    record::{HostErrorRecord, SampleRecord},
    units,
};

type Answer = (ListDevicesResponse, GetSnapshotResponse);

pub async fn run(args: ReadArgs, hosts: Vec<HostSpec>, connector: Connector, json: bool) -> Exit {
    let gpus = read_selectors(&args.gpu);
    let fleet = Fleet::run(&hosts, &connector, move |_, client| {
        let gpus = gpus.clone();
        async move {
            let mut a = client.clone();
            let (devices, snapshot) = tokio::try_join!(
                async {
                    a.list_devices(ListDevicesRequest { gpus: gpus.clone() })
                        .await
                        .map_err(HostFailure::from)
                },
                latest(client, gpus.clone()),
            )?;
            Ok::<Answer, HostFailure>((devices.into_inner(), snapshot))
        }
    });
    print_answers(fleet, &hosts, json, write_json, write_table).await
}

/// The latest samples. A daemon that has just started answers UNAVAILABLE
/// until its first tick (a fraction of a second): ask again until it has
/// one (the caller's timeout bounds the wait).
pub(crate) async fn latest(
    mut client: Client,
    gpus: Vec<gpuwatch_api::GpuSelector>,
) -> Result<GetSnapshotResponse, HostFailure> {
    let mut pause = Duration::from_millis(50);
    loop {
        match client
            .get_snapshot(GetSnapshotRequest { gpus: gpus.clone() })
            .await
        {
            Ok(r) => return Ok(r.into_inner()),
            // No source: the daemon said so, the connection is fine.
            Err(s) if s.code() == Code::Unavailable && std::error::Error::source(&s).is_none() => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(s) => return Err(s.into()),
        }
    }
}

fn write_json(
    out: &mut Output,
    host: &HostSpec,
    answer: &Result<Answer, HostFailure>,
) -> Result<(), OutputClosed> {
    match answer {
        Ok((devices, snapshot)) => {
            for sample in &snapshot.samples {
                let name = devices
                    .devices
                    .iter()
                    .find(|d| d.index == sample.index)
                    .map(|d| d.name.as_str());
                out.json(&SampleRecord::new(
                    &host.label,
                    name,
                    sample,
                    snapshot.time.as_ref(),
                ))?;
            }
            Ok(())
        }
        Err(e) => out.json(&HostErrorRecord::new(&host.label, e)),
    }
}

fn write_table(
    out: &mut Output,
    hosts: &[HostSpec],
    answers: &[HostAnswer<Answer>],
) -> Result<(), OutputClosed> {
    let mut t = table(&[
        "HOST",
        "GPU",
        "NAME",
        "TEMP",
        "POWER / LIMIT",
        "SM / MEM CLOCK",
        "UTIL",
        "MEMORY",
        "THROTTLE",
        "GOVERNOR",
        "HEALTH",
        "USERS",
    ]);
    let mut errors = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        match answer {
            Some(Ok((devices, snapshot))) => {
                for s in &snapshot.samples {
                    let name = devices
                        .devices
                        .iter()
                        .find(|d| d.index == s.index)
                        .map_or("", |d| d.name.as_str());
                    let throttle = match s.throttle_reasons_mask {
                        None => units::ABSENT.to_owned(),
                        Some(_) if s.throttle_reasons.is_empty() => "none".to_owned(),
                        Some(_) => s
                            .throttle_reasons
                            .iter()
                            .map(|r| names::name_of::<gpuwatch_api::ThrottleReason>(*r))
                            .collect::<Vec<_>>()
                            .join(","),
                    };
                    t.add_row(vec![
                        host.label.clone(),
                        s.index.to_string(),
                        name.to_owned(),
                        units::celsius(s.temperature_c),
                        units::power_vs_limit(s.power_draw_mw, s.power_limit_mw),
                        units::clocks(s.sm_clock_mhz, s.memory_clock_mhz),
                        units::percent(s.utilization_gpu_pct),
                        units::memory(s.memory_used_bytes, s.memory_total_bytes),
                        throttle,
                        names::name_of::<gpuwatch_api::GovernorState>(s.governor_state),
                        names::name_of::<gpuwatch_api::GpuHealth>(s.health),
                        users_text(s),
                    ]);
                }
            }
            Some(Err(e)) => errors.push(format!("{}: error: {e}", host.label)),
            None => errors.push(format!("{}: error: no answer", host.label)),
        }
    }
    if t.row_count() > 0 {
        print_table(out, &t)?;
    }
    for line in errors {
        out.line(&line)?;
    }
    Ok(())
}

/// The USERS column: who is on the GPU (owners, then `idle: ns/pod`),
/// with the MIG instance count in front for a GPU in MIG mode; `-` when
/// nobody is.
fn users_text(s: &gpuwatch_api::GpuSample) -> String {
    let users = owner::users(s);
    let mut text = if users.is_empty() {
        units::ABSENT.to_owned()
    } else {
        users.join(", ")
    };
    if !s.mig_instances.is_empty() {
        text = format!("[{} MIG] {text}", s.mig_instances.len());
    }
    text
}
