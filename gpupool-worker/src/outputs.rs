//! What a run produces, kept: its output directory, and the files it
//! created or changed in its checkout, moved there when it ends.
//!
//! Each attempt gets `DATA_DIR/outputs/q-QUEUE/job-ID/attempt-N/`
//! (`GPUPOOL_OUTPUT_DIR`), made empty before the run and kept after it. When
//! the run ends, whatever [`Workspace::changed`](gpupool_core::Workspace::changed)
//! lists is renamed into it under the same relative path, before the
//! checkout is removed: a multi-GB checkpoint is moved, never copied (the
//! checkouts and the outputs share the data directory, so one filesystem).
//! If anything cannot be moved, the checkout is kept where it is and the
//! log says so: nothing a run made is deleted unasked. An output directory
//! that ends empty is removed. Outputs stay until the user removes them,
//! or, with [`WorkerConfig::outputs_max_age`](crate::WorkerConfig::outputs_max_age)
//! (`gpupool worker --outputs-max-age 30d`), until nothing in an attempt's
//! folder has changed for that long ([`prune`]).

use std::io;
use std::path::{Path, PathBuf};

use gpupool_core::artifacts::ArtifactFile;

/// The folder of a job's outputs: `DATA_DIR/outputs/q-QUEUE/job-ID`, one
/// `attempt-N` folder per attempt in it.
pub fn job_outputs(data_dir: &Path, queue_id: &str, job: &gpupool_core::JobId) -> PathBuf {
    data_dir.join("outputs").join(crate::worker::queue_folder(queue_id)).join(crate::worker::job_file_stem(job))
}

/// Makes the empty output directory of `attempt` under `job_dir` (with a
/// `-2`, `-3` … suffix if a folder of that name is already there: an
/// attempt that ran again after its worker lost it).
pub(crate) fn make(job_dir: &Path, attempt: u32) -> io::Result<PathBuf> {
    std::fs::create_dir_all(job_dir)?;
    for n in 1u32.. {
        let name = if n == 1 { format!("attempt-{attempt}") } else { format!("attempt-{attempt}-{n}") };
        let dir = job_dir.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free output folder name"))
}

/// Where the run may write a JSON object of results
/// (`GPUPOOL_RESULT_FILE`): beside its output directory, so that it is not
/// one of its files.
pub(crate) fn result_file(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{name}.result.json"))
}

/// What keeping a run's files came to.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// Every file now in the output directory.
    pub files: Vec<ArtifactFile>,
    /// What could not be kept or listed, in words (for the log).
    pub problems: Vec<String>,
    /// Everything `changed` listed was moved: the checkout may go.
    pub moved_all: bool,
}

/// Moves `changed` (relative paths in `checkout`) into `out`, then lists
/// `out`. Blocking.
pub(crate) fn keep(checkout: &Path, changed: &[PathBuf], out: &Path) -> Kept {
    let mut kept = Kept { moved_all: true, ..Kept::default() };
    for rel in changed {
        let from = checkout.join(rel);
        // What the run wrote to GPUPOOL_OUTPUT_DIR itself wins a clash; the
        // checkout's file of that name goes under `_checkout/`.
        let mut to = out.join(rel);
        if to.symlink_metadata().is_ok() {
            to = out.join("_checkout").join(rel);
        }
        let moved = to.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::rename(&from, &to));
        if let Err(e) = moved {
            kept.moved_all = false;
            kept.problems.push(format!("cannot move {} to {} ({e})", from.display(), to.display()));
        }
    }
    list(out, Path::new(""), &mut kept);
    kept.files.sort_by(|a, b| a.path.cmp(&b.path));
    kept
}

