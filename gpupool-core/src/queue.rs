//! The [`Queue`] trait that every backend implements, and the values that
//! travel through it.
//!
//! What lives here: the contract. What does not: any backend (see
//! [`crate::MemoryQueue`] and the backend crates) and the worker loop.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{AttemptError, FailureKind, JobId, JobRecord, JobSpec, JobState, Timestamp};
use crate::{Error, Result};

/// What a backend can do, for the conformance suite (which checks what is
/// declared and skips the rest) and the CLI (which says what is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// `priority` orders jobs within a queue. Without it, `gpupool push`
    /// warns that a job's priority is ignored.
    pub priority: bool,
    /// `reserve` returns only jobs that fit the GPUs offered. Without it,
    /// the worker [`park`](Queue::park)s a job too big for it.
    pub gpu_filter: bool,
    /// Jobs can be held back until a time: `not_before`, a retry's
    /// `backoff`, and the wait of `after` ([`Queue::defer`]). Without it,
    /// `gpupool push` refuses jobs that name them.
    pub delays: bool,
}

impl Capabilities {
    /// Every capability declared.
    pub const ALL: Capabilities = Capabilities { priority: true, gpu_filter: true, delays: true };

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

    /// Builder: set `delays`.
    pub fn with_delays(mut self, v: bool) -> Self {
        self.delays = v;
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
    /// Set by [`WorkerRegistry::workers`]: it has not reported for three
    /// heartbeat intervals. Its jobs come back through the normal lease expiry.
    #[serde(default)]
    pub lost: bool,
    /// It is stopping: it takes no new job and waits for its running ones
    /// (or is killing them after a second signal).
    #[serde(default)]
    pub draining: bool,
    /// A fault of its own environment stops it from running jobs (its
    /// command cannot start, no git credentials, …); it gives jobs back
    /// uncharged and retries later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
}

/// Heartbeat intervals of silence after which a worker is dropped from the
/// registry (lost after 3): about 17 minutes at the 10 s default, long
/// enough to notice it in `gpupool status`, short enough that hosts gone
/// for good do not pile up.
pub const GONE_AFTER_HEARTBEATS: u64 = 100;

impl WorkerInfo {
    /// Whether a worker last seen at `seen_at` is lost at `now`.
    pub fn lost_at(&self, now: Timestamp) -> bool {
        self.silent_for_more_than(now, 3)
    }

    /// Whether a worker last seen at `seen_at` is gone at `now`: silent for
    /// [`GONE_AFTER_HEARTBEATS`] intervals, so [`WorkerRegistry::workers`]
    /// drops it.
    pub fn gone_at(&self, now: Timestamp) -> bool {
        self.silent_for_more_than(now, GONE_AFTER_HEARTBEATS)
    }

    fn silent_for_more_than(&self, now: Timestamp, heartbeats: u64) -> bool {
        let limit = i64::try_from(self.heartbeat_ms.saturating_mul(heartbeats)).unwrap_or(i64::MAX);
        now.0.saturating_sub(self.seen_at.0) > limit
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

/// Which candidates one [`reserve_many`](Queue::reserve_many) leases,
/// offered in queue order: the first always (as `reserve` would), then each
/// next one while the GPUs taken together stay within `free_gpus`, up to
/// `max`. Once one is refused, every later one is: a batch never skips over
/// a job, so queue order holds (a big job waits first in line, as it would
/// for `reserve`).
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    free: u32,
    used: u32,
    taken: usize,
    max: usize,
    closed: bool,
}

impl Batch {
    /// A batch for `req`, of at most `max` leases (0 counts as 1).
    pub fn new(req: &ReserveRequest, max: usize) -> Self {
        Batch { free: req.free_gpus, used: 0, taken: 0, max: max.max(1), closed: false }
    }

