//! Desired state that must outlive the daemon: operator ceilings and
//! thresholds, and whether the governor left a GPU lowered.
//!
//! Stored as `state.json` in the state directory, keyed by GPU UUID (indices
//! can change across reboots; UUIDs do not). Every save is atomic: write a
//! temporary file, fsync, keep the previous version as `state.json.prev`,
//! rename. A damaged file never stops the daemon: entries that still parse
//! are kept, the previous version is tried next, and what happened is
//! reported so the caller can log it and record an event.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

const FILE: &str = "state.json";
const PREVIOUS: &str = "state.json.prev";
const VERSION: u32 = 1;

/// What gpuwatch wants for one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuState {
    /// The operator's power ceiling (SetPowerLimit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_ceiling_mw: Option<u32>,
    /// The operator's threshold (SetThreshold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_c: Option<u32>,
    /// The operator's hysteresis (SetThreshold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hysteresis_c: Option<u32>,
    /// The governor holds the power limit below the ceiling.
    pub governor_lowered_limit: bool,
    /// The governor holds a graphics clock lock.
    pub governor_clock_lock: bool,
}

impl GpuState {
    fn is_empty(&self) -> bool {
        *self == GpuState::default()
    }
}

#[derive(Debug, Serialize)]
struct FileFormat<'a> {
    version: u32,
    gpus: &'a BTreeMap<String, GpuState>,
}

/// The persisted desired state of every GPU.
#[derive(Debug)]
pub struct StateStore {
    dir: Option<PathBuf>,
    gpus: BTreeMap<String, GpuState>,
}

/// What loading found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateReport {
    /// Problems, one sentence each.
    pub problems: Vec<String>,
}

impl StateStore {
    /// Loads the state from `dir` (None: in memory only).
    pub fn open(dir: Option<&Path>) -> (Self, StateReport) {
        let mut report = StateReport::default();
        let mut gpus = BTreeMap::new();
        if let Some(dir) = dir {
            let current = dir.join(FILE);
            match load_file(&current, &mut report) {
                Some(loaded) => gpus = loaded,
                None if current.exists() => {
                    if let Some(loaded) = load_file(&dir.join(PREVIOUS), &mut report) {
                        report.problems.push(format!(
                            "fell back to the previous state file {}",
                            dir.join(PREVIOUS).display()
                        ));
                        gpus = loaded;
                    }
                }
                None => {}
            }
        }
        (
            Self {
                dir: dir.map(Path::to_path_buf),
                gpus,
            },
            report,
        )
    }

    /// The state for `uuid` (default when unknown).
    pub fn get(&self, uuid: &str) -> GpuState {
        self.gpus.get(uuid).cloned().unwrap_or_default()
    }

    /// Changes the state for `uuid` and saves. Save errors are returned; the
    /// in-memory state is updated regardless.
    pub fn update(&mut self, uuid: &str, change: impl FnOnce(&mut GpuState)) -> io::Result<()> {
        let mut entry = self.get(uuid);
        let before = entry.clone();
        change(&mut entry);
        if entry == before {
            return Ok(());
        }
        if entry.is_empty() {
            self.gpus.remove(uuid);
        } else {
            self.gpus.insert(uuid.to_owned(), entry);
        }
        self.save()
    }

    fn save(&self) -> io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(&FileFormat {
            version: VERSION,
            gpus: &self.gpus,
        })
        .map_err(io::Error::other)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        let current = dir.join(FILE);
        if current.exists() {
            fs::rename(&current, dir.join(PREVIOUS))?;
        }
        fs::rename(&tmp, &current)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Reads one state file, keeping every entry that parses. `None` when the
/// file is missing or nothing in it is usable.
fn load_file(path: &Path, report: &mut StateReport) -> Option<BTreeMap<String, GpuState>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            report
                .problems
                .push(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            report.problems.push(format!(
                "{} is damaged ({e}); its contents were ignored",
                path.display()
            ));
            return None;
        }
    };
    let Some(entries) = value.get("gpus").and_then(|g| g.as_object()) else {
        report.problems.push(format!(
            "{} has no \"gpus\" table; its contents were ignored",
            path.display()
        ));
        return None;
    };
    let mut gpus = BTreeMap::new();
    for (uuid, entry) in entries {
        match serde_json::from_value::<GpuState>(entry.clone()) {
            Ok(state) => {
                gpus.insert(uuid.clone(), state);
            }
            Err(e) => report.problems.push(format!(
                "{}: entry for {uuid} is damaged ({e}); skipped",
                path.display()
            )),
        }
    }
    Some(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_keeps_the_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, report) = StateStore::open(Some(dir.path()));
        assert!(report.problems.is_empty());
        store
            .update("GPU-a", |s| s.operator_ceiling_mw = Some(500_000))
            .expect("save");
        store
            .update("GPU-a", |s| s.governor_lowered_limit = true)
            .expect("save");
        let (store, _) = StateStore::open(Some(dir.path()));
        let a = store.get("GPU-a");
        assert_eq!(a.operator_ceiling_mw, Some(500_000));
        assert!(a.governor_lowered_limit);
        assert!(dir.path().join(PREVIOUS).exists());
    }

    #[test]
    fn damaged_entry_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join(FILE),
            r#"{"version":1,"gpus":{"GPU-a":{"threshold_c":70},"GPU-b":{"threshold_c":"hot"}}}"#,
        )
        .expect("write");
        let (store, report) = StateStore::open(Some(dir.path()));
        assert_eq!(store.get("GPU-a").threshold_c, Some(70));
        assert_eq!(store.get("GPU-b"), GpuState::default());
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].contains("GPU-b"));
    }

    #[test]
    fn truncated_file_falls_back_to_the_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = StateStore::open(Some(dir.path()));
        store
            .update("GPU-a", |s| s.threshold_c = Some(75))
            .expect("save");
        store
            .update("GPU-a", |s| s.threshold_c = Some(76))
            .expect("save");
        // Power loss mid-write of the newest file.
        let text = fs::read_to_string(dir.path().join(FILE)).expect("read");
        fs::write(dir.path().join(FILE), &text[..text.len() / 2]).expect("truncate");
        let (store, report) = StateStore::open(Some(dir.path()));
        assert_eq!(store.get("GPU-a").threshold_c, Some(75));
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    }

    #[test]
    fn memory_only_store_works_without_a_directory() {
        let (mut store, _) = StateStore::open(None);
        store
            .update("GPU-a", |s| s.threshold_c = Some(70))
            .expect("no-op save");
        assert_eq!(store.get("GPU-a").threshold_c, Some(70));
    }
}