/// Adds the regular files under `out/rel` to `kept`. Symlinks are never
/// followed, nor kept as files (they could point anywhere on the host).
fn list(out: &Path, rel: &Path, kept: &mut Kept) {
    let here = out.join(rel);
    let entries = match std::fs::read_dir(&here) {
        Ok(e) => e,
        Err(e) => {
            kept.problems.push(format!("cannot list {} ({e}); its files are kept but not listed", here.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = rel.join(entry.file_name());
        match entry.file_type() {
            Ok(t) if t.is_dir() => list(out, &path, kept),
            Ok(t) if t.is_file() => {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                kept.files.push(ArtifactFile { path: slash_path(&path), size });
            }
            Ok(t) if t.is_symlink() => {
                let target = std::fs::read_link(entry.path()).map(|t| t.display().to_string()).unwrap_or_default();
                kept.problems
                    .push(format!("{} is a symlink (to {target}): kept as a link, never followed", path.display()));
            }
            _ => {}
        }
    }
}

/// `a/b/c` whatever the platform writes.
fn slash_path(p: &Path) -> String {
    p.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Removes `out` if nothing is in it.
pub(crate) fn remove_if_empty(out: &Path) {
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none()) {
        let _ = std::fs::remove_dir(out);
    }
}

/// Removes the output folders under `DATA_DIR/outputs` in which nothing
/// changed for `max_age` (the newest change of any file in one counts, so a
/// running job that writes is never pruned), with their result files.
/// Returns how many it removed. Blocking.
pub(crate) fn prune(data_dir: &Path, max_age: std::time::Duration) -> usize {
    let now = std::time::SystemTime::now();
    let old = |dir: &Path| newest_change(dir).is_some_and(|t| now.duration_since(t).is_ok_and(|age| age > max_age));
    let mut removed = 0;
    let folders = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for queue in folders(&data_dir.join("outputs")) {
        for job in folders(&queue) {
            for attempt in folders(&job) {
                if old(&attempt) && std::fs::remove_dir_all(&attempt).is_ok() {
                    let _ = std::fs::remove_file(result_file(&attempt));
                    removed += 1;
                }
            }
            let _ = std::fs::remove_dir(&job); // only if empty
        }
    }
    removed
}

/// The latest modification time of `dir` or anything under it (links not
/// followed).
fn newest_change(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = dir.symlink_metadata().and_then(|m| m.modified()).ok()?;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        let t = if meta.is_dir() { newest_change(&entry.path()) } else { meta.modified().ok() };
        if let Some(t) = t {
            newest = newest.max(t);
        }
    }
    Some(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_s_files_move_and_a_clash_keeps_both() {
        let root = tempfile::tempdir().unwrap();
        let (checkout, out) = (root.path().join("co"), root.path().join("out"));
        std::fs::create_dir_all(checkout.join("model dir")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(checkout.join("model dir/bést.pth"), b"weights").unwrap();
        std::fs::write(checkout.join("log.txt"), b"checkout").unwrap();
        std::fs::write(out.join("log.txt"), b"output dir").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", checkout.join("link")).unwrap();
        let changed = [PathBuf::from("model dir"), PathBuf::from("log.txt"), PathBuf::from("link")];
        let kept = keep(&checkout, &changed, &out);
        assert!(kept.moved_all, "{:?}", kept.problems);
        let paths: Vec<_> = kept.files.iter().map(|f| (f.path.as_str(), f.size)).collect();
        assert_eq!(paths, [("_checkout/log.txt", 8), ("log.txt", 10), ("model dir/bést.pth", 7)]);
        assert!(kept.problems.iter().any(|p| p.contains("symlink")), "{:?}", kept.problems);
        assert!(!checkout.join("model dir").exists());
    }

    #[test]
    fn prune_removes_only_folders_unchanged_for_the_max_age() {
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("outputs/q-1/job-1");
        let a = make(&job, 1).unwrap();
        std::fs::write(a.join("model.pth"), b"w").unwrap();
        assert_eq!(prune(root.path(), std::time::Duration::from_secs(3600)), 0, "fresh outputs stay");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(prune(root.path(), std::time::Duration::from_millis(10)), 1);
        assert!(!job.exists(), "the empty job folder goes too");
    }

    #[test]
    fn attempts_get_their_own_empty_folder() {
        let root = tempfile::tempdir().unwrap();
        let a = make(root.path(), 1).unwrap();
        let b = make(root.path(), 1).unwrap();
        assert_ne!(a, b);
        assert!(b.ends_with("attempt-1-2"));
        assert_eq!(result_file(&a), root.path().join("attempt-1.result.json"));
    }
}