    /// Whether the next candidate, needing `need` GPUs, is leased too.
    pub fn admit(&mut self, need: u32) -> bool {
        let used = self.used.saturating_add(need);
        if self.full() || (self.taken > 0 && used > self.free) {
            self.closed = true;
            return false;
        }
        self.used = used;
        self.taken += 1;
        true
    }

    /// A candidate admitted that could not be leased after all (its row did
    /// not read and was failed): its place and GPUs are free again.
    pub fn unadmit(&mut self, need: u32) {
        self.taken = self.taken.saturating_sub(1);
        self.used = self.used.saturating_sub(need);
        self.closed = false;
    }

    /// Whether no further candidate can be admitted.
    pub fn full(&self) -> bool {
        self.closed || self.taken >= self.max
    }

    /// How many more it could take at most.
    pub fn room(&self) -> usize {
        if self.closed { 0 } else { self.max - self.taken }
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
    /// process, then call [`Queue::report_cancelled`].
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
    /// Output not shipped yet ([`crate::RunLogs::ship`]): appended to the
    /// job's shipped log as it ends. Empty: nothing to add.
    pub log: String,
    /// The run's facts, when [`Queue::started`] did not record them (a run
    /// that ended before the worker recorded its start): recorded with
    /// the end.
    pub run: Option<RunInfo>,
}

impl Completion {
    /// Records what the completion carries besides the end, `run` by
    /// [`Queue::started`] and `log` by [`crate::RunLogs::ship`], and takes
    /// them out: what a backend's `complete` calls first when it cannot
    /// record them in the same step as the end. A backend that keeps no
    /// run logs drops `log` (the worker's own log file keeps it).
    ///
    /// # Errors
    ///
    /// Those of `started` and `ship` (`LeaseLost` for a stale lease).
    pub async fn record_first(&mut self, q: &dyn Queue, lease: &Lease) -> Result<()> {
        if let Some(info) = self.run.take() {
            q.started(lease, &info).await?;
        }
        let log = std::mem::take(&mut self.log);
        if let Some(logs) = q.run_logs().filter(|_| !log.is_empty()) {
            logs.ship(lease, &crate::Progress { log, result: None }).await?;
        }
        Ok(())
    }
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

    /// Whether a job `spec` with this failure on `attempt` of `limit` goes
    /// back to the queue (the rule every backend applies): the job
    /// [`retries`](JobSpec::retries) this kind and has attempts left.
    pub fn requeues(&self, spec: &JobSpec, attempt: u32, limit: u32) -> bool {
        spec.retries(self.kind) && attempt < limit
    }

    /// When the job, queued again after this failure of its attempt
    /// `attempt`, may run: `now` plus its retry backoff
    /// ([`JobSpec::retry_delay`]); `None`: at once.
    pub fn retry_at(&self, spec: &JobSpec, attempt: u32, now: Timestamp) -> Option<Timestamp> {
        spec.retry_delay(self.kind, attempt).map(|d| now.plus(d))
    }
}

/// What [`Queue::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pushed {
    /// A new job, with this id.
    New(JobId),
    /// The same job was pushed before with this `idempotency_key`; nothing
    /// was added. Its id.
    Existing(JobId),
}

impl Pushed {
    /// The job's id, new or not.
    pub fn id(&self) -> &JobId {
        match self {
            Pushed::New(id) | Pushed::Existing(id) => id,
        }
    }

    /// The job's id, new or not.
    pub fn into_id(self) -> JobId {
        match self {
            Pushed::New(id) | Pushed::Existing(id) => id,
        }
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

impl fmt::Display for FailOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailOutcome::Requeued => "queued again",
            FailOutcome::Failed => "no attempt left",
        })
    }
}

