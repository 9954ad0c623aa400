//! Property test over configuration parsing: arbitrary bytes, and TOML
//! documents built from the real schema's keys mixed with wrong types,
//! extreme values and unknown keys, loaded through the daemon's own loader
//! (file and environment layers). It must never panic: every input is either
//! a valid configuration or an error that names a key or the file.

use std::io::Write;

use gpuwatch_server::config::{self, Overrides};
use proptest::prelude::*;

/// Every section the daemon knows, and one it does not.
fn sections() -> Vec<&'static str> {
    config::SECTIONS.iter().copied().chain(["bogus"]).collect()
}

const KEYS: &[&str] = &[
    "listen",
    "http_listen",
    "shutdown_grace",
    "interval",
    "slow_interval",
    "history",
    "read_timeout",
    "lost_probe_interval",
    "kind",
    "nvml_library",
    "speed",
    "enabled",
    "threshold_c",
    "threshold_margin_c",
    "hysteresis_c",
    "dry_run",
    "state_dir",
    "floor_watts",
    "min_write_interval",
    "min_step_watts",
    "retain",
    "level",
    "format",
    "allow_unauthenticated_reads",
    "mtls_role",
    "cert_file",
    "max_streams",
    "max_streams_per_connection",
    "max_request_bytes",
    "nonsense",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| format!("{v:?}")),
        any::<bool>().prop_map(|v| v.to_string()),
        prop_oneof![
            "[0-9]{1,6}(ms|s|m|h|d|us|ns)",
            "[a-z ]{0,12}",
            "127\\.0\\.0\\.1:[0-9]{1,6}",
            "off"
        ]
        .prop_map(|v| format!("{v:?}")),
        Just("[1, 2, 3]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("\"\"".to_owned()),
    ]
}

fn document() -> impl Strategy<Value = String> {
    let entry = (prop::sample::select(KEYS), value()).prop_map(|(k, v)| format!("{k} = {v}\n"));
    let section = (
        prop::sample::select(sections()),
        prop::collection::vec(entry, 0..6),
    )
        .prop_map(|(s, entries)| format!("[{s}]\n{}", entries.concat()));
    let gpu = (
        prop::sample::select(&["h100-sxm", "a100-sxm", "rtx-4090", "laptop", "h200", ""][..]),
        prop::collection::vec(
            (
                prop::sample::select(
                    &[
                        "count",
                        "ambient_c",
                        "time_constant",
                        "lost_at",
                        "recover_at",
                        "repeat",
                        "write_error",
                        "demand",
                        "xid",
                    ][..],
                ),
                value(),
            ),
            0..4,
        ),
    )
        .prop_map(|(preset, entries)| {
            let mut s = format!("[[simulator.gpus]]\npreset = {preset:?}\n");
            for (k, v) in entries {
                s.push_str(&format!("{k} = {v}\n"));
            }
            s
        });
    prop::collection::vec(prop_oneof![section, gpu], 0..6).prop_map(|parts| parts.concat())
}

fn load(text: &[u8], env: Vec<(String, String)>) -> Result<config::Config, config::ConfigError> {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text).expect("write");
    config::load(Some(f.path()), env, &Overrides::default())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Err(e) = load(&bytes, Vec::new()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn schema_shaped_documents_load_or_name_what_is_wrong(doc in document()) {
        match load(doc.as_bytes(), Vec::new()) {
            Ok(cfg) => {
                // A loaded configuration passes its own validation again.
                prop_assert!(config::validate(&cfg).is_ok());
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
            }
        }
    }

    #[test]
    fn environment_values_never_panic(
        key in prop::sample::select(KEYS),
        section in prop::sample::select(sections()),
        v in "[ -~]{0,40}",
    ) {
        let env = vec![(format!("GPUWATCH_{}__{}", section.to_uppercase(), key.to_uppercase()), v)];
        if let Err(e) = load(b"", env) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
