//! `gpuwatch-client ps`: who is using each GPU across the fleet, one row per
//! process (and one per allocated-but-idle container), like `ps` for GPUs.
//!
//! One `GetSnapshot` per host, all hosts at once, printed through
//! [`print_answers`] like `snapshot`: a host that does not answer is a line
//! of its own (an error object with `--json`) and exit status 1, the others
//! still print. A MIG UUID given to `--gpu` selects its parent GPU on the
//! daemon; here the rows are then narrowed to that instance.

use gpuwatch_api::{GetSnapshotResponse, GpuSample};

use crate::{
    app::Exit,
    cli::{GpuSel, ReadArgs, read_selectors},
    commands::{HostAnswer, print_answers, print_table, snapshot, table},
    connect::{Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    owner,
    record::{HostErrorRecord, PsRecord},
    units,
};

pub async fn run(args: ReadArgs, hosts: Vec<HostSpec>, connector: Connector, json: bool) -> Exit {
    let gpus = read_selectors(&args.gpu);
    let fleet = Fleet::run(&hosts, &connector, move |_, client| {
        snapshot::latest(client.clone(), gpus.clone())
    });
    let sels = args.gpu;
    let sels_table = sels.clone();
    print_answers(
        fleet,
        &hosts,
        json,
        move |out, host, answer| write_json(out, host, answer, &sels),
        move |out, hosts, answers| write_table(out, hosts, answers, &sels_table),
    )
    .await
}

/// Whether a row on `device_id` of GPU `s` is one the selectors asked for:
/// everything when they name every GPU, else the GPUs they name by index or
/// UUID, and the MIG instances they name by MIG UUID.
fn selected(sels: &[GpuSel], s: &GpuSample, device_id: &str) -> bool {
    if sels.is_empty() || sels.contains(&GpuSel::All) {
        return true;
    }
    sels.iter().any(|sel| match sel {
        GpuSel::All => true,
        GpuSel::Index(i) => *i == s.index,
        GpuSel::Uuid(u) => u.eq_ignore_ascii_case(&s.uuid) || u.eq_ignore_ascii_case(device_id),
    })
}

/// Every row of one host's snapshot, in GPU order: its processes, then its
/// idle allocations.
fn rows<'a>(host: &'a str, snap: &'a GetSnapshotResponse, sels: &[GpuSel]) -> Vec<PsRecord<'a>> {
    let mut out = Vec::new();
    for s in &snap.samples {
        for p in &s.processes {
            let mig = p.mig_uuid.as_deref().and_then(|u| owner::find_mig(s, u));
            let row = PsRecord::process(host, s, mig, p);
            if selected(sels, s, row.device_id) {
                out.push(row);
            }
        }
        for a in s.allocations.iter().filter(|a| a.idle) {
            let mig = owner::allocation_mig(s, a);
            let row = PsRecord::allocation(host, s, mig, a);
            if selected(sels, s, row.device_id) {
                out.push(row);
            }
        }
    }
    out
}

fn write_json(
    out: &mut Output,
    host: &HostSpec,
    answer: &Result<GetSnapshotResponse, HostFailure>,
    sels: &[GpuSel],
) -> Result<(), OutputClosed> {
    match answer {
        Ok(snap) => {
            for row in rows(&host.label, snap, sels) {
                out.json(&row)?;
            }
            Ok(())
        }
        Err(e) => out.json(&HostErrorRecord::new(&host.label, e)),
    }
}

fn write_table(
    out: &mut Output,
    hosts: &[HostSpec],
    answers: &[HostAnswer<GetSnapshotResponse>],
    sels: &[GpuSel],
) -> Result<(), OutputClosed> {
    let mut t = table(&["HOST", "GPU", "PID", "USER", "NAME", "OWNER", "MEM", "SM%"]);
    let mut errors = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        match answer {
            Some(Ok(snap)) => {
                for row in rows(&host.label, snap, sels) {
                    t.add_row(table_row(snap, &row));
                }
            }
            Some(Err(e)) => errors.push(format!("{}: error: {e}", host.label)),
            None => errors.push(format!("{}: error: no answer", host.label)),
        }
    }
    print_table(out, &t)?;
    for line in errors {
        out.line(&line)?;
    }
    Ok(())
}

fn table_row(snap: &GetSnapshotResponse, row: &PsRecord<'_>) -> Vec<String> {
    let dash = || units::ABSENT.to_owned();
    let gpu = snap
        .samples
        .iter()
        .find(|s| s.index == row.gpu_index)
        .map_or_else(
            || row.gpu_index.to_string(),
            |s| owner::device_label(s, row.mig_uuid),
        );
    let owner_text = row.attribution.owner.clone().unwrap_or_else(dash);
    let name = if row.idle == Some(true) {
        "<idle>".to_owned()
    } else {
        row.name.map_or_else(dash, str::to_owned)
    };
    vec![
        row.host.to_owned(),
        gpu,
        row.pid.map_or_else(dash, |p| p.to_string()),
        row.user
            .map(str::to_owned)
            .or(row.uid.map(|u| u.to_string()))
            .unwrap_or_else(dash),
        name,
        owner_text,
        row.used_memory_mib
            .map_or_else(dash, |m| format!("{} MiB", m.as_f64().round())),
        row.sm_pct.map_or_else(dash, |p| p.to_string()),
    ]
}
