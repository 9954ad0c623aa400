//! The state directory as a whole: claimed by one daemon at a time, and
//! checked usable before anything in it is read or written.
//!
//! Why it exists: two daemons on one state directory hand out the same event
//! seqs and overwrite each other's desired state, and a directory the daemon
//! cannot read or write used to restart the audit trail at seq 1 without a
//! word. So before the backend touches a GPU, [`claim`] takes an advisory
//! lock (`flock`, through [`std::fs::File::try_lock`]) on `lock` in the
//! directory, writes this process's pid into it (so a second daemon can name
//! the first), and checks that the directory and every file gpuwatch keeps
//! there can be read and written. A failure is a [`StateDirError`], which
//! the daemon turns into exit code 73 (EX_CANTCREAT) — never a silent reset.
//!
//! What it owns: the lock file and these checks. The files' formats belong to
//! `events.rs` and `state.rs`, writing them to `persist.rs`.

use std::{
    fs::{self, File, OpenOptions, TryLockError},
    io::{self, Read, Seek, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";
/// Files gpuwatch keeps in the state directory that must be readable (and,
/// for the ones appended to in place, writable) when they exist.
const KEPT_FILES: &[(&str, bool)] = &[
    ("events.log", true),
    ("events.log.1", false),
    ("events.refused.log", true),
    ("events.refused.log.1", false),
    ("state.json", false),
    ("state.json.prev", false),
    ("state.json.tmp", false),
];

/// Why the state directory cannot be used.
#[derive(Debug, Error)]
pub enum StateDirError {
    /// The directory does not exist and cannot be created.
    #[error("cannot create the state directory {}: {source}{owner}", dir.display())]
    Create {
        dir: PathBuf,
        source: io::Error,
        /// Who owns the nearest existing parent, and who the daemon runs as.
        owner: String,
    },
    /// Another process holds the lock.
    #[error(
        "the state directory {} is in use by another gpuwatch-server ({holder}, per {}); \
         stop it first, or give this daemon its own --state-dir",
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    Locked { dir: PathBuf, holder: String },
    /// A file or the directory cannot be read or written.
    #[error("cannot {action} {}: {source}{owner}", path.display())]
    Access {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
        /// Who owns it (mode too), and who the daemon runs as.
        owner: String,
    },
    /// What is in the directory could not be loaded (the event log or the
    /// desired state), so starting would throw it away.
    #[error("{0}; refusing to start rather than lose the history and desired state kept there")]
    Unusable(String),
}

/// The claim on a state directory; the lock is released when it is dropped
/// (or the process exits, however it exits).
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
}

/// Creates `dir` if needed, locks it for this process, and checks that
/// everything gpuwatch keeps there can be read and written.
pub fn claim(dir: &Path) -> Result<StateDirLock, StateDirError> {
    if let Err(source) = fs::create_dir_all(dir) {
        let owner = describe_owner(nearest_existing(dir).as_deref().unwrap_or(dir));
        return Err(StateDirError::Create {
            dir: dir.to_path_buf(),
            source,
            owner,
        });
    }
    let lock_path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|source| access("open for writing", &lock_path, source))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => match fs::read_to_string(format!("/proc/{pid}/comm")) {
                    Ok(name) => format!("pid {pid}, {}", name.trim()),
                    Err(_) => format!("pid {pid}"),
                },
                Err(_) => "a process that has not written its pid yet".to_owned(),
            };
            return Err(StateDirError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(TryLockError::Error(source)) => return Err(access("lock", &lock_path, source)),
    }
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{pid}"))
        .and_then(|()| file.sync_data())
        .map_err(|source| access("write", &lock_path, source))?;
    check_writable(dir)?;
    for &(name, appended) in KEPT_FILES {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        File::open(&path).map_err(|source| access("read", &path, source))?;
        if appended {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|source| access("open for appending", &path, source))?;
        }
    }
    Ok(StateDirLock { _file: file })
}

/// Creates and removes a file, as every save does.
fn check_writable(dir: &Path) -> Result<(), StateDirError> {
    let probe = dir.join(format!("{LOCK_FILE}.probe"));
    File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe\n"))
        .map_err(|source| access("create files in", dir, source))?;
    fs::remove_file(&probe).map_err(|source| access("remove files in", dir, source))
}

fn access(action: &'static str, path: &Path, source: io::Error) -> StateDirError {
    StateDirError::Access {
        action,
        path: path.to_path_buf(),
        owner: describe_owner(path),
        source,
    }
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

/// " (owned by uid 0, mode 0755; gpuwatch-server runs as uid 1000)", or
/// nothing when it cannot be told.
fn describe_owner(path: &Path) -> String {
    let Ok(meta) = fs::metadata(path) else {
        return String::new();
    };
    let runs_as = effective_uid().map_or(String::new(), |uid| {
        format!("; gpuwatch-server runs as uid {uid}")
    });
    format!(
        " (owned by uid {}, mode {:04o}{runs_as})",
        meta.uid(),
        meta.permissions().mode() & 0o7777
    )
}

/// This process's effective uid, from `/proc/self/status` (Linux); `None`
/// elsewhere.
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_a_directory_is_refused_naming_the_first_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = claim(dir.path()).expect("the first claim");
        let err = claim(dir.path()).expect_err("a second claim while the first holds it");
        let text = err.to_string();
        assert!(matches!(err, StateDirError::Locked { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "names the holder: {text}"
        );
        drop(first);
        claim(dir.path()).expect("claimable again once released");
    }

    #[test]
    fn a_stale_lock_file_left_by_a_dead_process_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(LOCK_FILE), "4000000\n").expect("stale lock file");
        let _lock = claim(dir.path()).expect("no process holds the lock");
        assert_eq!(
            fs::read_to_string(dir.path().join(LOCK_FILE))
                .expect("read")
                .trim(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        fs::write(&file, "not a directory").expect("write");
        let err = claim(&file.join("state")).expect_err("cannot create under a file");
        assert!(matches!(err, StateDirError::Create { .. }));
        assert!(err.to_string().contains("a-file"), "{err}");
    }
}
