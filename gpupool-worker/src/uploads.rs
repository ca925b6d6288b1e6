//! After a run: its files recorded where they are, and uploaded to the
//! artifact store off the run's slot.
//!
//! When a run ends and its files are kept in its output directory, the
//! worker reports the run, gives back its GPUs and slot, and only then
//! records the files ([`gpupool_core::Queue::record_artifacts`]) as being
//! on this host. With an artifact store, an upload starts in the
//! background (at most [`PARALLEL_UPLOADS`] at once), so the next job does
//! not wait for it. A verified upload is recorded with the store's
//! location, and the uploaded files are removed here unless
//! `keep_outputs` is set (a symlink the run made, never uploaded, stays);
//! a failed one is recorded with its reason, and the files stay here. A
//! worker that stops waits for its uploads as it waits for its runs; one
//! stopped at once leaves them here, recorded as such.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpupool_core::artifacts::{ArtifactFile, Artifacts, human_size};
use gpupool_core::{Error, JobId, Queue};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::store::ArtifactStore;

/// Uploads running at once, per worker.
const PARALLEL_UPLOADS: usize = 2;

/// How long recording where the files are is retried while the backend
/// cannot be reached.
const RECORD_FOR: Duration = Duration::from_secs(120);

/// The files an attempt left in its output directory.
#[derive(Debug)]
pub(crate) struct RunFiles {
    /// The output directory (`DATA_DIR/outputs/q-…/job-ID/attempt-N`).
    pub dir: PathBuf,
    /// The attempt.
    pub attempt: u32,
    /// The files in it, by relative path.
    pub files: Vec<ArtifactFile>,
}

/// What keeping a run's files needs from the worker.
#[derive(Debug)]
pub(crate) struct Keeper {
    pub queue: Arc<dyn Queue>,
    pub store: Option<ArtifactStore>,
    pub keep_outputs: bool,
    /// This host's name, as locations name it.
    pub host: String,
    /// `DATA_DIR/outputs`: store folders are output directories' paths
    /// below it.
    pub outputs_root: PathBuf,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
}

impl Keeper {
    pub(crate) fn new(
        queue: Arc<dyn Queue>,
        store: Option<ArtifactStore>,
        keep_outputs: bool,
        host: String,
        outputs_root: PathBuf,
    ) -> Self {
        Keeper {
            queue,
            store,
            keep_outputs,
            host,
            outputs_root,
            tracker: TaskTracker::new(),
            slots: Arc::new(Semaphore::new(PARALLEL_UPLOADS)),
        }
    }

    /// Records `run`'s files as on this host, then starts their upload when
    /// there is a store. `log` is the job's log on this host.
    pub(crate) async fn keep(self: &Arc<Self>, id: &JobId, run: RunFiles, log: PathBuf) {
        let dir = std::fs::canonicalize(&run.dir).unwrap_or(run.dir);
        let local = Artifacts {
            attempt: run.attempt,
            location: format!("{}:{}", self.host, dir.display()),
            stored: false,
            files: run.files,
            error: None,
        };
        // Uploaded even if this record could not be made because the
        // backend is away (the upload's own record may still get through),
        // but not for a job that is gone.
        if let Recorded::Gone = record(self.queue.as_ref(), id, &local).await {
            return;
        }
        let Some(store) = self.store.clone() else { return };
        let (keeper, id) = (Arc::clone(self), id.clone());
        let span = tracing::Span::current();
        self.tracker.spawn(
            async move {
                let Ok(_slot) = Arc::clone(&keeper.slots).acquire_owned().await else { return };
                keeper.upload(&store, &id, dir, local, &log).await;
            }
            .instrument(span),
        );
    }

