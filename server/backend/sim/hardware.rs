//! Simulated hardware settings that outlive the daemon, as a real GPU's do.
//!
//! A real GPU keeps its power limit and clock locks when the process that set
//! them dies; only a driver reload or a GPU reset clears them. For the
//! simulator to show what gpuwatch does after a crash (clear the stale
//! throttle it left), the simulated boards must remember their settings
//! across daemon restarts too. This store keeps them in a small JSON file
//! (in the daemon's state directory), keyed by GPU UUID.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

/// The settings a simulated board keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoardSettings {
    pub power_limit_mw: Option<u32>,
    pub gpu_clock_lock: Option<(u32, u32)>,
    pub memory_clock_locked: bool,
}

/// Settings of every simulated board.
#[derive(Debug, Default)]
pub struct HardwareStore {
    path: Option<PathBuf>,
    boards: Mutex<BTreeMap<String, BoardSettings>>,
}

impl HardwareStore {
    /// Settings kept in memory only (every daemon start is a cold boot).
    pub fn volatile() -> Self {
        Self::default()
    }

    /// Settings kept in `path`. A missing or damaged file means boards at
    /// their boot defaults.
    pub fn at(path: PathBuf) -> Self {
        let boards = fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self {
            path: Some(path),
            boards: Mutex::new(boards),
        }
    }

    pub fn get(&self, uuid: &str) -> BoardSettings {
        self.boards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uuid)
            .copied()
            .unwrap_or_default()
    }

    /// Records a board's settings (best effort: a failed save only means the
    /// next daemon start sees a cold board).
    pub fn set(&self, uuid: &str, settings: BoardSettings) {
        let mut boards = self.boards.lock().unwrap_or_else(PoisonError::into_inner);
        if boards.get(uuid) == Some(&settings) {
            return;
        }
        boards.insert(uuid.to_owned(), settings);
        if let Some(path) = &self.path
            && let Ok(json) = serde_json::to_vec(&*boards)
        {
            let tmp = path.with_extension("tmp");
            if fs::write(&tmp, json)
                .and_then(|()| fs::rename(&tmp, path))
                .is_err()
            {
                tracing::debug!(path = %path.display(), "could not save simulated board settings");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_new_store_on_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("boards.json");
        let store = HardwareStore::at(path.clone());
        let s = BoardSettings {
            power_limit_mw: Some(450_000),
            gpu_clock_lock: Some((300, 1200)),
            memory_clock_locked: false,
        };
        store.set("GPU-a", s);
        assert_eq!(HardwareStore::at(path).get("GPU-a"), s);
        assert_eq!(
            HardwareStore::volatile().get("GPU-a"),
            BoardSettings::default()
        );
    }
}
