//! Sharing one data directory between any number of worker processes.
//!
//! Teams run several workers on one host (one per GPU, one per queue), and
//! all of them use the same data directory by default. What they share is
//! guarded by locks that hold across processes ([`FileLock`], `flock(2)`
//! through the standard library): a mirror while it is created, fetched or
//! checked out from, and the setup step with its cache. The kernel drops a
//! lock when its process dies, however it dies, so a killed worker leaves
//! no stale lock behind: the next process simply gets it.
//!
//! What is a process's own lives under its *instance* ([`Instance`]): a
//! unique id (`PID-RANDOM`), held locked for the life of the process in
//! `DATA_DIR/instances/ID.lock`. Its checkouts go to `checkouts/ID/` and
//! its result journal to `journal/ID/`, so no two processes ever pick the
//! same path. An instance whose lock can be taken belongs to a process that
//! is gone: the next worker to start removes its checkouts and delivers
//! what its journal still holds ([`dead_instances`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// An exclusive lock on a file that holds across processes. Released when
/// dropped, or by the kernel when the process dies.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Waits for the lock on `path` (created with its folder if missing).
    /// Blocking: call it from a blocking thread.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let file = open(path)?;
        file.lock()?;
        Ok(FileLock { _file: file, path: path.to_owned() })
    }

    /// The lock on `path` if no one holds it, else `None`.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: file, path: path.to_owned() })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// [`acquire`](FileLock::acquire) on a blocking thread.
    pub async fn acquire_async(path: PathBuf) -> io::Result<FileLock> {
        tokio::task::spawn_blocking(move || FileLock::acquire(&path)).await.map_err(io::Error::other)?
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).truncate(false).write(true).open(path)
}

/// This process's own part of a data directory (see the module docs).
#[derive(Debug)]
pub struct Instance {
    /// `PID-RANDOM`, unique among every process that ever used the folder.
    pub id: String,
    data_dir: PathBuf,
    _lock: FileLock,
}

impl Instance {
    /// This process's instance in `data_dir`, claimed on first use and held
    /// until the process exits (one per data directory per process).
    pub fn claim(data_dir: &Path) -> io::Result<Arc<Instance>> {
        static CLAIMED: OnceLock<Mutex<HashMap<PathBuf, Arc<Instance>>>> = OnceLock::new();
        let mut claimed = gpupool_core::sync::lock(CLAIMED.get_or_init(Mutex::default));
        if let Some(instance) = claimed.get(data_dir) {
            return Ok(Arc::clone(instance));
        }
        let id = format!("{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        // Locked under a name no one looks at, then renamed into place: no
        // other process ever sees this instance's file unlocked (and takes
        // it for a dead one's).
        let path = lock_path(data_dir, &id);
        let hidden = path.with_extension("new");
        let mut lock = FileLock::try_acquire(&hidden)?
            .ok_or_else(|| io::Error::other(format!("instance {id} is already locked")))?;
        std::fs::rename(&hidden, &path)?;
        lock.path = path;
        let instance = Arc::new(Instance { id, data_dir: data_dir.to_owned(), _lock: lock });
        claimed.insert(data_dir.to_owned(), Arc::clone(&instance));
        Ok(instance)
    }

    /// Where this process's checkouts go.
    pub fn checkouts(&self) -> PathBuf {
        checkouts_dir(&self.data_dir, &self.id)
    }

    /// Where this process journals results before reporting them.
    pub fn journal(&self) -> PathBuf {
        journal_dir(&self.data_dir, &self.id)
    }
}

fn lock_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("instances").join(format!("{id}.lock"))
}

fn checkouts_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("checkouts").join(id)
}

fn journal_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("journal").join(id)
}

/// An instance whose process is gone, locked by the caller while it cleans
/// up after it.
#[derive(Debug)]
pub struct DeadInstance {
    /// Its id.
    pub id: String,
    data_dir: PathBuf,
    lock: FileLock,
}

impl DeadInstance {
    /// Where its checkouts were.
    pub fn checkouts(&self) -> PathBuf {
        checkouts_dir(&self.data_dir, &self.id)
    }

    /// Its result journal.
    pub fn journal(&self) -> PathBuf {
        journal_dir(&self.data_dir, &self.id)
    }

    /// Forgets the instance once nothing of it is left: its journal is
    /// empty (a journal entry for another queue keeps it, for that queue's
    /// worker to deliver).
    pub fn forget_if_done(self) {
        let journal = self.journal();
        let empty = std::fs::read_dir(&journal).map_or(true, |mut d| d.next().is_none());
        if empty {
            let _ = std::fs::remove_dir(&journal);
            let _ = std::fs::remove_file(self.lock.path());
        }
    }
}

/// The instances of `data_dir` whose processes are gone (their lock is
/// free), each locked for the caller. Blocking.
pub fn dead_instances(data_dir: &Path) -> Vec<DeadInstance> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("instances")) else { return Vec::new() };
    let mut dead = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".lock") else { continue };
        if let Ok(Some(lock)) = FileLock::try_acquire(&entry.path()) {
            dead.push(DeadInstance { id: id.to_owned(), data_dir: data_dir.to_owned(), lock });
        }
    }
    dead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holds_across_open_files_and_frees_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.lock");
        let held = FileLock::acquire(&path).unwrap();
        // Another open file description is another holder, as another
        // process would be.
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_acquire(&path).unwrap().is_some());
    }

    #[test]
    fn a_live_instance_is_not_dead_and_a_free_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let me = Instance::claim(dir.path()).unwrap();
        assert!(Arc::ptr_eq(&me, &Instance::claim(dir.path()).unwrap()), "one per data directory");
        // A lock file nobody holds: a process that died.
        std::fs::write(lock_path(dir.path(), "1-gone"), "").unwrap();
        let dead = dead_instances(dir.path());
        assert_eq!(dead.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["1-gone"]);
        assert!(me.checkouts().ends_with(format!("checkouts/{}", me.id)));
        for d in dead {
            d.forget_if_done();
        }
        assert!(!lock_path(dir.path(), "1-gone").exists());
        assert!(dead_instances(dir.path()).is_empty());
    }
}
