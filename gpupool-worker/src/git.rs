//! [`GitWorkspace`]: the [`Workspace`] that gives a job its code at exactly
//! its commit, from a cached git mirror.
//!
//! One bare mirror per repository under `DATA_DIR/repos/`, fetched only when
//! the commit is missing: a ref that looks like a commit id and is already
//! in the mirror is used as it is; for a branch or tag (which may have moved)
//! the remote is asked where it points, without downloading, and the mirror
//! fetches only if that commit is not there yet. Each running job gets its own checkout under
//! `DATA_DIR/checkouts/INSTANCE/` (the worker process's own folder, see
//! [`crate::host`]), written straight from the mirror's object store (no
//! `.git` in it), and removed when the job ends. Worker processes sharing
//! the data directory take turns on a mirror through a lock file beside it.
//!
//! Credentials, tried in order: `GPUPOOL_GIT_TOKEN` (with `GPUPOOL_GIT_USER`,
//! default `x-access-token`) for https; the user's git credential helper, so
//! `git config credential.helper cache` works as in the original tool;
//! ssh-agent for ssh URLs. When none works and the program gave a
//! [`CredentialPrompt`] (the `gpupool` command does, in a terminal), it asks
//! once for a user and an access token and hands them to `git credential
//! approve`, so the user's helper caches them. Without one (in the
//! background, in a library) it fails the job with "no credentials for
//! HOST" instead: nothing here reads a terminal.
//! Tokens never reach the queue, a log or a job's output.
//!
//! git2 is blocking; every call here runs on tokio's blocking pool.
//!
//! # Timeouts and stops
//!
//! A git host that stops answering (a dead VPN, a black-holed route) would
//! hold a checkout forever. Every callback libgit2 makes while connecting,
//! fetching and checking out (credentials, server messages, transfer and
//! checkout progress) counts as progress; when none comes for the stall
//! timeout (2 minutes, [`GitWorkspace::stall_timeout`]), `prepare` gives up
//! with a worker fault ("the git host … sent nothing for 2m"): the job goes
//! back uncharged and the worker pauses. Dropping `prepare`'s future (the
//! job was cancelled, the worker stops) abandons it the same way. An
//! abandoned fetch is aborted at libgit2's next callback and its checkout
//! folder removed. libgit2's own socket timeouts are left at their
//! defaults: setting them is an `unsafe` global (`git2::opts`), which this
//! workspace forbids, so a fetch thread stuck in a silent socket lingers
//! until the OS gives up, holding its mirror's lock; later checkouts of
//! that repository in this process time out the same way meanwhile.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use git2::{CredentialType, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository};
use gpupool_core::async_trait;
use gpupool_core::redact::redact_url;
use gpupool_core::workspace::{Checkout, PrepareError, PrepareRequest, Workspace};

/// Asks a person for git credentials when nothing else has them. A library
/// never reads a terminal: the program that has one (the `gpupool` command)
/// gives the workspace a prompt through [`Credentials::with_prompt`].
pub trait CredentialPrompt: Send + Sync {
    /// A user and an access token for `host`, or `None` if none was given.
    /// Called at most once per process, from a blocking thread.
    fn ask(&self, host: &str) -> Option<(String, String)>;
}

/// Where credentials come from.
#[derive(Clone, Default)]
pub struct Credentials {
    /// A token for https remotes (`GPUPOOL_GIT_TOKEN`).
    pub token: Option<String>,
    /// The user name to send with the token (`GPUPOOL_GIT_USER`).
    pub user: Option<String>,
    /// Who to ask when nothing else works; `None`: nobody.
    prompt: Option<Arc<dyn CredentialPrompt>>,
    /// What was given at the prompt, kept for this process only.
    prompted: Arc<StdMutex<Option<(String, String)>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("user", &self.user)
            .field("prompt", &self.prompt.is_some())
            .finish()
    }
}

impl Credentials {
    /// From `GPUPOOL_GIT_TOKEN` and `GPUPOOL_GIT_USER`, asking nobody.
    pub fn from_env() -> Self {
        Credentials {
            token: std::env::var("GPUPOOL_GIT_TOKEN").ok().filter(|t| !t.is_empty()),
            user: std::env::var("GPUPOOL_GIT_USER").ok().filter(|u| !u.is_empty()),
            prompt: None,
            prompted: Arc::default(),
        }
    }