/// What [`Queue::request_cancel`] did.
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
/// then reports its end: [`complete`](Queue::complete),
/// [`fail`](Queue::fail), [`report_cancelled`](Queue::report_cancelled)
/// (it stopped the run because a user asked with
/// [`request_cancel`](Queue::request_cancel)) or [`release`](Queue::release).
/// A lease that is not heartbeated expires: the attempt is recorded as
/// failed with kind `lease_lost` and the job is reserved again with
/// `attempt + 1` (or ends `failed` if it has no attempts left, or
/// `cancelled` if a cancel was asked for). No job is ever held by two
/// leases at once.
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
/// # Why these methods
///
/// Each method is one step of a job's life that some caller takes, and no
/// two can be built from each other without a race:
///
/// - the worker's steps, all fenced by the lease token: `reserve`,
///   `heartbeat`, `started`, then one end (`complete`, `fail`,
///   `report_cancelled`, `release`, or `park` for a job too big for it), and
///   `stop_reserving` when it stops;
/// - the user's steps: `add` (and `push`, its short form), then by id
///   `request_cancel` and `retry`;
/// - reading: `get`, `list`, `errors`;
/// - after a run, unfenced: `record_artifacts` (where its files went);
/// - `init`, `exists` and `capabilities` for setup and for what the CLI and the
///   conformance suite may expect.
///
/// What only some backends can do is outside this trait: workers that
/// register and show in `gpupool status` are a [`WorkerRegistry`], reached
/// through [`worker_registry`](Queue::worker_registry). No method has a
/// default that silently does nothing: a backend states each answer.
///
/// # Implementing
///
/// Implement every method but `push` (a short form of `add`), declare what you support in
/// [`capabilities`](Queue::capabilities), and run the conformance suite
/// (`gpupool-core` with feature `conformance`: `conformance_tests!`) from one
/// test file. Call [`JobSpec::validate`] in `add`. Every decision that is
/// the same for all backends (what a failure does, what fits a request) has
/// a helper in core: [`Failure::requeues`], [`ReserveRequest::fits`].
/// `docs/custom-backend.md` walks through a whole backend, and
/// `examples/custom_backend/` is one (PostgreSQL).
///
/// A skeleton, the shape every backend has:
///
/// ```
/// # use gpupool_core::*;
/// # use std::time::Duration;
/// #[derive(Debug)]
/// struct MyQueue { /* a connection pool */ }
///
/// #[async_trait]
/// impl Queue for MyQueue {
///     fn capabilities(&self) -> Capabilities {
///         Capabilities::default().with_priority(true)
///     }
///     async fn init(&self) -> Result<()> { todo!("create tables") }
///     async fn exists(&self) -> Result<bool> { todo!("are the tables there?") }
///     async fn add(&self, spec: JobSpec) -> Result<Pushed> {
///         spec.validate()?;
///         todo!("insert, honouring idempotency_key (rows::same_job)")
///     }
///     async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
///         todo!("lease the first queued job that req.fits(), or an expired lease's job")
///     }
///     async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> { todo!() }
///     async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> { todo!() }
///     async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> { todo!() }
///     async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> { todo!() }
///     async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> { todo!() }
///     async fn release(&self, lease: &Lease) -> Result<()> { todo!() }
///     async fn park(&self, lease: &Lease, _gpus: u32) -> Result<()> {
///         self.release(lease).await // enough where reserve filters by GPUs
///     }
///     async fn stop_reserving(&self, _worker: &str) -> Result<()> {
///         Ok(()) // reserve keeps nothing between calls
///     }
///     async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> { todo!() }
///     async fn retry(&self, id: &JobId) -> Result<()> { todo!() }
///     async fn get(&self, id: &JobId) -> Result<JobRecord> { todo!() }
///     async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> { todo!() }
///     async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> { todo!() }
///     async fn record_artifacts(&self, id: &JobId, artifacts: &Artifacts) -> Result<()> {
///         todo!("set the record's artifacts where artifacts.replaces() what it holds")
///     }
///     fn worker_registry(&self) -> Option<&dyn WorkerRegistry> {
///         None // `gpupool status` then says workers are not tracked
///     }
///     fn run_logs(&self) -> Option<&dyn RunLogs> {
///         None // `gpupool logs` then reads the log where the job ran
///     }
/// }
/// ```
///
/// # Errors
///
/// Calls that take a [`Lease`] return [`Error::LeaseLost`](crate::Error::LeaseLost)
/// when the token no longer holds the job: it expired and was reclaimed, or
/// the job was released, finished or retried. Nothing is recorded then. An
/// expired lease that no reserve has reclaimed yet still holds: its
/// holder's heartbeat or result is accepted until a reserve (of any queue,
/// on backends that sweep expired leases together) reclaims it.
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

    /// Whether [`init`](Queue::init) has set this queue up: its tables,
    /// keys or ledger are there. Reads only and creates nothing, so that a
    /// mistyped URL is told apart from an empty queue (`gpupool jobs` says
    /// "no gpupool queue at URL" instead of showing an empty table). A
    /// backend whose opening already sets itself up (the SQLite file, an
    /// in-process queue) returns `true`.
    async fn exists(&self) -> Result<bool>;

    /// Adds a job after [`JobSpec::validate`] and says whether it is new.
    /// A job whose `idempotency_key` was pushed before is not added again:
    /// [`Pushed::Existing`] with the first job's id when the two jobs are
    /// the same, [`Error::IdempotencyConflict`](crate::Error::IdempotencyConflict)
    /// when they differ ([`crate::rows::same_job`] decides).
    async fn add(&self, spec: JobSpec) -> Result<Pushed>;

    /// [`add`](Queue::add), for callers that only need the id.
    async fn push(&self, spec: JobSpec) -> Result<JobId> {
        self.add(spec).await.map(Pushed::into_id)
    }

    /// Leases the next job that fits: the first of `queues` that has one,
    /// then highest priority (if declared), then oldest. Where the backend
    /// declares `gpu_filter`, only jobs that [`ReserveRequest::fits`] are
    /// returned (needing at most [`ReserveRequest::gpu_limit`] GPUs:
    /// `max_gpus` when set, else `free_gpus`). Returns `None` if nothing
    /// fits within `wait`.
    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>>;

    /// Up to `max` leases at once (0 counts as 1), for a worker with `max`
    /// free slots: the first is the job [`reserve`](Queue::reserve) would
    /// return (waiting for it as `reserve` does); each one after it is the
    /// next in the same order, taken only while the GPUs the leases need
    /// together stay within `free_gpus` ([`Batch`]), so the worker can
    /// start them all at once. Empty if nothing fits within `wait`.
    ///
    /// The default is one [`reserve`](Queue::reserve). A backend whose
    /// reserve costs a round trip overrides it to lease several jobs in one
    /// (MySQL: one transaction; Redis: one read; RabbitMQ: one trip through
    /// the ledger), so a worker with many slots starts a batch's short jobs
    /// together, not one reserve after another.
    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        let _ = max;
        Ok(self.reserve(req).await?.into_iter().collect())
    }

    /// Extends the lease to `lease` from now. Reports a cancel request.
    /// `LeaseLost` if the lease no longer holds.
    async fn heartbeat(&self, lease: &Lease, extend: std::time::Duration) -> Result<Heartbeat>;

    /// Records facts about the run (resolved commit, GPUs given). Fenced by
    /// the lease like every call that takes one.
    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()>;

    /// The run succeeded: the job becomes `succeeded`. Fenced by the lease.
    /// The completion's `run` and `log`, when it carries them, are recorded
    /// too (by [`Completion::record_first`] where the backend cannot record
    /// them in the same step).
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()>;

    /// Whether [`complete`](Queue::complete) records a completion's `run`
    /// and `log` in the same step as the end (MySQL: one transaction).
    /// The worker then sends a successful run's last output with its end,
    /// and the facts of a run that ends within a second of its start: for
    /// a short run, one commit where `started`, the last `ship` and
    /// `complete` were three. The default, `false`, has the worker record
    /// them first.
    fn completes_with_run(&self) -> bool {
        false
    }

    /// The run failed: the attempt is recorded in `errors`, and the job goes
    /// back to `queued` if [`Failure::requeues`] says so, else `failed`.
    /// Fenced by the lease.
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome>;

    /// The worker's report that it stopped the run because a cancel was
    /// requested ([`Heartbeat::CancelRequested`]): the job becomes
    /// `cancelled`, with the run's output tail. Fenced by the lease.
    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()>;

    /// Gives the job back without charging an attempt (graceful shutdown):
    /// it is `queued` again and its attempt count is as before this lease.
    /// Fenced by the lease.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Gives back a job that needs `gpus` GPUs, more than the caller has,
    /// without charging an attempt, so that it is offered only to reserves
    /// whose `max_gpus` (or free GPUs) reach `gpus`: a job too big for the
    /// workers at hand waits for a big enough one instead of bouncing
    /// between small ones. Fenced by the lease. A backend that declares
    /// `gpu_filter` never hands such a job to a smaller worker, and may
    /// implement this as [`release`](Queue::release).
    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()>;

    /// Gives the job back without charging an attempt, as
    /// [`release`](Queue::release) does, but no reserve returns it for
    /// `pause`, counted on the backend's clock (the one its reserve
    /// compares with: a caller's clock that lags cannot make the job due at
    /// once); [`JobRecord::not_before`](crate::JobRecord::not_before) reads
    /// that time meanwhile. The wait of `after` is made of these
    /// ([`crate::after`]). Fenced by the lease.
    ///
    /// Required with the `delays` capability, which also asks that `add`
    /// hold a job back until its spec's `not_before` and that `fail`, when
    /// it queues the job again, hold it back for
    /// [`JobSpec::retry_delay`](crate::JobSpec::retry_delay). The default
    /// refuses.
    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        let _ = pause;
        Err(Error::Config(format!("this queue cannot hold job {} back until a time", lease.id())))
    }

    /// The worker `worker` will not reserve again (it is stopping; its
    /// running jobs may still run). A backend that keeps a waiting
    /// reserve's request alive between calls withdraws it, and gives back,
    /// charging no attempt, a job it was handed that no call returned. A
    /// backend whose `reserve` keeps nothing between calls returns `Ok(())`.
    async fn stop_reserving(&self, worker: &str) -> Result<()>;

    /// The user's request to cancel a job: a queued one becomes `cancelled`
    /// at once; a running one is flagged, and its worker learns of it at
    /// its next heartbeat, stops the process and calls
    /// [`report_cancelled`](Queue::report_cancelled).
    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome>;

    /// Puts a `failed` or `cancelled` job back in the queue. Its attempt
    /// count and error records are kept, and it gets `max_attempts` more
    /// attempts. [`Error::InvalidState`](crate::Error::InvalidState) for a job
    /// in any other state.
    async fn retry(&self, id: &JobId) -> Result<()>;

    /// One job with its failed attempts.
    async fn get(&self, id: &JobId) -> Result<JobRecord>;

    /// Jobs, newest first, filtered and paginated. Records come without
    /// their `errors` list. A job whose stored record does not read is left
    /// out (with a log line), so one bad row does not hide the others;
    /// [`get`](Queue::get) on it returns the error.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>>;

    /// Failed-attempt records, newest first: all of them or one job's.
    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>>;

    /// Records where an attempt's files are and what they are: the job's
    /// [`JobRecord::artifacts`] becomes `artifacts` if
    /// [`Artifacts::replaces`] what it holds (the same or an earlier
    /// attempt's), and is left alone otherwise. The worker calls it after
    /// the run has ended, when it has kept the run's files and again once
    /// they are uploaded, so it is not fenced by a lease: the job may have
    /// ended or be running its next attempt. `NotFound` for an unknown id.
    ///
    /// [`Artifacts::replaces`]: crate::Artifacts::replaces
    async fn record_artifacts(&self, id: &JobId, artifacts: &crate::Artifacts) -> Result<()>;

    /// Where workers register, if this backend keeps a registry
    /// (`Some(self)` for a backend that implements [`WorkerRegistry`]).
    /// `None`: workers run but are not listed by `gpupool status`.
    fn worker_registry(&self) -> Option<&dyn WorkerRegistry>;

    /// Where running jobs' output and live results are shipped, if this
    /// backend keeps them (`Some(self)` for a backend that implements
    /// [`RunLogs`]). `None`: `gpupool logs` reads the log on the host that
    /// ran the job, and the stored tail elsewhere.
    fn run_logs(&self) -> Option<&dyn RunLogs>;

    /// Where the backend stores snapshots of uncommitted code (`Some(self)`
    /// for a backend that implements [`Blobs`]). `None` (the default):
    /// `gpupool push --snapshot` says this backend cannot.
    fn blobs(&self) -> Option<&dyn Blobs> {
        None
    }
}

