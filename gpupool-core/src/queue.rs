//! The [`Queue`] trait that every backend implements, and the values that
//! travel through it.
//!
//! What lives here: the contract. What does not: any backend (see
//! [`crate::MemoryQueue`] and the backend crates) and the worker loop.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;
use crate::job::{AttemptError, FailureKind, JobId, JobRecord, JobSpec, JobState, Timestamp};

/// What a backend can do. The conformance suite checks every declared
/// capability and skips what is not declared; the CLI reports the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// `priority` orders jobs within a queue.
    pub priority: bool,
    /// `reserve` returns only jobs that fit the GPUs offered.
    pub gpu_filter: bool,
    /// `reserve` can wait for a push instead of polling.
    pub blocking_reserve: bool,
    /// Several processes (hosts) can share the queue.
    pub multi_process: bool,
    /// Workers register and heartbeat ([`Queue::register_worker`]).
    pub workers: bool,
}

impl Capabilities {
    /// Every capability declared.
    pub const ALL: Capabilities =
        Capabilities { priority: true, gpu_filter: true, blocking_reserve: true, multi_process: true, workers: true };

    /// Builder: set `priority`.
    pub fn with_priority(mut self, v: bool) -> Self {
        self.priority = v;
        self
    }

    /// Builder: set `gpu_filter`.
    pub fn with_gpu_filter(mut self, v: bool) -> Self {
        self.gpu_filter = v;
        self
    }

    /// Builder: set `blocking_reserve`.
    pub fn with_blocking_reserve(mut self, v: bool) -> Self {
        self.blocking_reserve = v;
        self
    }

    /// Builder: set `multi_process`.
    pub fn with_multi_process(mut self, v: bool) -> Self {
        self.multi_process = v;
        self
    }

    /// Builder: set `workers`.
    pub fn with_workers(mut self, v: bool) -> Self {
        self.workers = v;
        self
    }
}

/// A job running on a worker, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunningJob {
    /// The job.
    pub id: JobId,
    /// The GPUs it holds.
    pub gpus: Vec<u32>,
}

/// A worker as it registers itself, and as `gpupool status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    /// `host:pid`, unique per worker process.
    pub name: String,
    /// The host name.
    pub host: String,
    /// The queues it serves, in order.
    pub queues: Vec<String>,
    /// Parallel runs it allows.
    pub slots: usize,
    /// Its GPUs with their status when it last reported.
    pub gpus: Vec<crate::gpu::GpuStatus>,
    /// What it is running.
    pub running: Vec<RunningJob>,
    /// How often it reports, in milliseconds.
    pub heartbeat_ms: u64,
    /// When it started (its clock).
    pub started_at: Timestamp,
    /// When the backend last heard from it (the backend's clock where it
    /// has one). Set by the backend.
    #[serde(default)]
    pub seen_at: Timestamp,
    /// Set by [`Queue::workers`]: it has not reported for three heartbeat
    /// intervals. Its jobs come back through the normal lease expiry.
    #[serde(default)]
    pub lost: bool,
}

impl WorkerInfo {
    /// Whether a worker last seen at `seen_at` is lost at `now`.
    pub fn lost_at(&self, now: Timestamp) -> bool {
        now.0.saturating_sub(self.seen_at.0) > i64::try_from(self.heartbeat_ms.saturating_mul(3)).unwrap_or(i64::MAX)
    }
}

/// What a worker asks for when it has a free slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Queues to serve, first one first (`rq worker high default`).
    pub queues: Vec<String>,
    /// GPUs the caller can give right now.
    pub free_gpus: u32,
    /// The most GPUs the caller could ever give (all of its GPUs). When set,
    /// a filtering backend returns the first job, in queue order, that needs
    /// at most this many, even if it needs more than `free_gpus` now: the
    /// caller then holds it until its GPUs are free, so a stream of small
    /// jobs cannot starve a big one (first come, first served; no backfill).
    /// `None`: only jobs that fit `free_gpus`.
    pub max_gpus: Option<u32>,
    /// Whether the caller has any GPUs at all: a job with unset `gpus` needs
    /// one GPU on such a worker and none elsewhere.
    pub gpu_host: bool,
    /// How long the lease lasts unless heartbeated.
    pub lease: Duration,
    /// How long `reserve` may wait for a job before returning `None`.
    pub wait: Duration,
    /// Who holds the lease (`host:pid`), shown by `gpupool jobs`.
    pub worker: String,
}