    async fn upload(&self, store: &ArtifactStore, id: &JobId, dir: PathBuf, local: Artifacts, log: &std::path::Path) {
        // The output folder's path under DATA_DIR/outputs, and a suffix of
        // its own: two runs never share a store folder, even with the same
        // attempt number (a queue whose ids started again, a run lost with
        // its worker and run again elsewhere).
        let root = std::fs::canonicalize(&self.outputs_root).unwrap_or_else(|_| self.outputs_root.clone());
        let folder = dir
            .strip_prefix(&root)
            .map(|rel| rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"))
            .unwrap_or_else(|_| format!("job-{id}/attempt-{}", local.attempt));
        let folder = format!("{folder}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let started = tokio::time::Instant::now();
        let total = human_size(local.total_bytes());
        match store.upload(&dir, &folder, &local.files).await {
            Ok(()) => {
                let stored = Artifacts { location: store.location(&folder), stored: true, ..local };
                let line = format!(
                    "uploaded {} file(s), {total}, to {} in {:.1} s",
                    stored.files.len(),
                    stored.location,
                    started.elapsed().as_secs_f64()
                );
                info!("{line}");
                crate::worker::note(log, &line).await;
                // The local copy goes only once the record says where the
                // files are now.
                if matches!(record(self.queue.as_ref(), id, &stored).await, Recorded::Yes) && !self.keep_outputs {
                    let (gone, files) = (dir.clone(), stored.files);
                    if let Err(e) = tokio::task::spawn_blocking(move || remove_uploaded(&gone, &files)).await {
                        warn!("cannot remove the uploaded files in {} ({e})", dir.display());
                    }
                }
            }
            Err(e) => {
                let why = format!("upload to {} failed: {e}; the files stay at {}", store.base(), local.location);
                warn!("{why}");
                crate::worker::note(log, &why).await;
                record(self.queue.as_ref(), id, &Artifacts { error: Some(why), ..local }).await;
            }
        }
    }

    /// Waits for the uploads under way, up to `timeout` or until `stop_now`.
    pub(crate) async fn drain(&self, timeout: Duration, stop_now: &tokio_util::sync::CancellationToken) {
        self.tracker.close();
        if self.tracker.is_empty() {
            return;
        }
        info!(uploads = self.tracker.len(), "stopping: waiting for uploads to the artifact store");
        tokio::select! {
            _ = tokio::time::timeout(timeout, self.tracker.wait()) => {}
            () = stop_now.cancelled() => {}
        }
        if !self.tracker.is_empty() {
            warn!(uploads = self.tracker.len(), "stopping with uploads unfinished; their files stay on this host");
        }
    }
}

/// Removes the uploaded `files` from `dir`, then the folders left empty:
/// what was not uploaded (a symlink the run made) stays, with its folder.
fn remove_uploaded(dir: &std::path::Path, files: &[ArtifactFile]) {
    for file in files {
        if let Ok(path) = crate::store::safe_join(dir, &file.path)
            && let Err(e) = std::fs::remove_file(&path)
        {
            warn!("cannot remove the uploaded {} ({e})", path.display());
        }
    }
    remove_empty_dirs(dir);
}

/// Removes the empty folders under `dir`, and `dir` if it ends empty.
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir); // only if empty
}

/// What [`record`] came to.
enum Recorded {
    Yes,
    /// The job is not in the queue.
    Gone,
    /// The backend did not take it (away too long, or an error).
    No,
}

/// Records `artifacts` on job `id`, retrying while the backend cannot be
/// reached.
async fn record(queue: &dyn Queue, id: &JobId, artifacts: &Artifacts) -> Recorded {
    let give_up = tokio::time::Instant::now() + RECORD_FOR;
    let mut pause = Duration::from_millis(200);
    loop {
        match queue.record_artifacts(id, artifacts).await {
            Ok(()) => return Recorded::Yes,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < give_up => {
                warn!("cannot record where the run's files are yet ({e}); retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e @ Error::NotFound { .. }) => {
                warn!("cannot record where the run's files are: {e}; they stay at {}", artifacts.location);
                return Recorded::Gone;
            }
            Err(e) => {
                warn!("cannot record where the run's files are ({e}); they are at {}", artifacts.location);
                return Recorded::No;
            }
        }
    }
}
