//! The [`Workspace`] trait: where the code for a job comes from.
//!
//! What lives here: the contract and the values that cross it. What does
//! not: any implementation (the git one is `GitWorkspace` in
//! `gpupool-worker`).

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::FailureKind;
use crate::redact::redact_url;

/// Why the code for a job could not be prepared. `kind` is `Ref` or `Repo`
/// (neither is retried: the same job would fail the same way), or `Worker`:
/// a fault of this host (disk, network, credentials), after which the
/// worker gives the job back uncharged for another worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareError {
    /// `Ref` (no such ref, no entrypoint at that commit) or `Repo`
    /// (cannot fetch, not allowed).
    pub kind: FailureKind,
    /// A readable reason, with no secret in it.
    pub message: String,
}

impl PrepareError {
    /// The repository cannot be reached or read (kind `repo`). URLs in the
    /// message have their passwords replaced.
    pub fn repo(message: impl Into<String>) -> Self {
        PrepareError { kind: FailureKind::Repo, message: redact_url(&message.into()) }
    }

    /// A fault of this host, not the job (kind `worker`): a checkout that
    /// cannot be written, a git host that cannot be reached, no credentials.
    /// URLs in the message have their passwords replaced.
    pub fn worker(message: impl Into<String>) -> Self {
        PrepareError { kind: FailureKind::Worker, message: redact_url(&message.into()) }
    }

    /// The ref or the entrypoint does not exist there (kind `ref`). URLs in
    /// the message have their passwords replaced.
    pub fn git_ref(message: impl Into<String>) -> Self {
        PrepareError { kind: FailureKind::Ref, message: redact_url(&message.into()) }
    }
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl std::error::Error for PrepareError {}

/// A job's checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// The folder holding the code.
    pub dir: PathBuf,
    /// The full commit id the ref resolved to (or whatever names the exact
    /// code version for a workspace without git).
    pub commit: String,
}

/// What a job asks a [`Workspace`] for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareRequest<'a> {
    /// The repository (URL or local path), already allowed by the worker.
    pub repo: &'a str,
    /// A branch, tag or (abbreviated) commit id.
    pub git_ref: &'a str,
    /// The file the job runs, relative to the repository root.
    pub entrypoint: &'a str,
    /// A name for the checkout that no other running job has, such as
    /// `job-42-1` (job 42, attempt 1).
    pub label: &'a str,
    /// Uncommitted code to apply on top of `git_ref` (the bytes of a
    /// snapshot that `gpupool push --snapshot` took; the worker has checked
    /// them against their hash). Only a workspace that
    /// [`applies_snapshots`](Workspace::applies_snapshots) is given one.
    pub snapshot: Option<&'a [u8]>,
}

/// Prepares the code a job runs: a directory at one exact version.
///
/// # Overview
///
/// The worker calls [`prepare`](Workspace::prepare) once per attempt, after
/// it has checked that the job's repository is allowed, and
/// [`remove`](Workspace::remove) once the run has ended, whatever its end.
/// Several jobs are prepared at the same time from one workspace.
///
/// ```
/// use gpupool_core::async_trait;
/// use gpupool_core::workspace::{Checkout, PrepareError, PrepareRequest, Workspace};
///
/// /// Code from a shared filesystem: `/code/REF` already holds each version.
/// #[derive(Debug)]
/// struct SharedDir;
///
/// #[async_trait]
/// impl Workspace for SharedDir {
///     async fn prepare(&self, job: &PrepareRequest<'_>) -> Result<Checkout, PrepareError> {
///         let dir = std::path::Path::new("/code").join(job.git_ref);
///         if !dir.join(job.entrypoint).is_file() {
///             return Err(PrepareError::git_ref(format!("no {} in {}", job.entrypoint, dir.display())));
///         }
///         Ok(Checkout { dir, commit: job.git_ref.to_owned() })
///     }
///
///     async fn remove(&self, _checkout: &Checkout) {} // shared: nothing to clean up
///
///     async fn changed(&self, _checkout: &Checkout) -> Result<Vec<std::path::PathBuf>, String> {
///         Ok(Vec::new()) // read-only code: runs write only to GPUPOOL_OUTPUT_DIR
///     }
///
///     fn secrets(&self) -> Vec<String> {
///         Vec::new()
///     }
/// }
/// ```
///
/// # Implementing
///
/// - `prepare` returns a directory that no other running job uses (or that
///   no job writes to), at exactly the version `git_ref` names, and the
///   full id of that version in [`Checkout::commit`].
/// - It checks that `entrypoint` exists in that directory and does not
///   lead out of it (no `..`, no symlink pointing outside); the worker runs
///   whatever file it names.
/// - It never reads a terminal itself: a workspace runs in the background,
///   and asks a person only through a prompt the program gave it. Tokens it
///   uses are returned by [`secrets`](Workspace::secrets), so that the
///   runner keeps them out of job output.
///
/// # Errors
///
/// A [`PrepareError`] of kind `ref` (no such ref or entrypoint) or `repo`
/// (cannot fetch, cannot write the checkout). Neither is retried: the same
/// job would fail the same way. Its message reaches `gpupool errors`, so it
/// names the ref or URL (passwords replaced) and what to do.
///
/// # Cancellation safety
///
/// A dropped `prepare` may leave a partial directory under its label; the
/// worker never drops it. `remove` is best effort and logs what it cannot
/// delete.
#[async_trait]
pub trait Workspace: Send + Sync + fmt::Debug {
    /// Makes the code for a job ready to run.
    async fn prepare(&self, job: &PrepareRequest<'_>) -> Result<Checkout, PrepareError>;

    /// Cleans up a checkout that `prepare` returned, once its run has ended.
    async fn remove(&self, checkout: &Checkout);

    /// What the run created or changed in `checkout`, as paths relative to
    /// its folder: every file that is not identical to the version's own
    /// file, git-ignored ones included (`model/`, `*.pth`, `wandb/`). A
    /// folder listed is new as a whole. A symlink is listed as itself when
    /// the run made or changed it, never followed. The worker moves each
    /// into the run's output directory (a rename) before
    /// [`remove`](Workspace::remove), so a model saved in the checkout is
    /// kept. `Err` (a message) when the folder cannot be compared; the
    /// worker then keeps the whole checkout.
    async fn changed(&self, checkout: &Checkout) -> Result<Vec<std::path::PathBuf>, String>;

    /// Strings to keep out of job output (the tokens this workspace uses).
    fn secrets(&self) -> Vec<String>;

    /// Whether [`prepare`](Workspace::prepare) applies a request's
    /// `snapshot` (the files it holds written over the checkout, those it
    /// deletes removed, before the entrypoint is checked; files it wrote
    /// are not reported by [`changed`](Workspace::changed)). `false` (the
    /// default): the worker fails a job that has one, kind `ref`, saying
    /// this worker cannot run uncommitted code.
    fn applies_snapshots(&self) -> bool {
        false
    }
}
