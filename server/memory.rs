//! Gives the allocator's free pages back to the system after a large
//! answer.
//!
//! Why it exists: a history answer can be many megabytes (a day of every
//! field for eight GPUs, as points, is about 16 MB), built and encoded on a
//! blocking thread and written out by the connection's task. Once it is
//! sent, glibc's allocator keeps the freed pages in its arenas for the next
//! allocation of that size, which never comes on a daemon that is otherwise
//! small: measured, 55–60 MiB of RSS held after a few large queries by a
//! daemon whose working set is 15 MiB. What this module owns: one thread
//! that, once large answers have stopped for [`QUIET`], asks the allocator
//! to return its free pages (`malloc_trim`), and the owner type that tells
//! it when a large answer's bytes are released. Queries back to back are
//! not slowed by it (the trim waits for a quiet moment); where the
//! allocator is not glibc's, nothing is done.
//!
//! glibc's `malloc_trim` returns the free pages inside every arena but
//! shrinks only the main arena's top; a thread arena keeps its top chunk,
//! which after a 16 MB answer is most of what it freed (measured: 35 MiB
//! still held after a trim, 16 MB of it one arena's top). So the daemon runs
//! on the main arena alone ([`configure_allocator`]): its threads are few,
//! the small allocations that dominate its hot paths come from each
//! thread's cache without the arena's lock, and the trim then returns what
//! the answers used.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender},
    },
    time::Duration,
};

use bytes::Bytes;

/// An answer at least this large asks for a trim when it is released.
pub const LARGE_ANSWER_BYTES: usize = 1 << 20;

/// How long large answers must have stopped before the trim: a burst of
/// queries is trimmed once, after the last.
pub const QUIET: Duration = Duration::from_millis(100);

/// Trims made since start (what the tests observe).
static TRIMS: AtomicU64 = AtomicU64::new(0);

/// The trimming thread's doorbell, started at the first large answer.
fn doorbell() -> Option<&'static SyncSender<()>> {
    static BELL: OnceLock<Option<SyncSender<()>>> = OnceLock::new();
    BELL.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("gpuwatch-trim".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Wait for the burst to end.
                    loop {
                        match rx.recv_timeout(QUIET) {
                            Ok(()) => {}
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    trim_now();
                }
            })
            .map_err(|e| tracing::warn!("could not start the memory trim thread: {e}"))
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

/// A large answer was released: trim once large answers stop for
/// [`QUIET`]. Never blocks.
fn large_answer_released() {
    if let Some(bell) = doorbell() {
        // Full: a trim is already due, which covers this answer too.
        let _ = bell.try_send(());
    }
}

/// Makes every thread allocate from the main arena (see the module's
/// comment), unless the operator set `MALLOC_ARENA_MAX`, which glibc reads
/// itself. Call first in `main`, before any thread starts: a thread keeps
/// the arena it was given.
pub fn configure_allocator() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes plain integers and changes an allocator
        // parameter under the allocator's own lock (glibc's mallopt(3)).
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Trims made since start.
#[cfg(test)]
fn trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

/// Returns the allocator's free pages to the system now, counted.
fn trim_now() {
    release_free_pages();
    TRIMS.fetch_add(1, Ordering::Relaxed);
}

fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only walks the
        // allocator's own free lists under its locks; any thread may call
        // it at any time (glibc's malloc(3)).
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Bytes of an answer that asks for a trim when the last reference to
/// them is dropped, if they are large (see [`LARGE_ANSWER_BYTES`]).
pub fn answer_bytes(buf: Vec<u8>) -> Bytes {
    if buf.len() < LARGE_ANSWER_BYTES {
        return Bytes::from(buf);
    }
    Bytes::from_owner(TrimOnDrop(buf))
}

/// Owns a large answer's buffer; its release rings the trim thread.
struct TrimOnDrop(Vec<u8>);

impl AsRef<[u8]> for TrimOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        // Free the buffer first, so the trim can return its pages.
        drop(std::mem::take(&mut self.0));
        large_answer_released();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn wait_for_trims_over(before: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if trims() > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn releasing_a_large_answer_trims_once_the_burst_ends() {
        // The only test that rings the trim thread: the count is its own.
        let before = trims();
        let small = answer_bytes(vec![7; 100]);
        assert_eq!(&small[..], &[7; 100][..]);
        drop(small);
        let data: Vec<u8> = (0..LARGE_ANSWER_BYTES + 5).map(|i| i as u8).collect();
        let large = answer_bytes(data.clone());
        assert_eq!(&large[..], &data[..]);
        let part = large.slice(10..20);
        assert_eq!(&part[..], &data[10..20]);
        drop(large);
        std::thread::sleep(QUIET * 3);
        assert_eq!(
            trims(),
            before,
            "a small answer asks for no trim, and a large one still referenced none yet"
        );
        drop(part);
        assert!(
            wait_for_trims_over(before),
            "no trim after the last reference to a large answer was dropped"
        );
        // A burst of releases is trimmed once, after the last.
        let before = trims();
        for _ in 0..5 {
            drop(answer_bytes(vec![2; LARGE_ANSWER_BYTES]));
            std::thread::sleep(QUIET / 5);
        }
        assert!(wait_for_trims_over(before), "no trim after the burst");
        std::thread::sleep(QUIET * 3);
        let made = trims() - before;
        assert!(made <= 2, "{made} trims for one burst of five releases");
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_freed_pages_the_allocator_kept() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        // Fragment the heap as answers do: 4,000 blocks of 32 KiB (below
        // glibc's mmap threshold, so from the heap), every 50th kept, so
        // freeing the rest leaves free pages between used ones. On a
        // thread of its own, so the blocks come from an arena other tests
        // are unlikely to be using.
        let (freed_kib, returned_kib) = std::thread::spawn(|| {
            let mut blocks: Vec<Vec<u8>> = (0..4000).map(|i| vec![i as u8; 32 << 10]).collect();
            let kept: Vec<Vec<u8>> = blocks
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| i % 50 == 0)
                .map(|(_, b)| std::mem::take(b))
                .collect();
            let full = rss_kib();
            drop(blocks);
            let freed = rss_kib();
            release_free_pages();
            let trimmed = rss_kib();
            drop(kept);
            (full.saturating_sub(freed), freed.saturating_sub(trimmed))
        })
        .join()
        .expect("the allocating thread");
        // 122 MiB were freed between kept blocks: free() keeps most of it,
        // the trim must return most of it.
        let total = 4000 * 32 * 49 / 50;
        assert!(
            returned_kib > total / 2,
            "of {total} KiB freed, free() returned {freed_kib} KiB and the trim {returned_kib} KiB"
        );
    }
}
