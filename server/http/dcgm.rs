//! The `dcgm-exporter` metrics profile: dcgm-exporter's default counters,
//! under its names, label names, units and types, from the same hub the
//! native families are rendered from.
//!
//! It exists so a cluster that switches from dcgm-exporter to gpuwatch keeps
//! its Grafana dashboards and alert rules without a relabelling recipe. The
//! families follow dcgm-exporter's `etc/default-counters.csv` (release
//! 4.5.3-4.8.2): `DCGM_FI_DEV_GPU_TEMP` in °C, `DCGM_FI_DEV_FB_USED` in MiB,
//! clocks in MHz, power in W, energy in mJ as a counter, utilisation in %.
//! Every series carries dcgm-exporter's labels: `gpu`, `UUID`, `pci_bus_id`,
//! `device` (`nvidia<index>`), `modelName`, `Hostname`, then
//! `DCGM_FI_DRIVER_VERSION` where the driver is known, and `namespace`,
//! `pod`, `container` for a GPU the kubelet allocated whole to a container.
//!
//! The profiling counters (`DCGM_FI_PROF_GR_ENGINE_ACTIVE`,
//! `..._PIPE_TENSOR_ACTIVE`, `..._DRAM_ACTIVE`) come from NVML's GPM, so
//! only Hopper and newer GPUs have them. A counter gpuwatch cannot read
//! (encoder/decoder utilisation, PCIe replays, NVLink bandwidth, framebuffer
//! reserved, vGPU licence, row remapping) is absent, never a sentinel; the
//! same for a field one GPU does not report.
//!
//! The text is the classic Prometheus format 0.0.4, as dcgm-exporter serves
//! it: its counters are named without `_total`, which OpenMetrics does not
//! allow, so this profile is written here rather than by
//! `prometheus-client` (whose encoder writes OpenMetrics only).

use std::fmt::Write as _;

use crate::{
    api::{DeviceInfo, GpuHealth, GpuSample},
    events::XidTally,
};

/// `prometheus` type of a family, as dcgm-exporter declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// Everything one GPU's series are computed from.
pub struct GpuView<'a> {
    pub device: &'a DeviceInfo,
    pub sample: Option<&'a GpuSample>,
    /// The last XID since the daemon started (None: none seen).
    pub last_xid: Option<u64>,
}

/// One family: name, type, help, and the value for a GPU (None: absent).
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: fn(&GpuView<'_>) -> Option<f64>,
}

const MIB: f64 = 1024.0 * 1024.0;

fn s<'a>(g: &'a GpuView<'_>) -> Option<&'a GpuSample> {
    g.sample
}

/// The families, in default-counters.csv's order. The help texts are
/// dcgm-exporter's words for what the value is.
const FAMILIES: &[Family] = &[
    Family {
        name: "DCGM_FI_DEV_SM_CLOCK",
        kind: Kind::Gauge,
        help: "SM clock frequency (in MHz).",
        value: |g| s(g)?.sm_clock_mhz.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_MEM_CLOCK",
        kind: Kind::Gauge,
        help: "Memory clock frequency (in MHz).",
        value: |g| s(g)?.memory_clock_mhz.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_MEMORY_TEMP",
        kind: Kind::Gauge,
        help: "Memory temperature (in C).",
        value: |g| s(g)?.memory_temperature_c.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_GPU_TEMP",
        kind: Kind::Gauge,
        help: "GPU temperature (in C).",
        value: |g| s(g)?.temperature_c.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_POWER_USAGE",
        kind: Kind::Gauge,
        help: "Power draw (in W).",
        value: |g| s(g)?.power_draw_mw.map(|mw| f64::from(mw) / 1000.0),
    },
    Family {
        name: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        kind: Kind::Counter,
        help: "Total energy consumption since boot (in mJ).",
        value: |g| s(g)?.energy_mj.map(|mj| mj as f64),
    },
    Family {
        name: "DCGM_FI_DEV_GPU_UTIL",
        kind: Kind::Gauge,
        help: "GPU utilization (in %).",
        value: |g| s(g)?.utilization_gpu_pct.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        kind: Kind::Gauge,
        help: "Memory utilization (in %).",
        value: |g| s(g)?.utilization_memory_pct.map(f64::from),
    },
    Family {
        name: "DCGM_FI_DEV_XID_ERRORS",
        kind: Kind::Gauge,
        help: "Value of the last XID error encountered.",
        // 0 is DCGM's "no XID yet", a reading, not a sentinel; a GPU whose
        // XIDs cannot be watched has no series.
        value: |g| {
            let watched = g.device.capabilities.as_ref()?.xid_events;
            watched.then(|| g.last_xid.unwrap_or(0) as f64)
        },
    },
    Family {
        name: "DCGM_FI_DEV_FB_FREE",
        kind: Kind::Gauge,
        help: "Framebuffer memory free (in MiB).",
        value: |g| {
            let x = s(g)?;
            let total = x.memory_total_bytes?;
            let used = x.memory_used_bytes?;
            Some((total.saturating_sub(used) as f64 / MIB).floor())
        },
    },
    Family {
        name: "DCGM_FI_DEV_FB_USED",
        kind: Kind::Gauge,
        help: "Framebuffer memory used (in MiB).",
        value: |g| s(g)?.memory_used_bytes.map(|b| (b as f64 / MIB).floor()),
    },
    Family {
        name: "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        kind: Kind::Gauge,
        help: "Power management limit (in W).",
        value: |g| s(g)?.power_limit_mw.map(|mw| f64::from(mw) / 1000.0),
    },
    Family {
        name: "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of time the graphics engine is active.",
        value: |g| s(g)?.graphics_engine_active_ratio,
    },
    Family {
        name: "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of cycles the tensor (HMMA) pipe is active.",
        value: |g| s(g)?.tensor_active_ratio,
    },
    Family {
        name: "DCGM_FI_PROF_DRAM_ACTIVE",
        kind: Kind::Gauge,
        help: "Ratio of cycles the device memory interface is active sending or receiving data.",
        value: |g| s(g)?.dram_active_ratio,
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_TX_BYTES",
        kind: Kind::Gauge,
        help: "The rate of data transmitted over the PCIe bus, in bytes per second (NVML's PCIe throughput counter).",
        value: |g| s(g)?.pcie_tx_kbps.map(|k| f64::from(k) * 1024.0),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_RX_BYTES",
        kind: Kind::Gauge,
        help: "The rate of data received over the PCIe bus, in bytes per second (NVML's PCIe throughput counter).",
        value: |g| s(g)?.pcie_rx_kbps.map(|k| f64::from(k) * 1024.0),
    },
];

