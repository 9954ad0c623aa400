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
//! caller can log it and record an event. Values are checked against the
//! GPU they are for ([`StateStore::sanitize`]) before anything uses them: a
//! hand-edited or corrupted file cannot feed a ceiling of 0 W or a
//! threshold of 500 °C into the governor's arithmetic.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    backend::DeviceFacts,
    config::{HYSTERESIS_MAX_C, HYSTERESIS_MIN_C, THRESHOLD_MAX_C, THRESHOLD_MIN_C},
    persist::{Ack, PersistError, Persister, ReplacedFile},
};

const FILE: &str = "state.json";
const PREVIOUS: &str = "state.json.prev";
const TEMPORARY: &str = "state.json.tmp";
const VERSION: u32 = 1;
pub(crate) const STATE_FILE: ReplacedFile = ReplacedFile {
    current: FILE,
    previous: PREVIOUS,
    temporary: TEMPORARY,
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

    /// Drops what is out of range for this GPU; says what, naming the GPU
    /// and the value.
    fn sanitize(&mut self, facts: &DeviceFacts) -> Vec<String> {
        let mut problems = Vec::new();
        let gpu = format!("GPU {} ({})", facts.index, facts.uuid);
        if let Some(mw) = self.operator_ceiling_mw {
            let (min, max) = (
                facts.power_min_mw.unwrap_or(1).max(1),
                facts.power_max_mw.unwrap_or(u32::MAX),
            );
            if !(min..=max).contains(&mw) {
                problems.push(format!(
                    "{gpu}: the saved operator ceiling of {mw} mW is outside the GPU's limits ({min} to {max} mW); dropped, the default applies"
                ));
                self.operator_ceiling_mw = None;
            }
        }
        if let Some(t) = self.threshold_c
            && !(THRESHOLD_MIN_C..=THRESHOLD_MAX_C).contains(&t)
        {
            problems.push(format!(
                "{gpu}: the saved threshold of {t} °C is outside {THRESHOLD_MIN_C} to {THRESHOLD_MAX_C} °C; dropped, the configured one applies"
            ));
            self.threshold_c = None;
        }
        if let Some(h) = self.hysteresis_c {
            let band_ok = self.threshold_c.is_none_or(|t| t >= h.saturating_add(20));
            if !(HYSTERESIS_MIN_C..=HYSTERESIS_MAX_C).contains(&h) || !band_ok {
                problems.push(format!(
                    "{gpu}: the saved hysteresis of {h} °C is outside {HYSTERESIS_MIN_C} to {HYSTERESIS_MAX_C} °C or leaves less than 20 °C below the threshold; dropped, the configured one applies"
                ));
                self.hysteresis_c = None;
            }
        }
        problems
    }
}

/// The node power budget as persisted (SetPowerBudget): host-wide, so kept
/// beside the GPUs' entries, not in one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBudget {
    /// Host-wide watts.
    pub watts: f64,
    /// Who set it.
    pub set_by: String,
    /// When, in seconds since the Unix epoch.
    pub set_at_unix_s: u64,
}

#[derive(Debug, Serialize)]
struct FileFormat<'a> {
    version: u32,
    gpus: &'a BTreeMap<String, GpuState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    power_budget: &'a Option<SavedBudget>,
}

/// The persisted desired state of every GPU.
#[derive(Debug)]
pub struct StateStore {
    writer: Persister,
    gpus: BTreeMap<String, GpuState>,
    power_budget: Option<SavedBudget>,
}

