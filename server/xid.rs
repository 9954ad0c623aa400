//! XID errors decoded: what an XID code means, how bad it is and what NVIDIA
//! documents doing about it.
//!
//! The driver reports an XID as a bare number (NVML's critical-XID event);
//! an operator paged at night needs the words. This module owns the table,
//! condensed from NVIDIA's "XID Errors" documentation and its Xid catalog
//! for Ampere and newer GPUs (docs.nvidia.com/deploy/xid-errors/, the
//! catalog's "Resolution Bucket (Immediate Action)" column), and the
//! catch-all for codes it does not list. The sampler stamps each XID event
//! with [`decode`]'s answer, the event log hands it to subscribers as
//! `Event.xid_info`, and `/metrics` counts XIDs by [`XidAction`] (their
//! class), so an alert can page for "reset this GPU" and stay quiet for
//! "the application crashed".

use crate::api::{self, Severity, XidAction};

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEntry {
    pub code: u64,
    /// NVIDIA's description of the error.
    pub meaning: &'static str,
    pub action: XidAction,
    /// The action in words, as NVIDIA documents it for this code.
    pub action_text: &'static str,
}

use XidAction::{ContactSupport, None as Ignore, RebootNode, ResetGpu, RestartApp};

const RESTART_APP: &str = "restart the application; the GPU stays usable (an application or CUDA fault, check the application if it repeats)";
const RESET_GPU: &str = "drain the GPU's work and reset it (nvidia-smi -r, or reboot the node); contact NVIDIA support if it repeats";
const REBOOT_NODE: &str = "drain the node and reboot it; check the GPU's seating, power and cooling; contact NVIDIA support if it repeats";
const CONTACT_SUPPORT: &str = "collect an nvidia-bug-report and contact NVIDIA support";
const UNUSED: &str = "A code NVIDIA lists as unused on Ampere and newer GPUs";
const NONE: &str =
    "no action: informational, or a consequence of an earlier error (look at the XIDs before it)";

macro_rules! xid {
    ($code:literal, $action:ident, $text:expr, $meaning:expr) => {
        XidEntry {
            code: $code,
            meaning: $meaning,
            action: $action,
            action_text: $text,
        }
    };
}