/// Every job `filter` selects (its `limit` and `offset` aside), newest
/// first, read a page of 1,000 at a time.
pub async fn all_jobs(queue: &dyn Queue, filter: &ListFilter) -> Result<Vec<JobRecord>> {
    let (mut jobs, mut offset) = (Vec::new(), 0u64);
    loop {
        let page = queue.list(&ListFilter { limit: 1000, offset, ..filter.clone() }).await?;
        let last = page.len() < 1000;
        jobs.extend(page);
        if last {
            return Ok(jobs);
        }
        offset += 1000;
    }
}

/// The most bytes of a job's shipped log a backend keeps: the oldest
/// part goes first, and [`LogPage::dropped`] says how much went.
pub const LOG_CAP_BYTES: u64 = 16 << 20;

/// What a worker ships about a running job, at most about once a second.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// New output: whole lines, as a terminal shows them (a progress bar
    /// redrawn with `\r` is its last state), secrets replaced. Appended to
    /// the job's log.
    pub log: String,
    /// The results reported so far, when they changed: the record's
    /// `result` becomes this.
    pub result: Option<serde_json::Value>,
}

/// A piece of a job's shipped log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPage {
    /// The text from the offset asked for (or from the oldest kept byte).
    pub text: String,
    /// The offset to ask for next.
    pub next: u64,
    /// Bytes before `text` that the cap dropped (0 when none).
    pub dropped: u64,
}