    /// Builder: ask `prompt` once when no token, helper or agent works.
    pub fn with_prompt(mut self, prompt: Arc<dyn CredentialPrompt>) -> Self {
        self.prompt = Some(prompt);
        self
    }

    /// The secrets to keep out of job output.
    pub fn secrets(&self) -> Vec<String> {
        let prompted = self.prompted.lock().ok().and_then(|p| p.as_ref().map(|(_, t)| t.clone()));
        self.token.iter().cloned().chain(prompted).collect()
    }
}

/// The folder name of `repo`'s mirror, such as `model-0123456789abcdef.git`:
/// its last path part and a hash of the whole URL. The worker names its
/// setup cache after it too.
pub fn mirror_name(repo: &str) -> String {
    let hash = Oid::hash_object(ObjectType::Blob, repo.as_bytes()).map(|o| o.to_string()).unwrap_or_default();
    let base = repo.trim_end_matches('/').rsplit(['/', ':']).next().unwrap_or("repo").trim_end_matches(".git");
    let base: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{base}-{}.git", &hash[..hash.len().min(16)])
}

/// Prepares checkouts from cached mirrors.
#[derive(Debug, Clone)]
pub struct GitWorkspace {
    data_dir: PathBuf,
    credentials: Credentials,
    locks: Arc<StdMutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
    /// Each live checkout's mirror, for [`Workspace::changed`].
    /// Each checkout's mirror, and the commit its files are compared with
    /// (its own, or the one with its snapshot applied).
    mirrors: Arc<StdMutex<HashMap<PathBuf, (PathBuf, String)>>>,
    stall: Duration,
}

/// How long a checkout may go without any sign of life from libgit2.
const DEFAULT_STALL: Duration = Duration::from_secs(120);

impl GitWorkspace {
    /// A workspace keeping mirrors and checkouts under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, credentials: Credentials) -> Self {
        GitWorkspace {
            data_dir: data_dir.into(),
            credentials,
            locks: Arc::default(),
            mirrors: Arc::default(),
            stall: DEFAULT_STALL,
        }
    }

    /// Gives up on a checkout (a worker fault) when connecting, fetching or
    /// checking out shows no progress for `limit` (default 2 minutes).
    #[must_use]
    pub fn stall_timeout(mut self, limit: Duration) -> Self {
        self.stall = limit;
        self
    }

    /// The credentials in use.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Where the mirror of `repo` lives.
    pub fn mirror_path(&self, repo: &str) -> PathBuf {
        self.data_dir.join("repos").join(mirror_name(repo))
    }
}