/// The XIDs gpuwatch knows, by code.
pub const TABLE: &[XidEntry] = &[
    // Codes the catalog lists as unused on Ampere and newer: one appearing
    // is itself a fault to report.
    xid!(1, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(2, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(3, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(4, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(5, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(6, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(7, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(
        8,
        RestartApp,
        RESTART_APP,
        "GPU stopped processing (channel idle timeout)"
    ),
    xid!(9, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(10, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(
        11,
        RestartApp,
        RESTART_APP,
        "Invalid or corrupted push buffer stream"
    ),
    xid!(12, ContactSupport, CONTACT_SUPPORT, UNUSED),
    xid!(
        13,
        RestartApp,
        RESTART_APP,
        "Graphics engine exception (typically an out-of-bounds access or illegal instruction in the application)"
    ),
    xid!(
        31,
        RestartApp,
        RESTART_APP,
        "GPU memory page fault (MMU fault: the application accessed an illegal address)"
    ),
    xid!(
        32,
        RestartApp,
        RESTART_APP,
        "Invalid or corrupted push buffer stream (PBDMA error)"
    ),
    xid!(38, ResetGpu, RESET_GPU, "Driver firmware error"),
    xid!(
        43,
        Ignore,
        NONE,
        "GPU stopped processing a channel after an application error; the GPU is healthy"
    ),
    xid!(
        45,
        Ignore,
        NONE,
        "Preemptive cleanup of a channel (the application ended or was killed, often after an earlier error)"
    ),
    xid!(
        48,
        ResetGpu,
        RESET_GPU,
        "Double-bit (uncorrectable) ECC error"
    ),
    xid!(
        61,
        ResetGpu,
        RESET_GPU,
        "Internal micro-controller breakpoint or warning (PMU)"
    ),
    xid!(
        62,
        ResetGpu,
        RESET_GPU,
        "Internal micro-controller halt (PMU)"
    ),
    xid!(
        63,
        ResetGpu,
        "reset the GPU when convenient so the pending row remap or page retirement takes effect",
        "ECC page retirement or row remapping recorded"
    ),
    xid!(
        64,
        ResetGpu,
        RESET_GPU,
        "ECC page retirement or row remapping failed to be recorded"
    ),
    xid!(
        68,
        RestartApp,
        RESTART_APP,
        "Video decoder (NVDEC) exception"
    ),
    xid!(69, RestartApp, RESTART_APP, "Graphics engine class error"),
    xid!(
        74,
        ResetGpu,
        "drain the GPU's work and reset it; check the NVLink connections and NVSwitch fabric; contact NVIDIA support if it repeats",
        "NVLink error"
    ),
    xid!(79, RebootNode, REBOOT_NODE, "GPU has fallen off the bus"),
    xid!(
        92,
        Ignore,
        "no immediate action: the GPU corrected the errors; watch the rate and contact NVIDIA support if it keeps rising",
        "High single-bit ECC error rate"
    ),
    xid!(
        94,
        RestartApp,
        "restart the application that hit the error; the other applications are unaffected; reset the GPU when convenient",
        "Contained ECC error (only the application that touched the memory is affected)"
    ),
    xid!(
        95,
        ResetGpu,
        RESET_GPU,
        "Uncontained ECC error (every application on the GPU is affected)"
    ),
    xid!(109, RestartApp, RESTART_APP, "Context switch timeout"),
    xid!(
        119,
        ResetGpu,
        RESET_GPU,
        "GSP RPC timeout (the GPU System Processor did not answer the driver)"
    ),
    xid!(120, ResetGpu, RESET_GPU, "GSP error"),
    xid!(
        121,
        Ignore,
        "no immediate action: the link corrected the error; contact NVIDIA support if it keeps recurring",
        "C2C (chip-to-chip) link corrected error"
    ),
    xid!(123, ResetGpu, RESET_GPU, "SPI PMU RPC write failure"),
    xid!(140, ResetGpu, RESET_GPU, "Unrecovered ECC error"),
    xid!(
        154,
        Ignore,
        "follow the recovery action the driver names in the message (none, GPU reset, node reboot or drain and reset)",
        "GPU recovery action changed (the driver's summary of what the earlier errors require)"
    ),
];

/// What NVML reports when it cannot name the XID.
pub const NVML_UNKNOWN: u64 = 999;

/// The entry for codes the table does not list.
pub fn unknown(code: u64) -> XidEntry {
    XidEntry {
        code,
        meaning: if code == NVML_UNKNOWN {
            "XID the driver could not name (NVML reports it as unknown)"
        } else {
            "XID not in gpuwatch's table"
        },
        action: XidAction::Unknown,
        action_text: "look the code up in NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors/) and the kernel log (dmesg | grep -i xid)",
    }
}

/// The entry for `code`: its row, or [`unknown`].
pub fn decode(code: u64) -> XidEntry {
    TABLE
        .iter()
        .find(|e| e.code == code)
        .copied()
        .unwrap_or_else(|| unknown(code))
}

impl XidEntry {
    /// The event severity this XID deserves: an error when the GPU or node
    /// needs an operator, a warning when an application failed (or the code
    /// is unknown), info when nothing is to be done.
    pub fn severity(&self) -> Severity {
        match self.action {
            ResetGpu | RebootNode | ContactSupport => Severity::Error,
            RestartApp | XidAction::Unknown | XidAction::Unspecified => Severity::Warning,
            Ignore => Severity::Info,
        }
    }

    /// The class name used in `/metrics` (`action` label) and the CLI:
    /// `none`, `restart_app`, `reset_gpu`, `reboot_node`,
    /// `contact_support`, `unknown`.
    pub fn class(&self) -> String {
        api::names::name(self.action)
    }

    /// The wire form of this entry.
    pub fn to_wire(self) -> api::XidInfo {
        api::XidInfo {
            meaning: self.meaning.to_owned(),
            action: self.action as i32,
            action_text: self.action_text.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_without_duplicates_and_every_row_says_something() {
        for pair in TABLE.windows(2) {
            assert!(
                pair[0].code < pair[1].code,
                "{} then {}",
                pair[0].code,
                pair[1].code
            );
        }
        for e in TABLE {
            assert!(
                !e.meaning.is_empty() && !e.action_text.is_empty(),
                "XID {}",
                e.code
            );
            assert_ne!(e.action, XidAction::Unknown, "XID {} is listed", e.code);
            assert_ne!(e.action, XidAction::Unspecified, "XID {}", e.code);
        }
    }

    #[test]
    fn the_common_xids_are_listed() {
        for code in [
            13, 31, 32, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120, 121, 140,
        ] {
            assert_ne!(decode(code).action, XidAction::Unknown, "XID {code}");
        }
    }

    #[test]
    fn actions_and_severities_follow_the_documentation() {
        assert_eq!(decode(79).action, XidAction::RebootNode);
        assert_eq!(decode(79).severity(), Severity::Error);
        assert_eq!(decode(48).action, XidAction::ResetGpu);
        assert_eq!(decode(13).action, XidAction::RestartApp);
        assert_eq!(decode(13).severity(), Severity::Warning);
        assert_eq!(decode(45).class(), "none");
        assert_eq!(decode(45).severity(), Severity::Info);
        assert!(decode(79).meaning.contains("fallen off the bus"));
        assert_eq!(
            decode(3).action,
            XidAction::ContactSupport,
            "unused on Ampere+"
        );
        assert_eq!(decode(3).severity(), Severity::Error);
    }

    #[test]
    fn unknown_codes_get_the_catch_all_not_a_guess() {
        let e = decode(4242);
        assert_eq!(e.code, 4242);
        assert_eq!(e.action, XidAction::Unknown);
        assert_eq!(e.class(), "unknown");
        assert_eq!(e.severity(), Severity::Warning);
        assert!(e.action_text.contains("catalog"));
        assert!(decode(NVML_UNKNOWN).meaning.contains("could not name"));
    }
}
