//! The one spelling of every enum value of the contract, for people and
//! scripts: `GOVERNOR_STATE_OBSERVE_ONLY` is `observe_only` in the CLI's
//! tables and JSON, the HTTP API's JSON, Prometheus label values and logs.
//!
//! Why it exists: the same "drop the prefix, lower the case" rule was
//! written four times (the CLI, the HTTP API, the metrics, the event log),
//! with different answers for values a newer peer may send. Here it is
//! written once: [`name`] for a known value, [`name_of`] for a raw wire
//! `i32` (`unknown_<n>` for a value this build does not know, so a newer
//! daemon's new enum value is shown, not hidden or mistaken for another),
//! and [`parse`] for the way back, which accepts either spelling.
//!
//! The event log on disk keeps protobuf's own names (`EVENT_KIND_GPU_LOST`,
//! what [`Named::proto_name`] returns): they are the contract's canonical
//! spelling, stable across releases, so an older gpuwatch reading a newer
//! log (a rollback) still understands every line.

use crate::{
    ActorKind, ContainerRuntime, EventKind, GapReason, GovernorMode, GovernorState, GpuHealth,
    HistoryGapReason, ProcessKind, ResetOutcome, Severity, TelemetryField, ThresholdSource,
    ThrottleCategory, ThrottleReason, XidAction,
};

/// An enum of the contract whose values have a short snake_case name.
pub trait Named: Copy + TryFrom<i32> + Sized {
    /// The prefix protobuf puts before every value's name.
    const PREFIX: &'static str;
    /// Protobuf's name of the value (`EVENT_KIND_GPU_LOST`).
    fn proto_name(self) -> &'static str;
    /// The value from protobuf's name.
    fn from_proto_name(name: &str) -> Option<Self>;
}

macro_rules! named {
    ($($ty:ty => $prefix:literal),* $(,)?) => {
        $(impl Named for $ty {
            const PREFIX: &'static str = $prefix;
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
            fn from_proto_name(name: &str) -> Option<Self> {
                Self::from_str_name(name)
            }
        })*
    };
}

named! {
    GpuHealth => "GPU_HEALTH_",
    GovernorState => "GOVERNOR_STATE_",
    GovernorMode => "GOVERNOR_MODE_",
    ThresholdSource => "THRESHOLD_SOURCE_",
    ResetOutcome => "RESET_OUTCOME_",
    EventKind => "EVENT_KIND_",
    Severity => "SEVERITY_",
    ActorKind => "ACTOR_KIND_",
    GapReason => "GAP_REASON_",
    TelemetryField => "TELEMETRY_FIELD_",
    ThrottleReason => "THROTTLE_REASON_",
    ThrottleCategory => "THROTTLE_CATEGORY_",
    ProcessKind => "PROCESS_KIND_",
    ContainerRuntime => "CONTAINER_RUNTIME_",
    HistoryGapReason => "HISTORY_GAP_REASON_",
    XidAction => "XID_ACTION_",
}

/// The short name of a value: `observe_only`, `gpu_lost`, `unspecified`.
pub fn name<E: Named>(value: E) -> String {
    let full = value.proto_name();
    full.strip_prefix(E::PREFIX)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// The short name of a raw wire value; `unknown_<n>` for a value this build
/// does not know (a newer peer's).
pub fn name_of<E: Named>(value: i32) -> String {
    match E::try_from(value) {
        Ok(v) => name(v),
        Err(_) => format!("unknown_{value}"),
    }
}

/// The value named `text`: the short name (any case) or protobuf's name.
pub fn parse<E: Named>(text: &str) -> Option<E> {
    if let Some(v) = E::from_proto_name(text) {
        return Some(v);
    }
    E::from_proto_name(&format!("{}{}", E::PREFIX, text.to_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_the_prefix_and_the_case() {
        assert_eq!(name(GovernorState::ObserveOnly), "observe_only");
        assert_eq!(name(ThrottleReason::SwPowerCap), "sw_power_cap");
        assert_eq!(
            name(ThrottleReason::HwThermalSlowdown),
            "hw_thermal_slowdown"
        );
        assert_eq!(name(GpuHealth::Ok), "ok");
        assert_eq!(name(GapReason::NotInHistory), "not_in_history");
        assert_eq!(name(EventKind::CeilingChanged), "ceiling_changed");
        assert_eq!(name(GovernorMode::Unspecified), "unspecified");
    }

    #[test]
    fn unknown_wire_values_are_named_not_hidden() {
        assert_eq!(name_of::<GpuHealth>(999), "unknown_999");
        assert_eq!(name_of::<GpuHealth>(GpuHealth::Lost as i32), "lost");
    }

    #[test]
    fn parse_accepts_both_spellings_and_round_trips_every_value() {
        assert_eq!(parse::<EventKind>("gpu_lost"), Some(EventKind::GpuLost));
        assert_eq!(parse::<EventKind>("GPU_LOST"), Some(EventKind::GpuLost));
        assert_eq!(
            parse::<EventKind>("EVENT_KIND_GPU_LOST"),
            Some(EventKind::GpuLost)
        );
        assert_eq!(parse::<EventKind>("no_such_kind"), None);
        for raw in 0..200 {
            if let Ok(kind) = EventKind::try_from(raw) {
                assert_eq!(parse::<EventKind>(&name(kind)), Some(kind));
            }
        }
    }
}