/// Running jobs' output and live results, kept by the backend so that any
/// host can read them (`gpupool logs`, `gpupool logs -f`, `gpupool jobs`).
/// Optional: a [`Queue`] that keeps them returns it from [`Queue::run_logs`].
///
/// # Implementing
///
/// A job's log is one append-only text across its attempts (each attempt
/// starts with the worker's header line), addressed by byte offsets from
/// its start. [`ship`](RunLogs::ship) appends, fenced by the lease like
/// every call that takes one, and drops the oldest whole pieces once more
/// than [`LOG_CAP_BYTES`] are kept. The conformance suite's `run_logs` test
/// checks it.
///
/// # Cancellation safety
///
/// Each call is one transaction or script: dropped, it leaves the log as
/// before or as after. (MySQL appends output in one statement and trims
/// past the cap in a second: dropped between the two, the log holds more
/// than the cap until the next ship trims it.)
#[async_trait]
pub trait RunLogs: Send + Sync {
    /// Appends `progress.log` to the job's log and sets its `result` to
    /// `progress.result` when that is `Some`. `LeaseLost` if the lease no
    /// longer holds; nothing is written then.
    async fn ship(&self, lease: &Lease, progress: &Progress) -> Result<()>;

    /// The job's log from byte `from` on (at most about a megabyte per
    /// call; call again from [`LogPage::next`]). `NotFound` for an unknown
    /// job; an empty page for a job that shipped nothing yet.
    async fn read_log(&self, id: &JobId, from: u64) -> Result<LogPage>;
}