/// Resolves the job's ref in its repository's mirror, fetching if needed,
/// and writes a checkout named after its label (such as `job-42-1`). Checks
/// that the entrypoint exists in it and stays inside it, symlinks included.
#[async_trait]
impl Workspace for GitWorkspace {
    async fn prepare(&self, job: &PrepareRequest<'_>) -> Result<Checkout, PrepareError> {
        let mirror = self.mirror_path(job.repo);
        let mirror_of_checkout = mirror.clone();
        let lock = {
            let mut locks = gpupool_core::sync::lock(&self.locks);
            Arc::clone(locks.entry(mirror.clone()).or_default())
        };
        // This process's own folder: no other worker on the data directory
        // picks the same path, and a crashed one's are removed at the next
        // start (crate::host).
        let instance = crate::host::Instance::claim(&self.data_dir)
            .map_err(|e| PrepareError::worker(format!("cannot claim a folder in {}: {e}", self.data_dir.display())))?;
        let dir =
            instance.checkouts().join(format!("{}-{}", job.label, &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let commit = {
            let _guard = lock.lock().await;
            let (repo, git_ref, dir, creds) =
                (job.repo.to_owned(), job.git_ref.to_owned(), dir.clone(), self.credentials.clone());
            let snapshot = job.snapshot.map(<[u8]>::to_vec);
            let watch = Watch::new();
            // Dropped with this future (a cancel, a stop) or on a stall:
            // the fetch aborts at its next callback.
            let _abandon = Abandon(Arc::clone(&watch));
            let seen = Arc::clone(&watch);
            let mut task = tokio::task::spawn_blocking(move || {
                let done = prepare_blocking(&mirror, &repo, &git_ref, &dir, &creds, &seen)
                    .and_then(|commit| with_snapshot(&mirror, &dir, commit, snapshot.as_deref()));
                if seen.abandoned() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                done
            });
            let done = loop {
                tokio::select! {
                    done = &mut task => break done,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if watch.idle() >= self.stall {
                            watch.abandon();
                            return Err(PrepareError::worker(format!(
                                "the git host of {} sent nothing for {}; is it reachable from this host?",
                                job.repo,
                                humantime::format_duration(self.stall)
                            )));
                        }
                    }
                }
            };
            done.map_err(|e| PrepareError::worker(format!("the checkout task failed: {e}")))?.map_err(|e| {
                // libgit2 says "unsupported URL protocol" (a network
                // error) for a path that is not there: no repository,
                // not a fault of this host's network.
                if is_local_path(job.repo) && !Path::new(job.repo).exists() {
                    PrepareError::repo(format!("no repository at {}", job.repo))
                } else {
                    e
                }
            })?
        };
        let (commit, compared) = commit;
        let checkout = Checkout { dir, commit };
        if let Err(e) = check_entrypoint(&checkout, job.entrypoint, job.git_ref) {
            self.remove(&checkout).await;
            return Err(e);
        }
        gpupool_core::sync::lock(&self.mirrors).insert(checkout.dir.clone(), (mirror_of_checkout, compared));
        Ok(checkout)
    }

    async fn remove(&self, checkout: &Checkout) {
        gpupool_core::sync::lock(&self.mirrors).remove(&checkout.dir);
        if let Err(e) = tokio::fs::remove_dir_all(&checkout.dir).await {
            tracing::warn!("cannot remove checkout {}: {e}", checkout.dir.display());
        }
    }

    async fn changed(&self, checkout: &Checkout) -> Result<Vec<PathBuf>, String> {
        let (mirror, commit) = gpupool_core::sync::lock(&self.mirrors)
            .get(&checkout.dir)
            .cloned()
            .ok_or_else(|| format!("{} is not a checkout of this workspace", checkout.dir.display()))?;
        let dir = checkout.dir.clone();
        tokio::task::spawn_blocking(move || changed_blocking(&mirror, &commit, &dir))
            .await
            .map_err(|e| format!("the comparison task failed: {e}"))?
    }

    fn secrets(&self) -> Vec<String> {
        self.credentials.secrets()
    }

    fn applies_snapshots(&self) -> bool {
        true
    }
}

/// Applies a snapshot (if any) over the checkout `dir` of `commit`, and
/// writes into the mirror the commit its files are compared with: the
/// checkout's commit, and the one to compare with.
fn with_snapshot(
    mirror: &Path,
    dir: &Path,
    commit: String,
    snapshot: Option<&[u8]>,
) -> Result<(String, String), PrepareError> {
    let Some(bytes) = snapshot else { return Ok((commit.clone(), commit)) };
    let bundle = crate::snapshot::Bundle::decode(bytes)
        .map_err(|e| PrepareError::git_ref(format!("the job's snapshot does not read: {e}")))?;
    crate::snapshot::apply(&bundle, dir)
        .map_err(|e| PrepareError::worker(format!("cannot apply the snapshot: {e}")))?;
    let lock = mirror.with_extension("lock");
    let _lock = crate::host::FileLock::acquire(&lock)
        .map_err(|e| PrepareError::worker(format!("cannot lock {}: {e}", lock.display())))?;
    let repo = open_mirror(mirror)?;
    let base = Oid::from_str(&commit).map_err(|e| PrepareError::git_ref(e.message().to_owned()))?;
    let over = crate::snapshot::commit_over(&repo, base, &bundle).map_err(|e| {
        PrepareError::git_ref(format!("the job's snapshot does not apply over {commit}: {}", e.message()))
    })?;
    Ok((commit, over.to_string()))
}

/// [`Workspace::changed`] on a blocking thread: the checkout `dir` against
/// `commit`'s tree in `mirror`. A file is compared by size first and hashed
/// only when the sizes agree, so a new multi-GB checkpoint is never read.
fn changed_blocking(mirror: &Path, commit: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let repo =
        Repository::open_bare(mirror).map_err(|e| format!("cannot open {}: {}", mirror.display(), e.message()))?;
    let tree = Oid::from_str(commit)
        .and_then(|oid| repo.find_commit(oid))
        .and_then(|c| c.tree())
        .map_err(|e| format!("commit {commit}: {}", e.message()))?;
    let odb = repo.odb().map_err(|e| format!("cannot read {}: {}", mirror.display(), e.message()))?;
    let mut changed = Vec::new();
    compare_dir(&repo, &odb, &tree, dir, Path::new(""), &mut changed)?;
    Ok(changed)
}

/// Adds to `changed` what differs in the folder `root/rel` from `tree`.
fn compare_dir(
    repo: &Repository,
    odb: &git2::Odb<'_>,
    tree: &git2::Tree<'_>,
    root: &Path,
    rel: &Path,
    changed: &mut Vec<PathBuf>,
) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let here = root.join(rel);
    let entries = std::fs::read_dir(&here).map_err(|e| format!("cannot list {}: {e}", here.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", here.display()))?;
        let name = entry.file_name();
        let path = rel.join(&name);
        let kind = entry.file_type().map_err(|e| format!("{}: {e}", path.display()))?;
        let known = tree.get_name_bytes(name.as_bytes());
        let same = if kind.is_dir() {
            match known.filter(|k| k.kind() == Some(ObjectType::Tree)) {
                Some(k) => {
                    let sub = k.to_object(repo).and_then(|o| o.peel_to_tree());
                    // A folder of the commit that the run made unreadable
                    // moves as a whole.
                    let mut inside = Vec::new();
                    let compared = sub
                        .map_err(|e| e.message().to_owned())
                        .and_then(|sub| compare_dir(repo, odb, &sub, root, &path, &mut inside));
                    if compared.is_ok() {
                        changed.append(&mut inside);
                    }
                    compared.is_ok()
                }
                None => false,
            }
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).ok();
            known.filter(|k| k.filemode() == 0o120000).is_some_and(|k| {
                repo.find_blob(k.id())
                    .is_ok_and(|b| target.as_ref().is_some_and(|t| b.content() == t.as_os_str().as_bytes()))
            })
        } else if kind.is_file() {
            let size = entry.metadata().map(|m| m.len()).ok();
            known.filter(|k| k.kind() == Some(ObjectType::Blob) && k.filemode() != 0o120000).is_some_and(|k| {
                odb.read_header(k.id()).is_ok_and(|(len, _)| Some(len as u64) == size)
                    && Oid::hash_file(ObjectType::Blob, entry.path()).is_ok_and(|oid| oid == k.id())
            })
        } else {
            // Sockets and FIFOs hold nothing to keep.
            true
        };
        if !same {
            changed.push(path);
        }
    }
    Ok(())
}