/// The names this profile can serve (a GPU that reports the field gets a
/// series under it).
#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
pub fn family_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().map(|f| f.name)
}

/// Writes a label value escaped for the text format.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The label sets of one GPU: one per container the kubelet allocated the
/// whole GPU to (dcgm-exporter repeats a shared GPU's series per pod), or
/// one without pod labels.
fn label_sets(g: &GpuView<'_>, hostname: &str, driver: Option<&str>) -> Vec<String> {
    let d = g.device;
    let mut base = String::with_capacity(256);
    for (name, value) in [
        ("gpu", d.index.to_string()),
        ("UUID", d.uuid.clone()),
        ("pci_bus_id", d.pci_bus_id.clone()),
        ("device", format!("nvidia{}", d.index)),
        ("modelName", d.name.clone()),
        ("Hostname", hostname.to_owned()),
    ] {
        if !base.is_empty() {
            base.push(',');
        }
        let _ = write!(base, "{name}=\"");
        escape(&mut base, &value);
        base.push('"');
    }
    if let Some(driver) = driver.filter(|v| !v.is_empty()) {
        base.push_str(",DCGM_FI_DRIVER_VERSION=\"");
        escape(&mut base, driver);
        base.push('"');
    }
    let mut pods = std::collections::BTreeSet::new();
    for a in g.sample.map_or(&[][..], |x| &x.allocations[..]) {
        if let Some(pod) = &a.pod
            && a.device_ids.contains(&d.uuid)
        {
            pods.insert((
                pod.namespace.as_str(),
                pod.pod.as_str(),
                pod.container.as_str(),
            ));
        }
    }
    if pods.is_empty() {
        return vec![base];
    }
    pods.into_iter()
        .map(|(namespace, pod, container)| {
            let mut labels = base.clone();
            for (name, value) in [
                ("container", container),
                ("namespace", namespace),
                ("pod", pod),
            ] {
                let _ = write!(labels, ",{name}=\"");
                escape(&mut labels, value);
                labels.push('"');
            }
            labels
        })
        .collect()
}

/// Renders the profile's families for `devices` with their latest samples.
pub fn render(
    out: &mut String,
    devices: &[DeviceInfo],
    samples: &[GpuSample],
    xids: &XidTally,
    hostname: &str,
    driver: Option<&str>,
) {
    let gpus: Vec<(GpuView<'_>, Vec<String>)> = devices
        .iter()
        .filter_map(|d| {
            let sample = samples.iter().find(|x| x.index == d.index);
            // A lost GPU has no readings, as with dcgm-exporter.
            if sample.is_some_and(|x| x.health == GpuHealth::Lost as i32) {
                return None;
            }
            let last_xid = xids
                .last
                .iter()
                .find(|((_, uuid), _)| *uuid == d.uuid)
                .map(|(_, code)| *code);
            let view = GpuView {
                device: d,
                sample,
                last_xid,
            };
            let labels = label_sets(&view, hostname, driver);
            Some((view, labels))
        })
        .collect();
    for family in FAMILIES {
        let rows: Vec<(&Vec<String>, f64)> = gpus
            .iter()
            .filter_map(|(g, labels)| (family.value)(g).map(|v| (labels, v)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
        for (labels, value) in rows {
            for l in labels {
                let _ = writeln!(out, "{}{{{l}}} {value}", family.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn names_are_dcgm_exporters_and_unique() {
        let names: Vec<_> = family_names().collect();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert!(names.iter().all(|n| n.starts_with("DCGM_FI_")));
        assert!(names.contains(&"DCGM_FI_DEV_GPU_TEMP"));
    }
}
