//! `gpuwatch-client list`: what each GPU is and what can be done with it:
//! identity, power limits, temperature limits, capabilities and the
//! governor's policy.

use gpuwatch_api::names;
use gpuwatch_api::{DeviceInfo, ListDevicesRequest, ListDevicesResponse};

use crate::{
    app::Exit,
    cli::{ReadArgs, read_selectors},
    commands::{HostAnswer, print_answers, print_table, table},
    connect::{Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    record::{DeviceRecord, HostErrorRecord},
    units,
};

pub async fn run(args: ReadArgs, hosts: Vec<HostSpec>, connector: Connector, json: bool) -> Exit {
    let gpus = read_selectors(&args.gpu);
    let fleet = Fleet::run(&hosts, &connector, move |_, mut client| {
        let gpus = gpus.clone();
        async move {
            client
                .list_devices(ListDevicesRequest { gpus })
                .await
                .map(|r| r.into_inner())
                .map_err(HostFailure::from)
        }
    });
    print_answers(fleet, &hosts, json, write_json, write_table).await
}

fn write_json(
    out: &mut Output,
    host: &HostSpec,
    answer: &Result<ListDevicesResponse, HostFailure>,
) -> Result<(), OutputClosed> {
    match answer {
        Ok(list) => {
            for d in &list.devices {
                out.json(&DeviceRecord::new(&host.label, list.host.as_ref(), d))?;
            }
            Ok(())
        }
        Err(e) => out.json(&HostErrorRecord::new(&host.label, e)),
    }
}

fn watts_range(d: &DeviceInfo) -> String {
    let l = d.power_limits.unwrap_or_default();
    match (l.min_mw, l.default_mw, l.max_mw) {
        (None, None, None) => units::ABSENT.to_owned(),
        (min, def, max) => {
            let w = |v: Option<u32>| v.map_or_else(|| units::ABSENT.to_owned(), units::watts_value);
            format!("{} / {} / {} W", w(min), w(def), w(max))
        }
    }
}

fn temps(d: &DeviceInfo) -> String {
    match (d.slowdown_temperature_c, d.shutdown_temperature_c) {
        (None, None) => units::ABSENT.to_owned(),
        (a, b) => format!(
            "{} / {} °C",
            a.map_or_else(|| units::ABSENT.to_owned(), |v| v.to_string()),
            b.map_or_else(|| units::ABSENT.to_owned(), |v| v.to_string())
        ),
    }
}

fn controls(d: &DeviceInfo) -> String {
    let Some(c) = &d.capabilities else {
        return units::ABSENT.to_owned();
    };
    let mut can = Vec::new();
    if c.power_limit_settable {
        can.push("power-limit");
    }
    if c.gpu_clocks_lockable {
        can.push("lock-clocks");
    }
    if c.memory_clocks_lockable {
        can.push("lock-mem-clocks");
    }
    if c.application_clocks_resettable {
        can.push("app-clocks");
    }
    if can.is_empty() {
        "none (observe only)".to_owned()
    } else {
        can.join(",")
    }
}

fn governor(d: &DeviceInfo) -> String {
    let Some(p) = &d.policy else {
        return units::ABSENT.to_owned();
    };
    let mut text = format!(
        "{} {} · {} °C ±{} ({})",
        names::name_of::<gpuwatch_api::GovernorMode>(p.mode),
        names::name_of::<gpuwatch_api::GovernorState>(p.state),
        p.threshold_c,
        p.hysteresis_c,
        names::name_of::<gpuwatch_api::ThresholdSource>(p.threshold_source)
    );
    if let Some(c) = p.operator_ceiling_mw {
        text.push_str(&format!(" · ceiling {} W", units::watts_value(c)));
    }
    if p.dry_run {
        text.push_str(" · dry-run");
    }
    text
}

fn write_table(
    out: &mut Output,
    hosts: &[HostSpec],
    answers: &[HostAnswer<ListDevicesResponse>],
) -> Result<(), OutputClosed> {
    let mut t = table(&[
        "HOST",
        "GPU",
        "NAME",
        "UUID",
        "POWER MIN/DEF/MAX",
        "LIMIT",
        "SLOWDOWN/SHUTDOWN",
        "CAN SET",
        "GOVERNOR",
    ]);
    let mut errors = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        match answer {
            Some(Ok(list)) => {
                for d in &list.devices {
                    let limit = d
                        .power_limits
                        .as_ref()
                        .and_then(|l| l.current_mw)
                        .or(d.policy.as_ref().and_then(|p| p.current_limit_mw));
                    t.add_row(vec![
                        host.label.clone(),
                        d.index.to_string(),
                        d.name.clone(),
                        d.uuid.clone(),
                        watts_range(d),
                        units::watts(limit),
                        temps(d),
                        controls(d),
                        governor(d),
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