/// A repository named by a path on this host, not a URL (`https://…`,
/// `ssh://…`) or an scp-like address (`git@host:team/model.git`).
fn is_local_path(repo: &str) -> bool {
    if repo.contains("://") {
        return false;
    }
    let scp_like = repo.split_once(':').is_some_and(|(host, _)| !host.contains('/') && host.len() > 1);
    !scp_like
}

fn check_entrypoint(checkout: &Checkout, entrypoint: &str, git_ref: &str) -> Result<(), PrepareError> {
    let root = checkout.dir.canonicalize().map_err(|e| PrepareError::repo(format!("checkout vanished: {e}")))?;
    let short = &checkout.commit[..checkout.commit.len().min(12)];
    let path = root.join(entrypoint);
    let real = path.canonicalize().map_err(|_| {
        PrepareError::git_ref(format!("entrypoint `{entrypoint}` does not exist at commit {short} (ref `{git_ref}`)"))
    })?;
    if !real.starts_with(&root) {
        return Err(PrepareError::git_ref(format!(
            "entrypoint `{entrypoint}` resolves outside the checkout (a symlink) at commit {short}; refusing to run it"
        )));
    }
    if !real.is_file() {
        return Err(PrepareError::git_ref(format!("entrypoint `{entrypoint}` is not a file at commit {short}")));
    }
    Ok(())
}