impl ReserveRequest {
    /// A request for one queue, CPU only, a 60 s lease and no wait.
    pub fn new(queue: impl Into<String>) -> Self {
        ReserveRequest {
            queues: vec![queue.into()],
            free_gpus: 0,
            max_gpus: None,
            gpu_host: false,
            lease: Duration::from_secs(60),
            wait: Duration::ZERO,
            worker: default_worker_name(),
        }
    }

    /// Builder: the queues, in order.
    pub fn queues<I: IntoIterator<Item = S>, S: Into<String>>(mut self, queues: I) -> Self {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Builder: the GPUs the caller can give now (and so a GPU host when > 0).
    pub fn gpus(mut self, free: u32, gpu_host: bool) -> Self {
        self.free_gpus = free;
        self.gpu_host = gpu_host;
        self
    }

    /// Builder: the lease duration.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Builder: how long to wait for a job.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Builder: the worker's name.
    pub fn worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = worker.into();
        self
    }

    /// Builder: the most GPUs the caller could ever give.
    pub fn max_gpus(mut self, max: u32) -> Self {
        self.max_gpus = Some(max);
        self
    }

    /// The GPU count a filtering backend compares a job's need with.
    pub fn gpu_limit(&self) -> u32 {
        self.max_gpus.unwrap_or(self.free_gpus)
    }

    /// Whether a filtering backend may return a job with this spec.
    pub fn fits(&self, spec: &JobSpec) -> bool {
        spec.gpus_needed(self.gpu_host) <= self.gpu_limit()
    }
}

/// `host:pid` of this process.
pub fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A held job: the record as it was reserved and the token that fences every
/// later call about it.
#[derive(Clone, PartialEq)]
pub struct Lease {
    /// The job, with `attempt` already counting this run.
    pub job: JobRecord,
    /// Opaque proof of holding; a newer lease on the same job has another.
    pub token: String,
    /// When the lease ends unless heartbeated (the backend's clock).
    pub expires_at: Timestamp,
}

impl Lease {
    /// The job's id.
    pub fn id(&self) -> &JobId {
        &self.job.id
    }

    /// This run's attempt number (1 for the first run).
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("job", &self.job.id)
            .field("attempt", &self.job.attempt)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Heartbeat {
    /// The lease was extended; carry on.
    Extended,
    /// The lease was extended, and a user asked to cancel the job: stop its
    /// process, then call [`Queue::cancelled`].
    CancelRequested,
}

/// Facts about a run, recorded once the worker has prepared it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunInfo {
    /// The commit the ref resolved to.
    pub commit: Option<String>,
    /// The GPUs given to the run.
    pub gpu_ids: Vec<u32>,
}

/// A successful end.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// The end of the output.
    pub output_tail: String,
    /// An optional result the run reported.
    pub result: Option<serde_json::Value>,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Why.
    pub kind: FailureKind,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Signal, if one killed the process.
    pub signal: Option<i32>,
    /// A readable reason.
    pub message: String,
    /// The end of the output.
    pub output_tail: String,
}

impl Failure {
    /// A failure of this kind with a message and no process details.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure { kind, exit_code: None, signal: None, message: message.into(), output_tail: String::new() }
    }

    /// Whether a job with this failure on `attempt` of `limit` goes back to
    /// the queue (the rule every backend applies).
    pub fn requeues(&self, attempt: u32, limit: u32) -> bool {
        self.kind.is_retryable() && attempt < limit
    }
}

