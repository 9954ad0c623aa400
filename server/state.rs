//! Desired state that must outlive the daemon: operator ceilings and
//! thresholds, and whether the governor left a GPU lowered.
//!
//! Stored as `state.json` in the state directory, keyed by GPU UUID (indices
//! can change across reboots; UUIDs do not). [`StateStore::update`] changes
//! the state in memory at once and hands a snapshot to the state directory's
//! one writer (`persist.rs`), which saves it atomically (write a temporary
//! file, fsync, keep the previous version as `state.json.prev`, rename) off
//! the caller's loop; the returned [`Ack`] resolves once it is durable. A
//! damaged file never stops the daemon: entries that still parse are kept,
//! the previous version is tried next, and what happened is reported so the
//! caller can log it and record an event.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::persist::{Ack, PersistError, Persister, ReplacedFile};

const FILE: &str = "state.json";
const PREVIOUS: &str = "state.json.prev";
const VERSION: u32 = 1;
const STATE_FILE: ReplacedFile = ReplacedFile {
    current: FILE,
    previous: PREVIOUS,
    temporary: "state.json.tmp",
};

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
    writer: Persister,
    gpus: BTreeMap<String, GpuState>,
}

/// What loading found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateReport {
    /// Problems, one sentence each.
    pub problems: Vec<String>,
}

impl StateStore {
    /// Loads the state from `dir` (None: in memory only), with a writer of
    /// its own (tests; the daemon shares one writer, see `with_writer`).
    #[cfg(test)]
    pub fn open(dir: Option<&Path>) -> (Self, StateReport) {
        match Persister::start(dir) {
            Ok(writer) => Self::with_writer(&writer),
            Err(e) => {
                let (store, mut report) = Self::with_writer(&Persister::memory());
                report
                    .problems
                    .push(format!("cannot start the state writer: {e}"));
                (store, report)
            }
        }
    }

    /// Loads the state from `writer`'s state directory; saves go through
    /// that writer (shared with the event log).
    pub fn with_writer(writer: &Persister) -> (Self, StateReport) {
        let mut report = StateReport::default();
        let mut gpus = BTreeMap::new();
        if let Some(dir) = writer.dir() {
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
                writer: writer.clone(),
                gpus,
            },
            report,
        )
    }

    /// The state for `uuid` (default when unknown).
    pub fn get(&self, uuid: &str) -> GpuState {
        self.gpus.get(uuid).cloned().unwrap_or_default()
    }

    /// Changes the state for `uuid` in memory (so [`get`](Self::get) sees it
    /// at once) and queues a save; never waits for the disk. The ack
    /// resolves once the state, as changed, is durable — also when nothing
    /// changed, so "unchanged" is never an OK for a save still pending or
    /// one that failed (a failed save is retried by the next update).
    pub fn update(&mut self, uuid: &str, change: impl FnOnce(&mut GpuState)) -> Ack {
        let mut entry = self.get(uuid);
        let before = entry.clone();
        change(&mut entry);
        if entry == before {
            return self.writer.replace(STATE_FILE, None);
        }
        if entry.is_empty() {
            self.gpus.remove(uuid);
        } else {
            self.gpus.insert(uuid.to_owned(), entry);
        }
        match self.encode() {
            Ok(bytes) => self.writer.replace(STATE_FILE, Some(bytes)),
            Err(e) => Ack::ready(Err(e)),
        }
    }

    /// The file's bytes: the format a previous release wrote and reads.
    fn encode(&self) -> Result<Vec<u8>, PersistError> {
        let mut json = serde_json::to_vec_pretty(&FileFormat {
            version: VERSION,
            gpus: &self.gpus,
        })
        .map_err(|e| PersistError::Io {
            action: "encode",
            path: PathBuf::from(FILE),
            source: Arc::new(io::Error::other(e)),
        })?;
        json.push(b'\n');
        Ok(json)
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

    #[tokio::test]
    async fn state_round_trips_and_keeps_the_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, report) = StateStore::open(Some(dir.path()));
        assert!(report.problems.is_empty());
        store
            .update("GPU-a", |s| s.operator_ceiling_mw = Some(500_000))
            .await
            .expect("save");
        store
            .update("GPU-a", |s| s.governor_lowered_limit = true)
            .await
            .expect("save");
        let (store, _) = StateStore::open(Some(dir.path()));
        let a = store.get("GPU-a");
        assert_eq!(a.operator_ceiling_mw, Some(500_000));
        assert!(a.governor_lowered_limit);
        assert!(dir.path().join(PREVIOUS).exists());
    }

    #[tokio::test]
    async fn damaged_entry_is_skipped_and_the_rest_kept() {
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

    #[tokio::test]
    async fn truncated_file_falls_back_to_the_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = StateStore::open(Some(dir.path()));
        store
            .update("GPU-a", |s| s.threshold_c = Some(75))
            .await
            .expect("save");
        store
            .update("GPU-a", |s| s.threshold_c = Some(76))
            .await
            .expect("save");
        // Power loss mid-write of the newest file.
        let text = fs::read_to_string(dir.path().join(FILE)).expect("read");
        fs::write(dir.path().join(FILE), &text[..text.len() / 2]).expect("truncate");
        let (store, report) = StateStore::open(Some(dir.path()));
        assert_eq!(store.get("GPU-a").threshold_c, Some(75));
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    }

    #[tokio::test]
    async fn memory_only_store_works_without_a_directory() {
        let (mut store, _) = StateStore::open(None);
        store
            .update("GPU-a", |s| s.threshold_c = Some(70))
            .await
            .expect("no-op save");
        assert_eq!(store.get("GPU-a").threshold_c, Some(70));
    }
}