fn looks_like_commit(r: &str) -> bool {
    (4..=40).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve(repo: &Repository, git_ref: &str) -> Option<Oid> {
    let candidates = [format!("refs/heads/{git_ref}"), format!("refs/tags/{git_ref}"), git_ref.to_owned()];
    candidates.iter().find_map(|c| repo.revparse_single(c).ok()?.peel_to_commit().ok().map(|c| c.id()))
}

/// What the async side sees of a blocking checkout: when libgit2 last
/// showed progress, and whether the checkout was given up.
#[derive(Debug)]
struct Watch {
    start: std::time::Instant,
    /// Milliseconds from `start` to the last sign of progress.
    last: AtomicU64,
    abandoned: AtomicBool,
}

impl Watch {
    fn new() -> Arc<Watch> {
        Arc::new(Watch { start: std::time::Instant::now(), last: AtomicU64::new(0), abandoned: AtomicBool::new(false) })
    }

    /// Records progress; `false` (stop, libgit2) once abandoned.
    fn tick(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
        !self.abandoned()
    }

    fn idle(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }
}

/// Abandons a checkout when dropped, unless it ended first.
struct Abandon(Arc<Watch>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

fn prepare_blocking(
    mirror: &Path,
    url: &str,
    git_ref: &str,
    dir: &Path,
    creds: &Credentials,
    watch: &Arc<Watch>,
) -> Result<String, PrepareError> {
    // Other worker processes on this data directory use the same mirror: one
    // at a time creates, fetches or checks out from it. A killed holder's
    // lock goes with its process.
    let lock = mirror.with_extension("lock");
    let _lock = crate::host::FileLock::acquire(&lock)
        .map_err(|e| PrepareError::worker(format!("cannot lock {}: {e}", lock.display())))?;
    let repo = open_mirror(mirror)?;
    let local = looks_like_commit(git_ref).then(|| resolve(&repo, git_ref)).flatten();
    // A commit already here is used as it is. A branch or tag may have
    // moved: ask the remote where it points (no download) and fetch only
    // when that commit is missing here.
    let tip = match local {
        Some(oid) => Some(oid),
        None => advertised(&repo, url, git_ref, creds, watch)?.filter(|oid| repo.find_commit(*oid).is_ok()),
    };
    let oid = match tip {
        Some(oid) => oid,
        None => {
            fetch(&repo, url, creds, watch)?;
            resolve(&repo, git_ref)
                .ok_or_else(|| PrepareError::git_ref(format!("ref `{git_ref}` not found in {url}")))?
        }
    };
    let commit = repo.find_commit(oid).map_err(|e| PrepareError::git_ref(format!("commit {oid}: {}", e.message())))?;
    std::fs::create_dir_all(dir).map_err(|e| PrepareError::worker(format!("cannot create {}: {e}", dir.display())))?;
    let mut cb = git2::build::CheckoutBuilder::new();
    let (seen, stop) = (Arc::clone(watch), Arc::clone(watch));
    cb.target_dir(dir).force().update_index(false);
    cb.progress(move |_, _, _| {
        seen.tick();
    });
    cb.notify_on(git2::CheckoutNotificationType::all()).notify(move |_, _, _, _, _| !stop.abandoned());
    repo.checkout_tree(commit.as_object(), Some(&mut cb))
        .map_err(|e| PrepareError::worker(format!("cannot check out {oid}: {}", e.message())))?;
    Ok(oid.to_string())
}

fn open_mirror(mirror: &Path) -> Result<Repository, PrepareError> {
    let fail = |e: git2::Error| PrepareError::repo(format!("mirror {}: {}", mirror.display(), e.message()));
    let repo = match Repository::open_bare(mirror) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(mirror)
                .map_err(|e| PrepareError::worker(format!("cannot create {}: {e}", mirror.display())))?;
            Repository::init_bare(mirror).map_err(fail)?
        }
    };
    Ok(repo)
}