/// What loading found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateReport {
    /// Problems, one sentence each.
    pub problems: Vec<String>,
    /// A state file exists but could not be read at all (permissions, I/O):
    /// starting anyway would drop the operator's settings, so the daemon
    /// refuses.
    pub unreadable: Option<String>,
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
    ///
    /// `state.json` first; when it is missing, the newest complete file a
    /// save left (`state.json.tmp`, fsynced before it is renamed into
    /// place, then `state.json.prev`); when it is damaged, the previous
    /// version, then the temporary file. So whatever step of a save a crash
    /// interrupted, what loads is the state before or after it.
    pub fn with_writer(writer: &Persister) -> (Self, StateReport) {
        let mut report = StateReport::default();
        let mut gpus = BTreeMap::new();
        let mut power_budget = None;
        if let Some(dir) = writer.dir() {
            let current = dir.join(FILE);
            let fallbacks = if current.exists() {
                [PREVIOUS, TEMPORARY]
            } else {
                [TEMPORARY, PREVIOUS]
            };
            match load_file(&current, true, &mut report) {
                Some(loaded) => (gpus, power_budget) = loaded,
                None => {
                    for name in fallbacks {
                        let path = dir.join(name);
                        // A leftover temporary file that cannot be read is
                        // only a fallback lost, not the operator's state.
                        if let Some(loaded) = load_file(&path, name != TEMPORARY, &mut report) {
                            report.problems.push(format!(
                                "{} {}; loaded {}",
                                current.display(),
                                if current.exists() {
                                    "could not be used"
                                } else {
                                    "is missing"
                                },
                                path.display()
                            ));
                            (gpus, power_budget) = loaded;
                            break;
                        }
                    }
                }
            }
        }
        (
            Self {
                writer: writer.clone(),
                gpus,
                power_budget,
            },
            report,
        )
    }

    /// Drops the entries of `facts`' GPU that no request could have set
    /// (a ceiling outside the GPU's limits, a threshold or hysteresis out
    /// of range), in memory (the next save writes the rest); one sentence
    /// naming the GPU and the value for each.
    pub fn sanitize(&mut self, facts: &DeviceFacts) -> Vec<String> {
        let Some(entry) = self.gpus.get_mut(&facts.uuid) else {
            return Vec::new();
        };
        let problems = entry.sanitize(facts);
        if entry.is_empty() {
            self.gpus.remove(&facts.uuid);
        }
        problems
    }

    /// The node power budget, if one is set.
    pub fn power_budget(&self) -> Option<&SavedBudget> {
        self.power_budget.as_ref()
    }

    /// Sets (or, with `None`, drops) the node power budget and queues a
    /// save; the ack resolves once it is durable.
    pub fn set_power_budget(&mut self, budget: Option<SavedBudget>) -> Ack {
        if self.power_budget == budget {
            return self.writer.replace(STATE_FILE, None);
        }
        self.power_budget = budget;
        match self.encode() {
            Ok(bytes) => self.writer.replace(STATE_FILE, Some(bytes)),
            Err(e) => Ack::ready(Err(e)),
        }
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
            power_budget: &self.power_budget,
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
/// file is missing or nothing in it is usable; `must_read`: a file that
/// exists but cannot be read is [`StateReport::unreadable`].
fn load_file(
    path: &Path,
    must_read: bool,
    report: &mut StateReport,
) -> Option<(BTreeMap<String, GpuState>, Option<SavedBudget>)> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            let problem = format!("cannot read {}: {e}", path.display());
            report.problems.push(problem.clone());
            if must_read {
                report.unreadable.get_or_insert(problem);
            }
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
    let power_budget = match value.get("power_budget") {
        None | Some(serde_json::Value::Null) => None,
        Some(budget) => match serde_json::from_value::<SavedBudget>(budget.clone()) {
            Ok(b) if b.watts.is_finite() && b.watts > 0.0 => Some(b),
            Ok(b) => {
                report.problems.push(format!(
                    "{}: the saved power budget of {} W is not a positive number; dropped",
                    path.display(),
                    b.watts
                ));
                None
            }
            Err(e) => {
                report.problems.push(format!(
                    "{}: the saved power budget is damaged ({e}); dropped",
                    path.display()
                ));
                None
            }
        },
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
    Some((gpus, power_budget))
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
    async fn the_power_budget_round_trips_and_a_damaged_one_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = StateStore::open(Some(dir.path()));
        let budget = SavedBudget {
            watts: 4000.0,
            set_by: "ops".into(),
            set_at_unix_s: 1_700_000_000,
        };
        store
            .set_power_budget(Some(budget.clone()))
            .await
            .expect("save");
        store
            .update("GPU-a", |s| s.threshold_c = Some(70))
            .await
            .expect("save");
        let (mut store, report) = StateStore::open(Some(dir.path()));
        assert!(report.problems.is_empty(), "{report:?}");
        assert_eq!(store.power_budget(), Some(&budget));
        store.set_power_budget(None).await.expect("save");
        let (store, _) = StateStore::open(Some(dir.path()));
        assert_eq!(store.power_budget(), None);
        assert_eq!(store.get("GPU-a").threshold_c, Some(70));
        std::fs::write(
            dir.path().join(FILE),
            r#"{"version":1,"gpus":{},"power_budget":{"watts":-5,"set_by":"x","set_at_unix_s":0}}"#,
        )
        .expect("write");
        let (store, report) = StateStore::open(Some(dir.path()));
        assert_eq!(store.power_budget(), None);
        assert!(
            report.problems.iter().any(|p| p.contains("-5 W")),
            "{report:?}"
        );
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

    fn threshold_bytes(t: u32) -> Vec<u8> {
        let (mut store, _) = StateStore::with_writer(&Persister::memory());
        // In memory only: the ack is ready at once and not needed.
        drop(store.update("GPU-a", |s| s.threshold_c = Some(t)));
        store.encode().expect("encode")
    }

    fn loaded_threshold(dir: &Path) -> (Option<u32>, StateReport) {
        let (store, report) = StateStore::open(Some(dir));
        (store.get("GPU-a").threshold_c, report)
    }

    #[tokio::test]
    async fn every_crash_point_of_a_save_leaves_a_loadable_state() {
        use crate::persist::{SaveStep, save_interrupted_before};
        let stops = SaveStep::ALL.into_iter().map(Some).chain([None]);
        for stop in stops {
            let dir = tempfile::tempdir().expect("tempdir");
            {
                let (mut store, _) = StateStore::open(Some(dir.path()));
                for t in [75, 76] {
                    store
                        .update("GPU-a", |s| s.threshold_c = Some(t))
                        .await
                        .expect("save");
                }
            }
            // A crash in the middle of saving 77: only the steps before
            // `stop` happened.
            save_interrupted_before(dir.path(), STATE_FILE, &threshold_bytes(77), stop)
                .expect("the steps before the crash");
            assert!(
                dir.path().join(FILE).exists(),
                "{stop:?}: state.json is never missing once it existed"
            );
            let (threshold, report) = loaded_threshold(dir.path());
            let expected = match stop {
                Some(SaveStep::SyncDirectory) | None => Some(77),
                Some(_) => Some(76),
            };
            assert_eq!(threshold, expected, "crash before {stop:?}: {report:?}");
            assert!(report.problems.is_empty(), "{stop:?}: {report:?}");
            assert!(report.unreadable.is_none());
        }
    }

    #[tokio::test]
    async fn a_crash_during_the_first_save_ever_or_mid_write_leaves_a_loadable_state() {
        use crate::persist::{SaveStep, save_interrupted_before};
        // The first save ever, interrupted after the temporary file is on
        // disk: no state.json yet, the temporary file is complete.
        let dir = tempfile::tempdir().expect("tempdir");
        save_interrupted_before(
            dir.path(),
            STATE_FILE,
            &threshold_bytes(70),
            Some(SaveStep::DropPrevious),
        )
        .expect("steps");
        assert_eq!(loaded_threshold(dir.path()).0, Some(70));

        // Power lost mid-write of the temporary file: it is torn, the
        // current version is untouched.
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(FILE), threshold_bytes(71)).expect("current");
        let torn = threshold_bytes(72);
        fs::write(dir.path().join(TEMPORARY), &torn[..torn.len() / 2]).expect("torn");
        let (threshold, report) = loaded_threshold(dir.path());
        assert_eq!(threshold, Some(71));
        assert!(report.problems.is_empty(), "{report:?}");

        // The same with no state.json at all (a previous version only).
        fs::remove_file(dir.path().join(FILE)).expect("rm");
        fs::write(dir.path().join(PREVIOUS), threshold_bytes(69)).expect("prev");
        assert_eq!(loaded_threshold(dir.path()).0, Some(69));
    }

    #[tokio::test]
    async fn a_crash_between_the_renames_of_0_1_0_loads_the_newest_complete_version() {
        // 0.1.0 renamed state.json to .prev, then the temporary file to
        // state.json: a crash between them left no state.json.
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(PREVIOUS), threshold_bytes(75)).expect("prev");
        fs::write(dir.path().join(TEMPORARY), threshold_bytes(76)).expect("tmp");
        let (threshold, report) = loaded_threshold(dir.path());
        assert_eq!(threshold, Some(76), "{report:?}");
        assert_eq!(report.problems.len(), 1, "and says so: {report:?}");
        assert!(report.problems[0].contains("missing"), "{report:?}");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn an_unreadable_state_file_is_reported_as_unreadable_not_as_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        fs::write(&path, threshold_bytes(75)).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).expect("chmod");
        if fs::read(&path).is_ok() {
            eprintln!("running as root: permissions are not enforced; skipped");
            return;
        }
        let (_, report) = loaded_threshold(dir.path());
        let unreadable = report.unreadable.expect("unreadable");
        assert!(unreadable.contains("state.json"), "{unreadable}");
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            index: 3,
            uuid: "GPU-a".to_owned(),
            power_min_mw: Some(200_000),
            power_max_mw: Some(700_000),
            ..DeviceFacts::default()
        }
    }

    #[tokio::test]
    async fn out_of_range_saved_values_are_dropped_naming_the_gpu_and_the_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (entry, dropped, kept) in [
            (r#"{"operator_ceiling_mw":0}"#, "0 mW", None),
            (r#"{"operator_ceiling_mw":900000}"#, "900000 mW", None),
            (r#"{"threshold_c":5}"#, "5 °C", None),
            (
                r#"{"threshold_c":500,"operator_ceiling_mw":400000}"#,
                "500 °C",
                Some(400_000),
            ),
            (
                r#"{"threshold_c":75,"hysteresis_c":0}"#,
                "hysteresis of 0",
                None,
            ),
            (
                r#"{"threshold_c":75,"hysteresis_c":60}"#,
                "hysteresis of 60",
                None,
            ),
        ] {
            fs::write(
                dir.path().join(FILE),
                format!(r#"{{"version":1,"gpus":{{"GPU-a":{entry}}}}}"#),
            )
            .expect("write");
            let (mut store, report) = StateStore::open(Some(dir.path()));
            assert!(report.problems.is_empty(), "{report:?}");
            let problems = store.sanitize(&facts());
            assert_eq!(problems.len(), 1, "{entry}: {problems:?}");
            assert!(problems[0].contains("GPU 3 (GPU-a)"), "{problems:?}");
            assert!(problems[0].contains(dropped), "{entry}: {problems:?}");
            let state = store.get("GPU-a");
            assert_eq!(state.operator_ceiling_mw, kept, "{entry}");
            assert!(state.hysteresis_c.is_none(), "{entry}");
            assert!(
                state.threshold_c.is_none_or(|t| t == 75),
                "{entry}: {state:?}"
            );
        }
        // In range: kept as is.
        fs::write(
            dir.path().join(FILE),
            r#"{"version":1,"gpus":{"GPU-a":{"operator_ceiling_mw":400000,"threshold_c":75,"hysteresis_c":8}}}"#,
        )
        .expect("write");
        let (mut store, _) = StateStore::open(Some(dir.path()));
        assert!(store.sanitize(&facts()).is_empty());
        assert_eq!(store.get("GPU-a").hysteresis_c, Some(8));
    }
}