/// Byte strings stored by their hash: the snapshots of uncommitted code
/// that jobs run ([`crate::SnapshotRef`]). Binary-safe, up to
/// [`crate::MAX_SNAPSHOT_BYTES`] each; a backend may store one in pieces.
/// Nothing is deleted: a snapshot lives as long as the backend keeps its
/// data (RabbitMQ: a stream per snapshot, kept 30 days).
#[async_trait]
pub trait Blobs: Send + Sync {
    /// Stores `bytes` under `hash` (which the caller computed from them).
    /// Storing the same hash again is harmless.
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()>;

    /// The bytes stored under `hash`; `None` if none are.
    async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>>;
}

/// The piece size backends that store a blob in pieces use (1 MiB: under
/// MySQL's default packet limit, and a RabbitMQ message of ordinary size).
pub const BLOB_PIECE_BYTES: usize = 1 << 20;

/// A blob's pieces of at most [`BLOB_PIECE_BYTES`], in order; an empty blob
/// is one empty piece (so that it is stored, and reads back as there).
pub fn blob_pieces(bytes: &[u8]) -> Vec<&[u8]> {
    if bytes.is_empty() { vec![bytes] } else { bytes.chunks(BLOB_PIECE_BYTES).collect() }
}

/// Workers that register and heartbeat, so that `gpupool status` can show
/// each host, its GPUs and what it runs. Optional: a [`Queue`] that keeps
/// one returns it from [`Queue::worker_registry`].
///
/// # Implementing
///
/// Store each [`WorkerInfo`] by `name`, stamping `seen_at` with the
/// backend's clock where it has one. [`workers`](WorkerRegistry::workers)
/// sets `lost` with [`WorkerInfo::lost_at`]. The conformance suite's
/// `worker_registry` test checks all three methods.
///
/// # Cancellation safety
///
/// Each call is one write or one read; dropping it leaves the registry as
/// before or as after.
#[async_trait]
pub trait WorkerRegistry: Send + Sync {
    /// Records (or refreshes) a worker and what it holds, stamping
    /// `seen_at`. Workers call it every heartbeat interval.
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()>;