/// Callbacks that answer credential requests (see the module docs), and
/// where the reason for a refusal is kept.
fn callbacks(
    url: &str,
    creds: &Credentials,
    watch: &Arc<Watch>,
) -> (RemoteCallbacks<'static>, Arc<StdMutex<Option<String>>>) {
    let host = host_of(url);
    let reason: Arc<StdMutex<Option<String>>> = Arc::default();
    let mut callbacks = RemoteCallbacks::new();
    // Every callback is a sign of life; returning false aborts an
    // abandoned fetch.
    let (a, b, c) = (Arc::clone(watch), Arc::clone(watch), Arc::clone(watch));
    callbacks.transfer_progress(move |_| a.tick());
    callbacks.sideband_progress(move |_| b.tick());
    callbacks.update_tips(move |_, _, _| c.tick());
    let mut tries = 0u32;
    let why = Arc::clone(&reason);
    let creds = creds.clone();
    let seen = Arc::clone(watch);
    callbacks.credentials(move |cred_url, user_from_url, allowed| {
        tries += 1;
        if !seen.tick() {
            return Err(git2::Error::from_str("the checkout was abandoned"));
        }
        let set = |m: String| {
            if let Ok(mut w) = why.lock() {
                *w = Some(m.clone());
            }
            git2::Error::from_str(&m)
        };
        if tries > 4 {
            return Err(set(format!("authentication failed for {host}: the credentials were refused")));
        }
        credential(&creds, cred_url, user_from_url, allowed, tries, &host).map_err(set)
    });
    (callbacks, reason)
}

/// A remote that cannot be reached (network, TLS, ssh) or will not let
/// this host in (no or refused credentials) is this host's fault: another
/// worker may well get through. Anything else (no such repository) is the
/// repository's.
fn remote_error(url: &str, what: &str, e: &git2::Error, reason: &StdMutex<Option<String>>) -> PrepareError {
    let detail = reason.lock().ok().and_then(|r| r.clone()).unwrap_or_else(|| e.message().to_owned());
    let message = format!("cannot {what} {url}: {detail}");
    let host_fault = e.code() == git2::ErrorCode::Auth
        || matches!(
            e.class(),
            git2::ErrorClass::Net | git2::ErrorClass::Ssl | git2::ErrorClass::Ssh | git2::ErrorClass::Os
        );
    if host_fault { PrepareError::worker(message) } else { PrepareError::repo(message) }
}

/// Where the remote's branch or tag `git_ref` points, without downloading
/// anything (`git ls-remote`); `None` if it has no such branch or tag.
fn advertised(
    repo: &Repository,
    url: &str,
    git_ref: &str,
    creds: &Credentials,
    watch: &Arc<Watch>,
) -> Result<Option<Oid>, PrepareError> {
    let (cbs, reason) = callbacks(url, creds, watch);
    let mut remote = repo.remote_anonymous(url).map_err(|e| PrepareError::repo(format!("{url}: {}", e.message())))?;
    let conn = remote
        .connect_auth(git2::Direction::Fetch, Some(cbs), None)
        .map_err(|e| remote_error(url, "fetch", &e, &reason))?;
    let heads = conn.list().map_err(|e| remote_error(url, "fetch", &e, &reason))?;
    let (branch, tag) = (format!("refs/heads/{git_ref}"), format!("refs/tags/{git_ref}"));
    let peeled = format!("{tag}^{{}}");
    // An annotated tag is advertised twice; the peeled line names the commit.
    let find = |name: &str| heads.iter().find(|h| h.name() == name).map(|h| h.oid());
    Ok(find(&branch).or_else(|| find(&peeled)).or_else(|| find(&tag)))
}