/// What [`Queue::fail`] did with the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailOutcome {
    /// It went back to the queue for another attempt.
    Requeued,
    /// It is `failed`: no attempts left, or a kind that is never retried.
    Failed,
}

/// What [`Queue::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The job was queued and is now `cancelled`.
    Cancelled,
    /// The job is running; its worker learns of the cancel at its next
    /// heartbeat, stops the process and then marks it `cancelled`.
    Requested,
    /// The job had already ended in this state; nothing changed.
    AlreadyEnded(JobState),
}

/// Which jobs [`Queue::list`] returns, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// At most this many.
    pub limit: u32,
    /// Skip this many (the page start).
    pub offset: u64,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter { state: None, queue: None, limit: 100, offset: 0 }
    }
}

/// A job queue: the one trait a backend implements.
///
/// # Overview
///
/// A job is pushed `queued`. A worker with a free slot calls
/// [`reserve`](Queue::reserve) and gets a [`Lease`]: the job is `running`,
/// its `attempt` counts this run, and only the lease's token can report on
/// it. The worker [`heartbeat`](Queue::heartbeat)s while the process runs,
/// then reports [`complete`](Queue::complete), [`fail`](Queue::fail),
/// [`cancelled`](Queue::cancelled) or [`release`](Queue::release). A lease that
/// is not heartbeated expires: the attempt is recorded as failed with kind
/// `lease_lost` and the job is reserved again with `attempt + 1` (or ends
/// `failed` if it has no attempts left, or `cancelled` if a cancel was asked
/// for). No job is ever held by two leases at once.
///
/// ```
/// # use gpupool_core::{JobSpec, MemoryQueue, Queue, ReserveRequest, Completion, JobState};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> gpupool_core::Result<()> {
/// let queue = MemoryQueue::new();
/// let id = queue.push(JobSpec::new("main", "train.py").arg("lr", 0.001)).await?;
/// let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("a job");
/// assert_eq!(lease.id(), &id);
/// queue.complete(&lease, Completion::default()).await?;
/// assert_eq!(queue.get(&id).await?.state, JobState::Succeeded);
/// # Ok(())
/// # }
/// ```
///
/// # Implementing
///
/// Implement every method, declare what you support in
/// [`capabilities`](Queue::capabilities), and run the conformance suite
/// (`gpupool-core` with feature `conformance`, module `conformance`) from one
/// test file. Call [`JobSpec::validate`] in `push`. Every decision that is
/// the same for all backends (what a failure does, what fits a request) has
/// a helper in core: [`Failure::requeues`], [`ReserveRequest::fits`].
///
/// # Errors
///
/// Calls that take a [`Lease`] return [`Error::LeaseLost`](crate::Error::LeaseLost)
/// when the token no longer holds the job: it expired and was reclaimed, or
/// the job was released, finished or retried. Nothing is recorded then.
/// Calls that take an id return [`Error::NotFound`](crate::Error::NotFound)
/// for an unknown id. A backend that cannot be reached returns
/// [`Error::Unavailable`](crate::Error::Unavailable), which is retryable.
///
/// # Cancellation safety
///
/// Each method is one atomic step in the backend (one transaction, one
/// script): dropping its future either leaves the queue as it was or as if
/// the call had finished. The one exception is `reserve`: dropping it after
/// the backend leased a job but before the lease reached the caller leaves a
/// job held by nobody, which comes back when that lease expires. Callers that
/// must not delay jobs should not drop `reserve` futures (the worker never
/// does; it stops reserving on shutdown instead).
#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Creates or migrates what the backend needs (tables, streams). Safe to
    /// run many times and from many hosts at once.
    async fn init(&self) -> Result<()>;

    /// Adds a job after [`JobSpec::validate`]. Returns its id. A job whose
    /// `idempotency_key` was pushed before is not added again: the first
    /// job's id is returned.
    async fn push(&self, spec: JobSpec) -> Result<JobId>;

    /// Leases the next job that fits: the first of `queues` that has one,
    /// then highest priority (if declared), then oldest. Only jobs that fit
    /// `free_gpus` are returned where the backend declares `gpu_filter`.
    /// Returns `None` if nothing fits within `wait`.
    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>>;

    /// Extends the lease to `lease` from now. Reports a cancel request.
    /// `LeaseLost` if the lease no longer holds.
    async fn heartbeat(&self, lease: &Lease, extend: std::time::Duration) -> Result<Heartbeat>;

    /// Records facts about the run (resolved commit, GPUs given). Fenced by
    /// the lease like every call that takes one.
    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()>;

    /// The run succeeded: the job becomes `succeeded`. Fenced by the lease.
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()>;

    /// The run failed: the attempt is recorded in `errors`, and the job goes
    /// back to `queued` if [`Failure::requeues`] says so, else `failed`.
    /// Fenced by the lease.
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome>;

    /// The holder stopped the run after a cancel request: the job becomes
    /// `cancelled`. Fenced by the lease.
    async fn cancelled(&self, lease: &Lease, output_tail: String) -> Result<()>;

    /// Gives the job back without charging an attempt (graceful shutdown):
    /// it is `queued` again and its attempt count is as before this lease.
    /// Fenced by the lease.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Cancels a job: a queued one at once, a running one through its
    /// worker's next heartbeat.
    async fn cancel(&self, id: &JobId) -> Result<CancelOutcome>;

    /// Puts a `failed` or `cancelled` job back in the queue. Its attempt
    /// count and error records are kept, and it gets `max_attempts` more
    /// attempts. [`Error::InvalidState`](crate::Error::InvalidState) for a job
    /// in any other state.
    async fn retry(&self, id: &JobId) -> Result<()>;

    /// One job with its failed attempts.
    async fn get(&self, id: &JobId) -> Result<JobRecord>;

    /// Jobs, newest first, filtered and paginated. Records come without
    /// their `errors` list.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>>;

    /// Failed-attempt records, newest first: all of them or one job's.
    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>>;

    /// Gives back a job that needs `gpus` GPUs, more than the caller has,
    /// without charging an attempt, so that it is offered only to reserves
    /// whose `max_gpus` (or free GPUs) reach `gpus`: a job too big for the
    /// workers at hand waits for a big enough one instead of bouncing
    /// between small ones. Fenced by the lease. The default releases it,
    /// which is enough for a backend that declares `gpu_filter` (its
    /// reserve never offers the job to a smaller worker).
    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()> {
        let _ = gpus;
        self.release(lease).await
    }

    /// Records (or refreshes) a worker and what it holds, stamping
    /// `seen_at`. Workers call it every heartbeat interval. The default does
    /// nothing, for backends that do not declare `workers`.
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let _ = info;
        Ok(())
    }

    /// Removes a worker that stopped cleanly. The default does nothing.
    async fn unregister_worker(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// The worker `worker` will not reserve again (it is stopping; its
    /// running jobs may still run). A backend that keeps a waiting
    /// reserve's request alive between calls withdraws it, and gives back,
    /// charging no attempt, a job it was handed that no call returned.
    /// The default does nothing.
    async fn stop_reserving(&self, worker: &str) -> Result<()> {
        let _ = worker;
        Ok(())
    }

    /// Every registered worker, with `lost` set for those that stopped
    /// reporting. The default knows none.
    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        Ok(Vec::new())
    }
}

/// For SQL backends: remembers whether the last reserve found work (then
/// the next one skips its lock-free look and goes straight to the
/// transaction) and paces the sweep of expired leases to once a second
/// while reserves stay busy.
#[derive(Debug, Default)]
pub struct Sweep {
    /// The last reserve found a job.
    pub hot: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Sweep {
    /// Whether a sweep is due (none in the last second); marks it done.
    pub fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}