    /// Removes a worker that stopped cleanly.
    async fn unregister_worker(&self, name: &str) -> Result<()>;

    /// Every registered worker, with `lost` set for those that stopped
    /// reporting.
    async fn workers(&self) -> Result<Vec<WorkerInfo>>;
}

/// A backend that opens itself from a URL. The facade's registry
/// (`gpupool::Registry::add`) is built from these declarations, so a custom
/// backend that implements it is opened by `gpupool::connect`, the worker
/// and every CLI command, like the in-tree ones.
///
/// ```
/// # use gpupool_core::{Connect, MemoryQueue, Result};
/// # use std::future::Future;
/// #[derive(Debug)]
/// struct Scratch(MemoryQueue);
/// # #[gpupool_core::async_trait]
/// # impl gpupool_core::Queue for Scratch {
/// #     fn capabilities(&self) -> gpupool_core::Capabilities { self.0.capabilities() }
/// #     async fn init(&self) -> Result<()> { self.0.init().await }
/// #     async fn exists(&self) -> Result<bool> { self.0.exists().await }
/// #     async fn add(&self, s: gpupool_core::JobSpec) -> Result<gpupool_core::Pushed> { self.0.add(s).await }
/// #     async fn reserve(&self, r: &gpupool_core::ReserveRequest) -> Result<Option<gpupool_core::Lease>> { self.0.reserve(r).await }
/// #     async fn heartbeat(&self, l: &gpupool_core::Lease, e: std::time::Duration) -> Result<gpupool_core::Heartbeat> { self.0.heartbeat(l, e).await }
/// #     async fn started(&self, l: &gpupool_core::Lease, i: &gpupool_core::RunInfo) -> Result<()> { self.0.started(l, i).await }
/// #     async fn complete(&self, l: &gpupool_core::Lease, d: gpupool_core::Completion) -> Result<()> { self.0.complete(l, d).await }
/// #     async fn fail(&self, l: &gpupool_core::Lease, f: gpupool_core::Failure) -> Result<gpupool_core::FailOutcome> { self.0.fail(l, f).await }
/// #     async fn report_cancelled(&self, l: &gpupool_core::Lease, t: String) -> Result<()> { self.0.report_cancelled(l, t).await }
/// #     async fn release(&self, l: &gpupool_core::Lease) -> Result<()> { self.0.release(l).await }
/// #     async fn park(&self, l: &gpupool_core::Lease, g: u32) -> Result<()> { self.0.park(l, g).await }
/// #     async fn stop_reserving(&self, w: &str) -> Result<()> { self.0.stop_reserving(w).await }
/// #     async fn request_cancel(&self, id: &gpupool_core::JobId) -> Result<gpupool_core::CancelOutcome> { self.0.request_cancel(id).await }
/// #     async fn retry(&self, id: &gpupool_core::JobId) -> Result<()> { self.0.retry(id).await }
/// #     async fn get(&self, id: &gpupool_core::JobId) -> Result<gpupool_core::JobRecord> { self.0.get(id).await }
/// #     async fn list(&self, f: &gpupool_core::ListFilter) -> Result<Vec<gpupool_core::JobRecord>> { self.0.list(f).await }
/// #     async fn errors(&self, j: Option<&gpupool_core::JobId>, n: u32) -> Result<Vec<gpupool_core::AttemptError>> { self.0.errors(j, n).await }
/// #     async fn record_artifacts(&self, id: &gpupool_core::JobId, a: &gpupool_core::Artifacts) -> Result<()> { self.0.record_artifacts(id, a).await }
/// #     fn worker_registry(&self) -> Option<&dyn gpupool_core::WorkerRegistry> { None }
/// #     fn run_logs(&self) -> Option<&dyn gpupool_core::RunLogs> { None }
/// # }
///
/// impl Connect for Scratch {
///     const SCHEMES: &'static [&'static str] = &["scratch"];
///
///     fn connect(_url: &str) -> impl Future<Output = Result<Self>> + Send {
///         async { Ok(Scratch(MemoryQueue::new())) }
///     }
/// }
/// ```
pub trait Connect: Queue + Sized + 'static {
    /// The URL schemes this backend opens, such as `["mysql", "mariadb"]`.
    const SCHEMES: &'static [&'static str];

    /// Opens the queue `url` names (its scheme is one of [`Self::SCHEMES`]).
    /// Bad URLs are [`Error::Config`](crate::Error::Config) errors that name
    /// the problem; passwords never appear in one.
    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send;
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
        let mut last = crate::sync::lock(&self.last);
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_the_first_then_what_fits_in_order() {
        let req = ReserveRequest { free_gpus: 3, gpu_host: true, ..ReserveRequest::new("default") };
        let mut b = Batch::new(&req, 8);
        assert!(b.admit(2));
        assert!(b.admit(1));
        assert!(!b.admit(1), "over the free GPUs");
        assert!(!b.admit(0), "never skips over a refused job");
        assert_eq!(b.room(), 0);

        // The first is taken even when it needs more than is free (held, as
        // for reserve), and nothing after it.
        let mut b = Batch::new(&req, 8);
        assert!(b.admit(4));
        assert!(!b.admit(0));

        // Jobs without GPUs: up to max.
        let mut b = Batch::new(&ReserveRequest::new("default"), 2);
        assert!(b.admit(0) && b.admit(0));
        assert!(b.full() && !b.admit(0));
    }
}