fn fetch(repo: &Repository, url: &str, creds: &Credentials, watch: &Arc<Watch>) -> Result<(), PrepareError> {
    let (cbs, reason) = callbacks(url, creds, watch);
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(cbs).download_tags(git2::AutotagOption::All);
    let mut remote = repo.remote_anonymous(url).map_err(|e| PrepareError::repo(format!("{url}: {}", e.message())))?;
    remote
        .fetch(&["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], Some(&mut opts), None)
        .map_err(|e| remote_error(url, "fetch", &e, &reason))
}

fn credential(
    creds: &Credentials,
    url: &str,
    user_from_url: Option<&str>,
    allowed: CredentialType,
    tries: u32,
    host: &str,
) -> Result<git2::Cred, String> {
    let to_s = |e: git2::Error| e.message().to_owned();
    if allowed.contains(CredentialType::SSH_KEY) {
        return git2::Cred::ssh_key_from_agent(user_from_url.unwrap_or("git")).map_err(to_s);
    }
    if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
        if let (Some(token), 1) = (&creds.token, tries) {
            let user = creds.user.as_deref().or(user_from_url).unwrap_or("x-access-token");
            return git2::Cred::userpass_plaintext(user, token).map_err(to_s);
        }
        if tries <= 2
            && let Ok(cfg) = git2::Config::open_default()
            && let Ok(cred) = git2::Cred::credential_helper(&cfg, url, user_from_url)
        {
            return Ok(cred);
        }
        if let Some((user, token)) = prompted(creds, url, host) {
            return git2::Cred::userpass_plaintext(&user, &token).map_err(to_s);
        }
        return Err(format!(
            "no credentials for {host}; set GPUPOOL_GIT_TOKEN, configure a git credential helper, \
             or give the worker a credential prompt (`gpupool worker` run in a terminal asks once)"
        ));
    }
    if allowed.contains(CredentialType::DEFAULT) {
        return git2::Cred::default().map_err(to_s);
    }
    Err(format!("no credentials for {host}"))
}

/// Asks the prompt once, then hands the answer to the user's git
/// credential helper (`git credential approve`, argv, no shell).
fn prompted(creds: &Credentials, url: &str, host: &str) -> Option<(String, String)> {
    let mut slot = creds.prompted.lock().ok()?;
    if let Some(found) = slot.as_ref() {
        return Some(found.clone());
    }
    let (user, token) = creds.prompt.as_ref()?.ask(host)?;
    if user.is_empty() || token.is_empty() {
        return None;
    }
    let protocol = url.split_once("://").map_or("https", |(p, _)| p);
    let input = format!("protocol={protocol}\nhost={host}\nusername={user}\npassword={token}\n\n");
    let approved = std::process::Command::new("git")
        .args(["credential", "approve"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(stdin) = child.stdin.as_mut() {
                stdin.write_all(input.as_bytes())?;
            }
            child.wait()
        });
    if approved.is_err() {
        tracing::warn!("could not hand the credentials to git's credential helper; they last until the worker stops");
    }
    *slot = Some((user, token));
    slot.clone()
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit('@').next().unwrap_or(authority);
    if host.is_empty() { url.to_owned() } else { redact_url(host) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(repo: &'a str, git_ref: &'a str, label: &'a str) -> PrepareRequest<'a> {
        PrepareRequest { repo, git_ref, entrypoint: "train.py", label, snapshot: None }
    }

    fn commit(repo: &Repository, text: &str) -> Oid {
        let dir = repo.workdir().unwrap();
        std::fs::write(dir.join("train.py"), text).unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("train.py")).unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, text, &tree, &parents).unwrap()
    }

    /// A git host that takes connections and never answers.
    fn silent_host() -> (String, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/team/model.git", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let held = std::thread::spawn(move || {
            // Connections are kept open, never answered, for 4 s; then
            // closed, so that abandoned fetch threads end (a test's runtime
            // waits for them).
            let mut open = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(4);
            while std::time::Instant::now() < until {
                if let Ok((conn, _)) = listener.accept() {
                    open.push(conn);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        (url, held)
    }

    #[tokio::test]
    async fn a_git_host_that_never_answers_is_a_worker_fault_after_the_stall_timeout() {
        let tmp = std::env::temp_dir().join(format!("gpupool-ws-{}", uuid::Uuid::new_v4().simple()));
        let (url, _host) = silent_host();
        let ws = GitWorkspace::new(tmp.join("data"), Credentials::default()).stall_timeout(Duration::from_secs(2));
        let began = std::time::Instant::now();
        let err = ws.prepare(&job(&url, "main", "s")).await.unwrap_err();
        assert_eq!(err.kind, gpupool_core::FailureKind::Worker, "{}", err.message);
        assert!(err.message.contains("sent nothing for 2s"), "{}", err.message);
        assert!(began.elapsed() < Duration::from_secs(10), "gave up in {:?}", began.elapsed());
        // Dropping a checkout's future abandons it too, and nothing is left
        // of its folder once libgit2 comes back.
        let ws = ws.stall_timeout(Duration::from_secs(600));
        let dropped = tokio::time::timeout(Duration::from_millis(500), ws.prepare(&job(&url, "main", "d"))).await;
        assert!(dropped.is_err(), "still connecting");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test]
    async fn a_moved_branch_is_fetched_and_a_cached_commit_needs_no_remote() {
        let tmp = std::env::temp_dir().join(format!("gpupool-ws-{}", uuid::Uuid::new_v4().simple()));
        let src = tmp.join("src");
        let repo = Repository::init(&src).unwrap();
        let first = commit(&repo, "v1");
        let ws = GitWorkspace::new(tmp.join("data"), Credentials::default());
        let url = src.to_string_lossy().into_owned();
        let head = repo.head().unwrap().shorthand().unwrap().to_owned();

        let a = ws.prepare(&job(&url, &head, "a")).await.unwrap();
        assert_eq!(a.commit, first.to_string());
        let second = commit(&repo, "v2");
        let b = ws.prepare(&job(&url, &head, "b")).await.unwrap();
        assert_eq!(b.commit, second.to_string(), "the branch moved; the new tip is fetched");
        assert_eq!(std::fs::read_to_string(b.dir.join("train.py")).unwrap(), "v2");
        ws.remove(&a).await;
        ws.remove(&b).await;

        // With the remote gone, a commit already in the mirror still checks out.
        std::fs::rename(&src, tmp.join("gone")).unwrap();
        let c = ws.prepare(&job(&url, &first.to_string()[..10], "c")).await.unwrap();
        assert_eq!(std::fs::read_to_string(c.dir.join("train.py")).unwrap(), "v1");
        let missing = ws.prepare(&job(&url, &head, "d")).await.unwrap_err();
        assert_eq!(missing.message, format!("no repository at {url}"), "a local path says so plainly");
        assert_eq!(missing.kind, gpupool_core::FailureKind::Repo, "{}", missing.message);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[tokio::test]
    async fn changed_lists_what_the_run_made_or_edited_and_nothing_it_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let repo = Repository::init(&src).unwrap();
        std::fs::create_dir_all(src.join("conf")).unwrap();
        std::fs::write(src.join("conf/a.yaml"), "a: 1").unwrap();
        std::fs::write(src.join("README"), "read me").unwrap();
        std::os::unix::fs::symlink("README", src.join("link")).unwrap();
        let mut index = repo.index().unwrap();
        for p in ["conf/a.yaml", "README", "link"] {
            index.add_path(Path::new(p)).unwrap();
        }
        index.write().unwrap();
        commit(&repo, "v1");
        let ws = GitWorkspace::new(tmp.path().join("data"), Credentials::default());
        let url = src.to_string_lossy().into_owned();
        let head = repo.head().unwrap().shorthand().unwrap().to_owned();
        let co = ws.prepare(&job(&url, &head, "a")).await.unwrap();
        assert_eq!(ws.changed(&co).await.unwrap(), Vec::<PathBuf>::new(), "a fresh checkout changed nothing");

        std::fs::write(co.dir.join("conf/a.yaml"), "a: 2").unwrap(); // edited, same size
        std::fs::write(co.dir.join("conf/new.yaml"), "b").unwrap();
        std::fs::create_dir_all(co.dir.join("wandb/run-1")).unwrap();
        std::fs::write(co.dir.join("wandb/run-1/log"), "x").unwrap();
        std::fs::remove_file(co.dir.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", co.dir.join("link")).unwrap();
        let mut changed = ws.changed(&co).await.unwrap();
        changed.sort();
        let expected: Vec<PathBuf> =
            ["conf/a.yaml", "conf/new.yaml", "link", "wandb"].iter().map(PathBuf::from).collect();
        assert_eq!(changed, expected);
        ws.remove(&co).await;
    }
}
