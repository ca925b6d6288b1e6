//! The [`Worker`]: reserves what it can run, gives each GPU to one job,
//! prepares the code, runs the process, heartbeats the lease and reports.
//!
//! - It reserves only when it has a free slot, telling the queue how many
//!   GPUs it can give now, and holds GPUs from the moment a job is reserved.
//! - While a job runs it heartbeats the lease; a lost lease stops the
//!   process, a cancel seen in a heartbeat kills it and marks the job
//!   `cancelled`.
//! - A backend that is unavailable makes it back off and try again, never
//!   exit; a result is kept and reported once the backend is back (if the
//!   lease still holds).
//! - On shutdown it stops reserving, waits up to the drain timeout, then
//!   stops what is left and releases it, charging no attempt.

use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use gpupool_core::argv::build_argv;
use gpupool_core::gpu::{GpuInventory, StaticInventory};
use gpupool_core::runner::{Outcome, RunSpec, Runner, StopReason, Stopper};
use gpupool_core::sync::lock;
use gpupool_core::workspace::{Checkout, PrepareRequest, Workspace};
use gpupool_core::{
    Completion, Error, Failure, FailureKind, Heartbeat, Lease, Queue, ReserveRequest, Result, RunInfo, RunningJob,
    WorkerInfo,
};

use crate::git::{Credentials, GitWorkspace, mirror_name};
use crate::host::{FileLock, Instance};
use crate::journal::{Entry, Stored};
use crate::nvml::Placement;
use crate::process::ProcessRunner;

/// How long the worker lets a job it just took start (checkout, spawn)
/// before it asks for the next one, at most.
const LAUNCH_HEAD_START: Duration = Duration::from_millis(50);

/// How long after its start a run's facts (commit, GPUs) wait to be
/// recorded where the queue can record them with the run's end instead
/// ([`Queue::completes_with_run`]): a run that ends sooner costs one commit
/// less.
const RECORD_START_AFTER: Duration = Duration::from_secs(1);

/// How a worker runs. [`WorkerConfig::new`] gives INTERFACE.md's defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues served, first one first.
    pub queues: Vec<String>,
    /// GPU indices this worker gives to jobs (empty: CPU only), when no
    /// `inventory` is set.
    pub gpus: Vec<u32>,
    /// Where GPUs and their live status come from (NVML on a real host:
    /// [`crate::inventory`]). When `None`, the `gpus` indices with nothing
    /// known about them. [`WorkerBuilder::inventory`] overrides it.
    pub inventory: Option<Arc<dyn GpuInventory>>,
    /// A GPU none of this worker's jobs holds is skipped while more than this
    /// fraction of its memory is used (by someone else's process).
    pub gpu_busy_fraction: f64,
    /// Parallel runs on a worker with no GPUs.
    pub slots: usize,
    /// Jobs sharing one GPU (1: exclusive).
    pub slots_per_gpu: usize,
    /// Lease length.
    pub lease: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// How long shutdown waits for running jobs before stopping them.
    pub drain_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The command template before the entrypoint (`{gpus}` expands).
    pub command: Vec<String>,
    /// The setup step run in the checkout before the entrypoint.
    pub setup: Option<Vec<String>>,
    /// Files whose content decides whether the setup step runs again.
    pub setup_inputs: Vec<String>,
    /// The repository for jobs that name none.
    pub repo: Option<String>,
    /// Other repositories jobs may name.
    pub allowed_repos: Vec<String>,
    /// Mirrors, checkouts, logs and the setup cache.
    pub data_dir: PathBuf,
    /// Exit once nothing runs here and nothing can be reserved.
    pub burst: bool,
    /// `host:pid`.
    pub name: String,
    /// Bytes of output kept as a job's tail.
    pub tail_bytes: usize,
    /// Output folders (`DATA_DIR/outputs/…`) in which nothing changed for
    /// this long are removed, checked at start and hourly. `None` (the
    /// default): outputs stay until the user removes them.
    pub outputs_max_age: Option<Duration>,
    /// Where runs' files are uploaded once they end (`--artifacts URL`).
    /// `None`: they stay in the output directories on this host.
    pub artifacts: Option<crate::ArtifactStore>,
    /// Keep the local copy of files uploaded to the artifact store
    /// (`--keep-outputs`); by default it is removed once the upload is
    /// verified and recorded.
    pub keep_outputs: bool,
    /// What names the queue on this host: its URL without a password
    /// (`gpupool worker` sets it). Job logs are kept per queue
    /// ([`log_path`]), and a restarted worker delivers only its own queue's
    /// journaled results; workers of several queues can share a data
    /// directory.
    pub queue_id: String,
}

/// Whether a job id is safe in a file name: 1 to 64 letters, digits, `-`
/// and `_` (every backend's ids are numbers).
fn plain_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where a job's log is kept on the host that ran it:
/// `DATA_DIR/logs/QUEUE/job-ID.log`, with `QUEUE` a short hash of the
/// queue's [`WorkerConfig::queue_id`], so two queues' job 1 never share a
/// file. `gpupool logs` reads it from there.
pub fn log_path(data_dir: &std::path::Path, queue_id: &str, job: &gpupool_core::JobId) -> PathBuf {
    data_dir.join("logs").join(queue_folder(queue_id)).join(format!("{}.log", job_file_stem(job)))
}

/// `q-` and a short hash of the queue's [`WorkerConfig::queue_id`]: the
/// folder a queue's logs and outputs go to on this host.
pub(crate) fn queue_folder(queue_id: &str) -> String {
    let hash =
        git2::Oid::hash_object(git2::ObjectType::Blob, queue_id.as_bytes()).map(|o| o.to_string()).unwrap_or_default();
    format!("q-{}", &hash[..hash.len().min(12)])
}

/// `job-ID`, with anything but letters, digits and `-` replaced: an id that
/// is not plain never names a path outside its folder.
pub(crate) fn job_file_stem(job: &gpupool_core::JobId) -> String {
    let job: String =
        job.as_str().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("job-{job}")
}

impl WorkerConfig {
    /// The defaults: queue `default`, CPU only with 1 slot, lease 60 s,
    /// heartbeat 10 s, drain 10 min, `python3`, setup input
    /// `requirements.txt`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        WorkerConfig {
            queues: vec![gpupool_core::DEFAULT_QUEUE.to_owned()],
            gpus: Vec::new(),
            inventory: None,
            gpu_busy_fraction: 0.1,
            slots: 1,
            slots_per_gpu: 1,
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(600),
            grace: Duration::from_secs(10),
            command: vec!["python3".to_owned()],
            setup: None,
            setup_inputs: vec!["requirements.txt".to_owned()],
            repo: None,
            allowed_repos: Vec::new(),
            data_dir: data_dir.into(),
            burst: false,
            name: gpupool_core::default_worker_name(),
            tail_bytes: gpupool_core::runner::DEFAULT_TAIL_BYTES,
            outputs_max_age: None,
            artifacts: None,
            keep_outputs: false,
            queue_id: "default".to_owned(),
        }
    }

    fn inventory(&self) -> Arc<dyn GpuInventory> {
        self.inventory.clone().unwrap_or_else(|| Arc::new(StaticInventory::new(&self.gpus)))
    }
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Jobs it reserved.
    pub reserved: u64,
    /// The fault of its own environment it stopped on (`burst`), or last
    /// saw, if no run went through since.
    pub unhealthy: Option<String>,
}

/// Runs jobs from a queue on this host: reserves what its GPUs can take,
/// prepares the code through a [`Workspace`], runs it through a [`Runner`],
/// heartbeats the lease and reports the end.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use gpupool_worker::{Worker, WorkerConfig, GitWorkspace, Credentials, ProcessRunner};
/// # async fn run(queue: Arc<dyn gpupool_core::Queue>) -> gpupool_core::Result<()> {
/// let mut cfg = WorkerConfig::new("/var/lib/gpupool");
/// cfg.repo = Some("https://github.com/team/model.git".into());
/// let worker = Worker::builder(queue, cfg)
///     .workspace(Arc::new(GitWorkspace::new("/var/lib/gpupool", Credentials::from_env())))
///     .runner(Arc::new(ProcessRunner::new()))
///     .build();
/// worker.run(tokio_util::sync::CancellationToken::new()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Ctx>,
}

#[derive(Debug)]
struct Ctx {
    queue: Arc<dyn Queue>,
    cfg: WorkerConfig,
    workspace: Arc<dyn Workspace>,
    runner: Arc<dyn Runner>,
    inventory: Arc<dyn GpuInventory>,
    allowed: Vec<String>,
    setup_lock: tokio::sync::Mutex<()>,
    health: StdMutex<Health>,
    /// Records and uploads what runs leave in their output directories.
    keeper: Arc<crate::uploads::Keeper>,
    /// Ends being reported: a run's slot and GPUs are free once its end is
    /// journaled, and its report goes on here (the next reserve need not
    /// wait for it).
    reports: tokio_util::task::TaskTracker,
}

/// What a job's run comes to, to be reported.
#[derive(Debug)]
enum Report {
    Complete(Box<Completion>),
    Fail(Failure),
    Cancelled(String),
    Release,
    /// A fault of this worker's environment: the job goes back uncharged
    /// and the worker pauses.
    WorkerFault(String),
    Nothing,
}

/// Whether this worker's environment works, as its last runs said.
#[derive(Debug, Default)]
struct Health {
    /// The last worker fault, until a run goes through again.
    fault: Option<String>,
    /// How long the worker pauses after the next fault.
    backoff: Duration,
    /// No reserve before this.
    paused_until: Option<tokio::time::Instant>,
}

/// The longest pause after repeated worker faults.
const MAX_FAULT_BACKOFF: Duration = Duration::from_secs(300);

/// Builds a [`Worker`], with the defaults for every part not set:
/// [`GitWorkspace`] under the data directory with credentials from the
/// environment (and no prompt), [`ProcessRunner`], and the config's
/// `inventory` (or, without one, its `gpus` list as given: CPU-only when
/// empty; [`crate::inventory`] gives NVML's).
#[derive(Debug)]
pub struct WorkerBuilder {
    queue: Arc<dyn Queue>,
    cfg: WorkerConfig,
    workspace: Option<Arc<dyn Workspace>>,
    runner: Option<Arc<dyn Runner>>,
    inventory: Option<Arc<dyn GpuInventory>>,
}

impl WorkerBuilder {
    /// Where jobs' code comes from.
    pub fn workspace(mut self, workspace: Arc<dyn Workspace>) -> Self {
        self.workspace = Some(workspace);
        self
    }

    /// How jobs run.
    pub fn runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = Some(runner);
        self
    }

    /// Which GPUs the worker has.
    pub fn inventory(mut self, inventory: Arc<dyn GpuInventory>) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// The worker.
    pub fn build(self) -> Worker {
        let WorkerBuilder { queue, cfg, workspace, runner, inventory } = self;
        let workspace =
            workspace.unwrap_or_else(|| Arc::new(GitWorkspace::new(&cfg.data_dir, Credentials::from_env())));
        let runner = runner.unwrap_or_else(|| Arc::new(ProcessRunner::new()));
        let inventory = inventory.unwrap_or_else(|| cfg.inventory());
        let allowed = cfg.repo.iter().chain(&cfg.allowed_repos).map(|r| normalize_repo(r)).collect();
        // The host's own name (not the worker's, which `--name` may set):
        // `gpupool pull` on this host knows it, and so does ssh.
        let me = gpupool_core::default_worker_name();
        let host = me.rsplit_once(':').map_or(me.as_str(), |(h, _)| h).to_owned();
        let keeper = Arc::new(crate::uploads::Keeper::new(
            Arc::clone(&queue),
            cfg.artifacts.clone(),
            cfg.keep_outputs,
            host,
            cfg.data_dir.join("outputs"),
        ));
        Worker {
            ctx: Arc::new(Ctx {
                queue,
                cfg,
                workspace,
                runner,
                inventory,
                allowed,
                setup_lock: tokio::sync::Mutex::new(()),
                health: StdMutex::default(),
                keeper,
                reports: tokio_util::task::TaskTracker::new(),
            }),
        }
    }
}

impl Worker {
    /// A worker on `queue` with every default part (see [`WorkerBuilder`]).
    pub fn new(queue: Arc<dyn Queue>, cfg: WorkerConfig) -> Self {
        Self::builder(queue, cfg).build()
    }

    /// A builder, to set the workspace, runner or inventory.
    pub fn builder(queue: Arc<dyn Queue>, cfg: WorkerConfig) -> WorkerBuilder {
        WorkerBuilder { queue, cfg, workspace: None, runner: None, inventory: None }
    }

    /// Runs until `shutdown` fires (or, with `burst`, until idle), then
    /// drains: waits up to the drain timeout for running jobs, then stops
    /// and releases what is left, and waits for every end to be reported.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerSummary> {
        self.run_until(shutdown, CancellationToken::new()).await
    }

    /// [`run`](Worker::run), and when `stop_now` fires (a second Ctrl-C),
    /// the drain ends at once: running jobs are stopped and released with
    /// no attempt charged. `stop_now` implies `shutdown`.
    ///
    /// The worker runs as a task of the caller's runtime, not in the
    /// returned future: a program that blocks on it from its main thread
    /// (as `gpupool worker` does) would otherwise wake that thread, outside
    /// the runtime's own, for every reserve's answer and every run's end
    /// (BENCHMARKS.md: 15 % of a one-worker drain on RabbitMQ). Dropping
    /// the future stops the worker, as it did.
    pub async fn run_until(self, shutdown: CancellationToken, stop_now: CancellationToken) -> Result<WorkerSummary> {
        // Aborted when the future waiting on it is dropped.
        let task =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(self.serve(shutdown, stop_now).in_current_span()));
        match task.await {
            Ok(summary) => summary,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(e) => Err(Error::Backend { backend: "worker", source: e.to_string().into() }),
        }
    }

    /// [`run_until`](Worker::run_until)'s task.
    async fn serve(self, shutdown: CancellationToken, stop_now: CancellationToken) -> Result<WorkerSummary> {
        let ctx = self.ctx;
        let shutdown = {
            // Either token starts the shutdown.
            let (either, now) = (shutdown.clone(), stop_now.clone());
            tokio::spawn(async move {
                now.cancelled().await;
                either.cancel();
            });
            shutdown
        };
        let cfg = &ctx.cfg;
        recover(&ctx).await;
        let pruner = cfg.outputs_max_age.map(|age| tokio::spawn(prune_loop(cfg.data_dir.clone(), age)));
        let mut slots = Slots::new(&ctx);
        let registry = tokio::spawn(register_loop(
            Arc::clone(&ctx),
            Arc::clone(&slots.gpus),
            Arc::clone(&slots.running),
            slots.total,
            shutdown.clone(),
        ));
        let mut summary = WorkerSummary::default();
        let mut backoff = Duration::ZERO;
        info!(worker = %cfg.name, queues = ?cfg.queues, gpus = slots.total_gpus, slots = slots.total, "worker started");

        while !shutdown.is_cancelled() {
            slots.reap();
            // After a fault of its own environment the worker takes no job
            // for a while (doubling up to 5 minutes); in burst mode it stops.
            let paused = lock(&ctx.health).paused_until.filter(|t| *t > tokio::time::Instant::now());
            if let Some(until) = paused {
                if cfg.burst {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
            if slots.full() {
                slots.wait_for_one(&shutdown).await;
                continue;
            }
            // As many jobs as there are free slots, in one request where the
            // backend can (Queue::reserve_many): each fits the GPUs free now.
            match ctx.queue.reserve_many(&slots.request(cfg), slots.free()).await {
                Ok(leases) if !leases.is_empty() => {
                    backoff = Duration::ZERO;
                    summary.reserved += slots.start_batch(&ctx, leases, &shutdown).await;
                }
                Ok(_) => {
                    backoff = Duration::ZERO;
                    if cfg.burst {
                        if slots.idle() {
                            info!("burst: nothing to run; exiting");
                            break;
                        }
                        slots.wait_for_one(&shutdown).await;
                    }
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(30));
                    warn!("reserve failed ({e}); trying again in {}", humantime::format_duration(backoff));
                    sleep_or(&shutdown, backoff).await;
                }
            }
        }

        // Nothing more is reserved: a backend holding a request open for
        // this worker lets it go now, not after the running jobs drain.
        if let Err(e) = ctx.queue.stop_reserving(&cfg.name).await {
            warn!("could not withdraw this worker's open reserve ({e})");
        }
        slots.drain(cfg.drain_timeout, &stop_now).await;
        // The ends still being reported, a second signal or not, as long as
        // each keeps trying (its own limit: ten leases, at least 5 minutes):
        // the jobs a stop gave back are given back by these reports. A
        // completion or failure one gives up on stays journaled for the next
        // worker on this data directory.
        ctx.reports.close();
        ctx.reports.wait().await;
        ctx.keeper.drain(cfg.drain_timeout, &stop_now).await;
        registry.abort();
        if let Some(pruner) = pruner {
            pruner.abort();
        }
        if let Some(registry) = ctx.queue.worker_registry()
            && let Err(e) = registry.unregister_worker(&cfg.name).await
        {
            warn!("could not unregister the worker: {e}");
        }
        summary.unhealthy = lock(&ctx.health).fault.clone();
        Ok(summary)
    }
}

/// Whether a job that names `after` may run now ([`gpupool_core::after`]).
/// If not, it is given back until its next look, or ends `cancelled`
/// saying why (a job it runs after failed); either way it holds no slot.
async fn free_to_run(ctx: &Ctx, lease: &Lease) -> bool {
    use gpupool_core::after::{Gate, gate};
    let now = gpupool_core::Timestamp::now();
    let verdict = if ctx.queue.capabilities().delays {
        gate(ctx.queue.as_ref(), &lease.job, now).await
    } else {
        Ok(Gate::Cancel("this queue cannot hold a job back, which waiting for other jobs needs".to_owned()))
    };
    let done = match verdict {
        Ok(Gate::Run) => return true,
        Ok(Gate::Wait(pause)) => match ctx.queue.heartbeat(lease, ctx.cfg.lease).await {
            // A cancel asked for while it was leased here ends it now,
            // rather than at its first heartbeat once it runs.
            Ok(Heartbeat::CancelRequested) => {
                let why = "gpupool: cancelled while it waited for the jobs it runs after\n".to_owned();
                ctx.queue.report_cancelled(lease, why).await
            }
            _ => ctx.queue.defer(lease, pause).await,
        },
        Ok(Gate::Cancel(why)) => {
            info!(job_id = %lease.id(), "not run, cancelled: {why}");
            ctx.queue.report_cancelled(lease, format!("gpupool: cancelled before it ran: {why}\n")).await
        }
        Err(e) => {
            warn!(job_id = %lease.id(), "cannot read the jobs it runs after ({e}); looking again later");
            ctx.queue.defer(lease, gpupool_core::after::RECHECK_MAX).await
        }
    };
    if let Err(e) = done {
        warn!(job_id = %lease.id(), "could not give back a job that waits for others ({e}); it returns when its lease ends");
    }
    false
}

/// Gives a leased job back, uncharged, saying `why` in the log.
async fn give_back(ctx: &Ctx, lease: &Lease, why: &str) {
    info!(job_id = %lease.id(), "{why}");
    if let Err(e) = ctx.queue.release(lease).await {
        warn!(job_id = %lease.id(), "could not give the job back ({e}); it returns when its lease ends");
    }
}

/// The worker's run slots: the jobs running here, the GPUs they hold, and
/// the token that stops them all at the drain timeout.
struct Slots {
    gpus: Arc<StdMutex<Placement>>,
    running: Arc<StdMutex<Vec<RunningJob>>>,
    tasks: JoinSet<()>,
    /// Ends being reported (`Ctx::reports`): no more than one a slot wait
    /// beside the runs, so a backend slow to take ends holds reserves back.
    reports: tokio_util::task::TaskTracker,
    stop_all: CancellationToken,
    total: usize,
    total_gpus: u32,
}

impl Slots {
    fn new(ctx: &Ctx) -> Self {
        let cfg = &ctx.cfg;
        let placement = Placement::new(Arc::clone(&ctx.inventory), cfg.slots_per_gpu, cfg.gpu_busy_fraction);
        let total = if placement.is_gpu_host() {
            placement.indices().len() * cfg.slots_per_gpu.max(1)
        } else {
            cfg.slots.max(1)
        };
        Slots {
            total_gpus: placement.total(),
            gpus: Arc::new(StdMutex::new(placement)),
            running: Arc::default(),
            tasks: JoinSet::new(),
            reports: ctx.reports.clone(),
            stop_all: CancellationToken::new(),
            total,
        }
    }

    /// Forgets the runs that have ended.
    fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    fn full(&self) -> bool {
        self.free() == 0
    }

    /// How many slots are free (and ends waiting to be reported leave room).
    fn free(&self) -> usize {
        let running = self.tasks.len();
        self.total.saturating_sub(running).min((2 * self.total).saturating_sub(running + self.reports.len()))
    }

    /// Nothing runs and no end waits to be reported (a run that failed may
    /// be queued again).
    fn idle(&self) -> bool {
        self.tasks.is_empty() && self.reports.is_empty()
    }

    /// Waits until a run ends (or, with none running or full of ends to
    /// report, a moment for the reports) or the worker stops.
    async fn wait_for_one(&mut self, shutdown: &CancellationToken) {
        if self.tasks.len() < self.total {
            sleep_or(shutdown, Duration::from_millis(20)).await;
            return;
        }
        tokio::select! {
            _ = self.tasks.join_next() => {}
            () = shutdown.cancelled() => {}
        }
    }

    /// What this worker asks the queue for now.
    fn request(&self, cfg: &WorkerConfig) -> ReserveRequest {
        let (free, gpu_host) = {
            let g = lock(&self.gpus);
            (g.free(), g.is_gpu_host())
        };
        ReserveRequest {
            queues: cfg.queues.clone(),
            free_gpus: free,
            // First come, first served: a big job is returned (and held
            // here) before smaller ones pushed after it.
            max_gpus: Some(self.total_gpus),
            gpu_host,
            lease: cfg.lease,
            wait: if cfg.burst { Duration::ZERO } else { Duration::from_secs(1) },
            worker: cfg.name.clone(),
        }
    }

    /// Starts the jobs of one reserve, then gives them their head start
    /// ([`head_start`]). Returns how many started.
    async fn start_batch(&mut self, ctx: &Arc<Ctx>, leases: Vec<Lease>, shutdown: &CancellationToken) -> u64 {
        let mut launched = Vec::new();
        let mut batch = leases.into_iter();
        while let Some(lease) = batch.next() {
            if shutdown.is_cancelled() {
                // A reserve that was waiting when the stop came: a stopping
                // worker starts nothing new, so the job goes back, uncharged.
                give_back(ctx, &lease, "stopping: giving back a job reserved as the stop came").await;
            } else if lease.job.spec.after.is_some() && !free_to_run(ctx, &lease).await {
                // A job that runs after others, not yet free to run: given
                // back until its next look (or ended), holding no slot.
            } else if let Some(started) = self.launch(ctx, lease, shutdown, &mut batch).await {
                launched.push(started);
            }
        }
        head_start(&launched, shutdown).await;
        launched.len() as u64
    }

    /// Gives the job its GPUs and starts its run. Returns the token its
    /// start cancels ([`head_start`]); `None` when it did not start.
    ///
    /// When its GPUs are not free it holds the job until they are,
    /// heartbeating it; the jobs leased with it that wait in `rest` go back
    /// first, uncharged, so that none waits here unheartbeated (a batch is
    /// leased to fit the free GPUs, but a GPU's memory in use can change).
    async fn launch(
        &mut self,
        ctx: &Arc<Ctx>,
        lease: Lease,
        shutdown: &CancellationToken,
        rest: &mut std::vec::IntoIter<Lease>,
    ) -> Option<CancellationToken> {
        let (need, taken) = {
            let mut gpus = lock(&self.gpus);
            let need = lease.job.spec.gpus_needed(gpus.is_gpu_host());
            (need, gpus.take(need, gpu_memory_bytes(&lease)))
        };
        let given = match taken {
            Some(given) => given,
            None => {
                for other in rest.by_ref() {
                    give_back(ctx, &other, "giving back a job leased with one that waits for its GPUs").await;
                }
                hold_until_fits(ctx, &lease, need, &self.gpus, &mut self.tasks, shutdown).await?
            }
        };
        let span = info_span!("job", job_id = %lease.id(), attempt = lease.attempt(), worker = %ctx.cfg.name);
        let (ctx2, gpus, stop) = (Arc::clone(ctx), Arc::clone(&self.gpus), self.stop_all.clone());
        let running = Arc::clone(&self.running);
        lock(&self.running).push(RunningJob { id: lease.id().clone(), gpus: given.clone() });
        let launched = CancellationToken::new();
        let launched2 = launched.clone();
        self.tasks.spawn(
            async move {
                let (files, ended) = run_job(&ctx2, &lease, &given, stop, &launched2).await;
                lock(&gpus).give_back(&given);
                lock(&running).retain(|r| &r.id != lease.id());
                // Off the GPUs and the slot, the end journaled: its report,
                // then recording, then uploading, what the run left (the
                // upload runs on).
                let ctx3 = Arc::clone(&ctx2);
                let report = async move {
                    ended.deliver(&ctx3, &lease).await;
                    if let Some(files) = files {
                        let log = log_path(&ctx3.cfg.data_dir, &ctx3.cfg.queue_id, lease.id());
                        ctx3.keeper.keep(lease.id(), files, log).await;
                    }
                };
                ctx2.reports.spawn(report.in_current_span());
            }
            .instrument(span),
        );
        Some(launched)
    }

    /// Waits up to `timeout` (or until `stop_now`) for the running jobs,
    /// then stops and releases what is left.
    async fn drain(mut self, timeout: Duration, stop_now: &CancellationToken) {
        if self.tasks.is_empty() {
            return;
        }
        info!(
            running = self.tasks.len(),
            "stopping: waiting up to {} for running jobs (signal again to stop them now)",
            humantime::format_duration(timeout)
        );
        let tasks = &mut self.tasks;
        let drained = tokio::select! {
            drained = tokio::time::timeout(timeout, async { while tasks.join_next().await.is_some() {} }) => drained.is_ok(),
            () = stop_now.cancelled() => false,
        };
        if !drained {
            info!(running = self.tasks.len(), "stopping and releasing the running jobs");
            self.stop_all.cancel();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// Registers the worker every heartbeat interval, with its GPUs' live
/// status and what it runs (`gpupool status`), and at once when it starts
/// to drain, so that `status` shows it draining.
async fn register_loop(
    ctx: Arc<Ctx>,
    gpus: Arc<StdMutex<Placement>>,
    running: Arc<StdMutex<Vec<RunningJob>>>,
    slots: usize,
    shutdown: CancellationToken,
) {
    let cfg = &ctx.cfg;
    let host = cfg.name.rsplit_once(':').map_or(cfg.name.as_str(), |(h, _)| h).to_owned();
    let started_at = gpupool_core::Timestamp::now();
    loop {
        // NVML queries block briefly; keep them off the async threads.
        let placement = Arc::clone(&gpus);
        let status = tokio::task::spawn_blocking(move || lock(&placement).status()).await.unwrap_or_default();
        let info = WorkerInfo {
            name: cfg.name.clone(),
            host: host.clone(),
            queues: cfg.queues.clone(),
            slots,
            gpus: status,
            running: lock(&running).clone(),
            heartbeat_ms: u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX),
            started_at,
            seen_at: gpupool_core::Timestamp::default(),
            lost: false,
            draining: shutdown.is_cancelled(),
            unhealthy: lock(&ctx.health).fault.clone(),
        };
        if let Some(registry) = ctx.queue.worker_registry()
            && let Err(e) = registry.register_worker(&info).await
        {
            warn!("could not register the worker ({e}); trying again");
        }
        if info.draining {
            tokio::time::sleep(cfg.heartbeat).await;
        } else {
            sleep_or(&shutdown, cfg.heartbeat).await;
        }
    }
}

/// A job's `gpu_memory` (MiB) in bytes.
fn gpu_memory_bytes(lease: &Lease) -> Option<u64> {
    lease.job.spec.gpu_memory.map(|mib| mib.saturating_mul(1 << 20))
}

/// A job that needs more GPUs than are usable right now. If this worker has
/// that many GPUs at all, it holds the job (heartbeating) and reserves
/// nothing else until they are free, so a stream of small jobs cannot
/// starve a big one. Otherwise (only a backend that cannot filter by size
/// returns such a job) it gives the job back for a bigger worker. `None`:
/// the job was given back, cancelled or lost.
async fn hold_until_fits(
    ctx: &Ctx,
    lease: &Lease,
    need: u32,
    gpus: &StdMutex<Placement>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Option<Vec<u32>> {
    let total = lock(gpus).total();
    if need > total {
        warn!(job_id = %lease.id(), need, total, "job needs more GPUs than this worker has; parking it for a bigger one");
        if let Err(e) = ctx.queue.park(lease, need).await {
            warn!(job_id = %lease.id(), "park failed: {e}");
        }
        return None;
    }
    info!(job_id = %lease.id(), need, "holding the job until {need} GPUs are free; reserving nothing else");
    loop {
        let min_free = gpu_memory_bytes(lease);
        if let Some(given) = lock(gpus).take(need, min_free) {
            return Some(given);
        }
        tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = tokio::time::sleep(ctx.cfg.heartbeat) => {}
            () = shutdown.cancelled() => {
                if let Err(e) = ctx.queue.release(lease).await {
                    warn!(job_id = %lease.id(), "release failed: {e}");
                }
                return None;
            }
        }
        match ctx.queue.heartbeat(lease, ctx.cfg.lease).await {
            Ok(Heartbeat::CancelRequested) => {
                if let Err(e) = ctx.queue.report_cancelled(lease, String::new()).await {
                    warn!(job_id = %lease.id(), "could not record the cancel: {e}");
                }
                return None;
            }
            Ok(_) => {}
            Err(Error::LeaseLost { .. }) => return None,
            Err(e) => warn!(job_id = %lease.id(), "heartbeat failed ({e}); trying again"),
        }
    }
}

/// The jobs just launched start first: asking for the next ones (a queue
/// write on some backends) would compete with their checkouts and spawns
/// for the CPU. A slow checkout holds the next request back no longer than
/// [`LAUNCH_HEAD_START`]. The jobs of one batch are launched together, and
/// waited for together.
async fn head_start(launched: &[CancellationToken], shutdown: &CancellationToken) {
    let all = async {
        for token in launched {
            token.cancelled().await;
        }
    };
    tokio::select! {
        () = all => {}
        () = tokio::time::sleep(LAUNCH_HEAD_START) => {}
        () = shutdown.cancelled() => {}
    }
}

async fn sleep_or(token: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = token.cancelled() => {}
    }
}

/// Trailing slashes and `.git` do not make another repository; local paths
/// are compared by their real location.
fn normalize_repo(repo: &str) -> String {
    let trimmed = repo.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);
    if !repo.contains("://")
        && !repo.contains('@')
        && let Ok(real) = std::fs::canonicalize(repo)
    {
        let s = real.to_string_lossy().into_owned();
        return s.strip_suffix(".git").map(str::to_owned).unwrap_or(s);
    }
    trimmed.to_owned()
}

impl Ctx {
    /// The repository a job runs from, if this worker allows it.
    fn repo_for(&self, lease: &Lease) -> std::result::Result<String, String> {
        match &lease.job.spec.repo {
            None => self
                .cfg
                .repo
                .clone()
                .ok_or_else(|| "the job names no repo and this worker has no --repo; give one of them".to_owned()),
            Some(repo) => {
                if self.allowed.contains(&normalize_repo(repo)) {
                    Ok(repo.clone())
                } else {
                    Err(format!(
                        "repository `{}` is not allowed on worker {}; it runs its --repo and allowed_repos only",
                        gpupool_core::redact::redact_url(repo),
                        self.cfg.name
                    ))
                }
            }
        }
    }
}

/// Runs one attempt and journals its end; returns the files it left in its
/// output directory, if any, and the end to report.
async fn run_job(
    ctx: &Ctx,
    lease: &Lease,
    gpus: &[u32],
    stop_all: CancellationToken,
    launched: &CancellationToken,
) -> (Option<crate::uploads::RunFiles>, Ended) {
    let stopper = Stopper::new();
    let hb = tokio::spawn(heartbeat_loop(
        Arc::clone(&ctx.queue),
        lease.clone(),
        ctx.cfg.heartbeat,
        ctx.cfg.lease,
        stopper.clone(),
    ));
    let shutdown_watch = {
        let s = stopper.clone();
        tokio::spawn(async move {
            stop_all.cancelled().await;
            s.stop(StopReason::Shutdown);
        })
    };
    info!(gpus = ?gpus, "running {} at {}", lease.job.spec.entrypoint, lease.job.spec.git_ref);
    let mut files = None;
    let report = execute(ctx, lease, gpus, &stopper, launched, &mut files).await;
    if matches!(report, Report::Release | Report::WorkerFault(_)) {
        // Given back uncharged: the next run has the same attempt number,
        // and its files are the attempt's. These stay in their output
        // folder on this host (the job's log says where), unrecorded.
        files = None;
    }
    launched.cancel();
    shutdown_watch.abort();
    // Before the slot is free: a worker fault pauses the next reserve, and
    // the end is on disk should this worker die before reporting it.
    note_health(ctx, &report);
    let entry = journal(ctx, lease, &report).await;
    (files, Ended { report, entry, heartbeat: hb })
}

/// A run's end, journaled, to report; its lease is heartbeated until then.
struct Ended {
    report: Report,
    entry: Option<PathBuf>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Ended {
    async fn deliver(self, ctx: &Ctx, lease: &Lease) {
        deliver(ctx, lease, self.report, self.entry).await;
        self.heartbeat.abort();
    }
}

/// Removes outputs unchanged for `max_age`, now and then hourly.
async fn prune_loop(data_dir: PathBuf, max_age: Duration) {
    loop {
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || crate::outputs::prune(&dir, max_age)).await {
            Ok(0) => {}
            Ok(n) => info!("removed {n} output folder(s) unchanged for {}", humantime::format_duration(max_age)),
            Err(e) => warn!("pruning old outputs failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Heartbeats every `every`; after a failed one, again within a second, so
/// that a backend outage shorter than the lease never costs the lease.
async fn heartbeat_loop(queue: Arc<dyn Queue>, lease: Lease, every: Duration, extend: Duration, stopper: Stopper) {
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        match queue.heartbeat(&lease, extend).await {
            Ok(Heartbeat::CancelRequested) => stopper.stop(StopReason::Cancel),
            Ok(_) => {}
            Err(Error::LeaseLost { .. }) => {
                warn!("lease lost; stopping the job");
                stopper.stop(StopReason::LeaseLost);
                return;
            }
            Err(e) => {
                wait = every.min(HEARTBEAT_RETRY);
                warn!("heartbeat failed ({e}); trying again in {}", humantime::format_duration(wait));
            }
        }
    }
}

/// How soon a failed heartbeat is tried again.
const HEARTBEAT_RETRY: Duration = Duration::from_secs(1);

/// What a stop asked for before the process ran.
fn stopped_report(reason: StopReason) -> Report {
    match reason {
        StopReason::Cancel => Report::Cancelled(String::new()),
        StopReason::Shutdown => Report::Release,
        _ => Report::Nothing,
    }
}

/// Checks, prepares and runs one attempt; what it comes to, and (in
/// `files`) what it left in its output directory.
/// The bytes of the job's snapshot of uncommitted code, read from the
/// queue and checked against their hash; `None` for a job without one.
async fn fetch_snapshot(ctx: &Ctx, spec: &gpupool_core::JobSpec) -> std::result::Result<Option<Vec<u8>>, Report> {
    let Some(snap) = &spec.snapshot else { return Ok(None) };
    let fail = |message: String| Err(Report::Fail(Failure::new(FailureKind::Ref, message)));
    if !ctx.workspace.applies_snapshots() {
        return fail("this worker's workspace cannot apply a snapshot of uncommitted code".to_owned());
    }
    let Some(blobs) = ctx.queue.blobs() else {
        return fail("this queue stores no snapshots of uncommitted code".to_owned());
    };
    match blobs.get_blob(&snap.hash).await {
        Ok(Some(bytes)) if crate::snapshot::hash(&bytes) == snap.hash => Ok(Some(bytes)),
        Ok(Some(_)) => fail(format!("snapshot {} in the queue does not match its hash; push it again", snap.hash)),
        Ok(None) => fail(format!(
            "snapshot {} is not in the queue (it was never stored, or it expired); push it again",
            snap.hash
        )),
        Err(e) => Err(Report::WorkerFault(format!("cannot read snapshot {} from the queue ({e})", snap.hash))),
    }
}

async fn execute(
    ctx: &Ctx,
    lease: &Lease,
    gpus: &[u32],
    stopper: &Stopper,
    launched: &CancellationToken,
    files: &mut Option<crate::uploads::RunFiles>,
) -> Report {
    let spec = &lease.job.spec;
    // Checked again as it is about to run: whoever can write to the backend
    // must not get past the checks of push (an `LD_PRELOAD` written straight
    // into the database runs nowhere).
    if !plain_id(lease.id().as_str()) {
        let message =
            format!("job id `{}` is not a plain id (letters, digits, - and _); it would name files", lease.id());
        return Report::Fail(Failure::new(FailureKind::Invalid, message));
    }
    if let Some(why) = gpupool_core::rows::unfit(spec) {
        return Report::Fail(Failure::new(FailureKind::Invalid, why));
    }
    let repo = match ctx.repo_for(lease) {
        Ok(r) => r,
        Err(message) => return Report::Fail(Failure::new(FailureKind::Repo, message)),
    };
    let snapshot = match fetch_snapshot(ctx, spec).await {
        Ok(s) => s,
        Err(report) => return report,
    };
    let label = format!("job-{}-{}", lease.id(), lease.attempt());
    let lease_attempt = lease.attempt();
    let job = PrepareRequest {
        repo: &repo,
        git_ref: &spec.git_ref,
        entrypoint: &spec.entrypoint,
        label: &label,
        snapshot: snapshot.as_deref(),
    };
    // A cancel or a stop reaches a job still being checked out: the
    // workspace's future is dropped, which abandons the checkout.
    let prepared = tokio::select! {
        prepared = ctx.workspace.prepare(&job) => prepared,
        reason = stopper.stopped() => return stopped_report(reason),
    };
    let checkout = match prepared {
        Ok(c) => c,
        Err(e) if e.kind == FailureKind::Worker => return Report::WorkerFault(e.message),
        Err(e) => return Report::Fail(Failure::new(e.kind, e.message)),
    };
    let job_dir = crate::outputs::job_outputs(&ctx.cfg.data_dir, &ctx.cfg.queue_id, lease.id());
    let made = tokio::task::spawn_blocking(move || crate::outputs::make(&job_dir, lease_attempt))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let out = match made {
        Ok(dir) => dir,
        Err(e) => {
            ctx.workspace.remove(&checkout).await;
            return Report::WorkerFault(format!("cannot make the run's output directory ({e})"));
        }
    };
    let attempt = Attempt { ctx, lease, gpus, stopper, launched, repo: &repo, checkout: &checkout, out: &out };
    let mut report = attempt.run().await;
    let (moved_all, kept) = keep_outputs(ctx, lease, &checkout, &out, &mut report).await;
    if moved_all {
        ctx.workspace.remove(&checkout).await;
    }
    if !kept.is_empty() {
        *files = Some(crate::uploads::RunFiles { dir: out, attempt: lease_attempt, files: kept });
    }
    report
}

/// Moves what the run created or changed in its checkout into its output
/// directory, and says in the job's log what was kept where (shipped, or
/// added to the output a completion carries). Returns whether everything
/// was moved (if not, the checkout stays) and the files now in the output
/// directory.
async fn keep_outputs(
    ctx: &Ctx,
    lease: &Lease,
    checkout: &Checkout,
    out: &std::path::Path,
    report: &mut Report,
) -> (bool, Vec<gpupool_core::ArtifactFile>) {
    let log = log_path(&ctx.cfg.data_dir, &ctx.cfg.queue_id, lease.id());
    let changed = match ctx.workspace.changed(checkout).await {
        Ok(c) => c,
        Err(e) => {
            let why =
                format!("cannot tell what the run changed in {} ({e}); the checkout is kept", checkout.dir.display());
            warn!("{why}");
            note(&log, &why).await;
            return (false, Vec::new());
        }
    };
    let (dir, out_dir) = (checkout.dir.clone(), out.to_path_buf());
    let kept = match tokio::task::spawn_blocking(move || crate::outputs::keep(&dir, &changed, &out_dir)).await {
        Ok(k) => k,
        Err(e) => {
            warn!("keeping the run's outputs failed ({e}); the checkout {} is kept", checkout.dir.display());
            return (false, Vec::new());
        }
    };
    // Said in the local log, and shipped (the lease still holds: the end
    // is reported after this), so `gpupool logs` on any host ends with it.
    let mut said = Vec::new();
    for problem in &kept.problems {
        warn!("{problem}");
        note(&log, problem).await;
        said.push(problem.clone());
    }
    if kept.files.is_empty() {
        crate::outputs::remove_if_empty(out);
    } else {
        let total: u64 = kept.files.iter().map(|f| f.size).sum();
        let line = format!(
            "kept {} file(s), {}, in {}",
            kept.files.len(),
            gpupool_core::artifacts::human_size(total),
            out.display()
        );
        info!("{line}");
        note(&log, &line).await;
        said.push(line);
    }
    if !kept.moved_all {
        let line = format!("the checkout {} is kept: not everything in it could be moved", checkout.dir.display());
        note(&log, &line).await;
        said.push(line);
    }
    if let Some(logs) = ctx.queue.run_logs()
        && !said.is_empty()
    {
        let text: String = said.iter().map(|l| format!("== gpupool: {l}\n")).collect();
        match report {
            // After the output the completion carries.
            Report::Complete(done) if ctx.queue.completes_with_run() => done.log.push_str(&text),
            _ => {
                if let Err(e) = logs.ship(lease, &gpupool_core::Progress { log: text, result: None }).await {
                    tracing::debug!("shipping what was kept failed ({e})");
                }
            }
        }
    }
    (kept.moved_all, kept.files)
}

/// One attempt of a job on this worker, once its code is checked out: what
/// every step of running it needs.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    ctx: &'a Ctx,
    lease: &'a Lease,
    gpus: &'a [u32],
    stopper: &'a Stopper,
    launched: &'a CancellationToken,
    repo: &'a str,
    checkout: &'a Checkout,
    /// The run's output directory (`GPUPOOL_OUTPUT_DIR`).
    out: &'a std::path::Path,
}

impl Attempt<'_> {
    /// Runs the attempt in its checkout and records its start.
    async fn run(self) -> Report {
        let Attempt { ctx, lease, gpus, stopper, launched, checkout, .. } = self;
        // The commit and GPUs are recorded once the process (or the setup
        // step) has started, not before: a round trip to the queue (a ledger
        // write on RabbitMQ) is not worth delaying a run for, nor competing with
        // its start for the CPU. A lost lease stops the run as a heartbeat
        // would; the outcome is reported only after the record is in, so the
        // completion never overtakes it.
        //
        // Where the queue records a completion's facts with its end
        // (`completes_with_run`), a run that ends within
        // [`RECORD_START_AFTER`] of its start has them recorded with its
        // end, in the same commit.
        let ended = CancellationToken::new();
        let recorder = {
            let info = RunInfo { commit: Some(checkout.commit.clone()), gpu_ids: gpus.to_vec() };
            let (queue, lease, stopper) = (Arc::clone(&ctx.queue), lease.clone(), stopper.clone());
            let (launched, ended) = (launched.clone(), ended.clone());
            tokio::spawn(async move {
                launched.cancelled().await;
                if queue.completes_with_run() {
                    tokio::select! {
                        () = tokio::time::sleep(RECORD_START_AFTER) => {}
                        () = ended.cancelled() => return Some(info),
                    }
                }
                match queue.started(&lease, &info).await {
                    Err(Error::LeaseLost { .. }) => stopper.stop(StopReason::LeaseLost),
                    Err(e) => warn!("could not record the commit ({e})"),
                    Ok(()) => {}
                }
                None
            })
        };
        let mut report = self.run_recorded().await;
        launched.cancel();
        ended.cancel();
        if let Ok(Some(info)) = recorder.await {
            match &mut report {
                Report::Complete(done) => done.run = Some(info),
                _ => {
                    if let Err(e) = ctx.queue.started(lease, &info).await {
                        tracing::debug!("could not record the commit ({e})");
                    }
                }
            }
        }
        report
    }

    /// [`Attempt::run`] once the `started` record is on its way: the setup
    /// step, then the entrypoint, and what their end comes to.
    async fn run_recorded(self) -> Report {
        let Attempt { ctx, lease, gpus, stopper, launched, checkout, .. } = self;
        let spec = &lease.job.spec;
        if let Some(reason) = stopper.reason() {
            return stopped_report(reason);
        }
        let log_path = log_path(&ctx.cfg.data_dir, &ctx.cfg.queue_id, lease.id());
        let header = self.log_header();
        let argv = build_argv(&ctx.cfg.command, &spec.entrypoint, &spec.args, u32::try_from(gpus.len()).unwrap_or(0));
        let run_line = format!("run: {}", shell_words::join(&argv));
        // Without a setup step the run line follows the header at once: one
        // write, one trip to the blocking pool less before the launch.
        match ctx.cfg.setup {
            None => notes(&log_path, &[&header, &run_line]).await,
            Some(_) => note(&log_path, &header).await,
        }
        let (env, env_remove) = (self.job_env(), worker_secrets_env());
        let live = crate::live::Live::start(Some(crate::live::Shipping {
            queue: Arc::clone(&ctx.queue),
            lease: lease.clone(),
            secrets: ctx.workspace.secrets(),
        }));
        live.note(&header);
        let run_spec = |argv: Vec<String>, env: &Vec<(String, String)>| RunSpec {
            argv,
            cwd: checkout.dir.clone(),
            env: env.clone(),
            env_remove: env_remove.clone(),
            log_path: log_path.clone(),
            timeout: spec.timeout,
            grace: ctx.cfg.grace,
            tail_bytes: ctx.cfg.tail_bytes,
            secrets: ctx.workspace.secrets(),
            output: live.sink(),
        };

        // The setup step installs into the worker's environment, which every
        // later job uses: it gets none of the job's own env.
        let setup_env = self.run_env();
        if let Some(setup) = &ctx.cfg.setup
            && let Some(report) = self.run_setup(setup, &run_spec(setup.clone(), &setup_env)).await
        {
            return self.with_result(report, live, &log_path).await;
        }
        if ctx.cfg.setup.is_some() {
            note(&log_path, &run_line).await;
        }
        live.note(&run_line);
        let report = match ctx.runner.run(&run_spec(argv, &env), stopper, launched).await {
            Ok(result) => report_for(spec, result.outcome, result.tail),
            // The worker's command could not start: its fault, not the job's.
            Err(message) => Report::WorkerFault(message),
        };
        self.with_result(report, live, &log_path).await
    }

    /// `report` with the result the run reported (its `GPUPOOL_RESULT`
    /// lines, then its `GPUPOOL_RESULT_FILE`), and what did not read noted
    /// in the job's log. A bad result never fails the run.
    async fn with_result(self, mut report: Report, live: crate::live::Live, log: &std::path::Path) -> Report {
        // A completion carries the output not yet shipped where the queue
        // records it with the end: one commit, not two.
        let hold = matches!(report, Report::Complete(_)) && self.ctx.queue.completes_with_run();
        let (mut collected, rest) = live.finish(hold).await;
        let file = crate::outputs::result_file(self.out);
        match tokio::fs::read_to_string(&file).await {
            Ok(text) => collected.merge(&text, "GPUPOOL_RESULT_FILE"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                collected.notes.push(format!("GPUPOOL_RESULT_FILE ignored: cannot read {} ({e})", file.display()))
            }
        }
        for line in &collected.notes {
            note(log, line).await;
        }
        if let Report::Complete(done) = &mut report {
            done.result = collected.result();
            done.log = rest;
        }
        report
    }

    /// The first line of an attempt in the job's log.
    fn log_header(self) -> String {
        let Attempt { ctx, lease, gpus, repo, checkout, .. } = self;
        let snapshot = lease.job.spec.snapshot.as_ref().map_or_else(String::new, |s| format!(" + snapshot {}", s.hash));
        format!(
            "job {} attempt {} on {}: {} at {} ({}{snapshot}), GPUs [{}]",
            lease.id(),
            lease.attempt(),
            ctx.cfg.name,
            gpupool_core::redact::redact_url(repo),
            lease.job.spec.git_ref,
            checkout.commit,
            gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        )
    }

    /// The job's own `env` with what every run gets on top (INTERFACE.md).
    fn job_env(self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            self.lease.job.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(self.run_env());
        env
    }

    /// What every run gets from the worker: its GPUs, the job's id and
    /// attempt, its queue and commit.
    fn run_env(self) -> Vec<(String, String)> {
        let Attempt { lease, gpus, checkout, out, .. } = self;
        let spec = &lease.job.spec;
        let visible = gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut env = Vec::new();
        env.extend([
            ("CUDA_VISIBLE_DEVICES".to_owned(), visible),
            ("CUDA_DEVICE_ORDER".to_owned(), "PCI_BUS_ID".to_owned()),
            ("GPUPOOL_JOB_ID".to_owned(), lease.id().to_string()),
            ("GPUPOOL_ATTEMPT".to_owned(), lease.attempt().to_string()),
            ("GPUPOOL_QUEUE".to_owned(), spec.queue.clone()),
            ("GPUPOOL_COMMIT".to_owned(), checkout.commit.clone()),
            ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
            ("GPUPOOL_OUTPUT_DIR".to_owned(), out.display().to_string()),
            ("GPUPOOL_RESULT_FILE".to_owned(), crate::outputs::result_file(out).display().to_string()),
        ]);
        env
    }

    /// The setup step, skipped while its inputs hash as at its last success on
    /// this worker for this repository. `None` means go on.
    async fn run_setup(self, setup: &[String], spec: &RunSpec) -> Option<Report> {
        let Attempt { ctx, stopper, launched, repo, checkout, .. } = self;
        // One setup at a time: two jobs installing into one environment race,
        // in this process and in every other worker on the data directory.
        let _guard = ctx.setup_lock.lock().await;
        let _flock = match FileLock::acquire_async(ctx.cfg.data_dir.join("setup-cache").join("setup.lock")).await {
            Ok(lock) => lock,
            Err(e) => {
                let message = format!("cannot lock the setup cache in {} ({e})", ctx.cfg.data_dir.display());
                return Some(Report::WorkerFault(message));
            }
        };
        let key = setup_key(setup, &ctx.cfg.setup_inputs, checkout);
        let stamp = ctx.cfg.data_dir.join("setup-cache").join(format!("{}.ok", mirror_name(repo)));
        let shown = shell_words::join(setup);
        if tokio::fs::read_to_string(&stamp).await.is_ok_and(|k| k == key) {
            let present: Vec<&str> =
                ctx.cfg.setup_inputs.iter().filter(|i| checkout.dir.join(i).exists()).map(String::as_str).collect();
            let why = if present.is_empty() {
                format!("`{shown}` is unchanged and none of its inputs ({}) exists", ctx.cfg.setup_inputs.join(", "))
            } else {
                format!("`{shown}` and {} are unchanged", present.join(", "))
            };
            info!("setup skipped: {why} since its last success");
            note(&spec.log_path, &format!("setup skipped: {why} since its last success")).await;
            return None;
        }
        note(&spec.log_path, &format!("setup: {shown}")).await;
        match ctx.runner.run(spec, stopper, launched).await {
            Err(message) => Some(Report::WorkerFault(format!("setup step `{shown}`: {message}"))),
            Ok(r) => match r.outcome {
                Outcome::Exited(0) => {
                    if let Some(dir) = stamp.parent() {
                        let _ = tokio::fs::create_dir_all(dir).await;
                    }
                    if let Err(e) = tokio::fs::write(&stamp, key).await {
                        warn!("cannot record the setup step's success: {e}");
                    }
                    None
                }
                Outcome::Stopped(reason) => Some(stopped_report(reason)),
                other => Some(Report::Fail(Failure {
                    kind: FailureKind::Setup,
                    exit_code: if let Outcome::Exited(c) = other { Some(c) } else { None },
                    signal: if let Outcome::Signaled(s) = other { Some(s) } else { None },
                    message: format!("the setup step `{shown}` {other}; the job did not start"),
                    output_tail: r.tail,
                })),
            },
        }
    }
}

/// The worker's own `GPUPOOL_*` settings (queue URLs with passwords, git
/// tokens), which never reach a job.
fn worker_secrets_env() -> Vec<String> {
    std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).filter(|k| k.starts_with("GPUPOOL_")).collect()
}

/// What a run's end comes to.
fn report_for(spec: &gpupool_core::JobSpec, outcome: Outcome, tail: String) -> Report {
    let failure = |kind, exit_code, signal, message: String| {
        Report::Fail(Failure { kind, exit_code, signal, message, output_tail: tail.clone() })
    };
    match outcome {
        Outcome::Exited(0) => Report::Complete(Box::new(Completion { output_tail: tail, ..Completion::default() })),
        Outcome::Exited(code) => {
            let kind = if looks_like_oom(&tail) { FailureKind::Oom } else { FailureKind::Exit };
            let what = if kind == FailureKind::Oom { "ran out of GPU memory and exited" } else { "exited" };
            failure(kind, Some(code), None, format!("{} {what} with code {code}", spec.entrypoint))
        }
        Outcome::Signaled(sig) => {
            failure(FailureKind::Signal, None, Some(sig), format!("{} was killed by signal {sig}", spec.entrypoint))
        }
        Outcome::TimedOut => failure(
            FailureKind::Timeout,
            None,
            None,
            format!(
                "{} ran past its timeout of {}",
                spec.entrypoint,
                spec.timeout.map(|t| humantime::format_duration(t).to_string()).unwrap_or_default()
            ),
        ),
        Outcome::Stopped(StopReason::Cancel) => Report::Cancelled(tail),
        Outcome::Stopped(StopReason::Shutdown) => Report::Release,
        Outcome::Stopped(_) => Report::Nothing,
        other => failure(FailureKind::Exit, None, None, format!("{} {other}", spec.entrypoint)),
    }
}

fn looks_like_oom(tail: &str) -> bool {
    tail.contains("CUDA out of memory")
        || tail.contains("OutOfMemoryError")
        || tail.contains("CUDA_ERROR_OUT_OF_MEMORY")
}

/// Appends a `== gpupool: …` line to a job's log.
pub(crate) async fn note(log: &std::path::Path, text: &str) {
    notes(log, &[text]).await;
}

/// Appends `== gpupool: …` lines to a job's log, in one write.
async fn notes(log: &std::path::Path, texts: &[&str]) {
    // One blocking task for the folder, the open and the write (tokio::fs
    // would hand each to the blocking pool in turn).
    let line: String = texts.iter().map(|t| format!("== gpupool: {t}\n")).collect();
    let path = log.to_path_buf();
    let written = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new().create(true).append(true).open(&path)?.write_all(line.as_bytes())
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("cannot write the job log {}: {e}", log.display()),
        Err(e) => warn!("cannot write the job log {}: {e}", log.display()),
    }
}

fn setup_key(setup: &[String], inputs: &[String], checkout: &Checkout) -> String {
    let mut text = setup.join("\0");
    for input in inputs {
        let content = std::fs::read(checkout.dir.join(input)).ok();
        let hash = content
            .and_then(|c| git2::Oid::hash_object(git2::ObjectType::Blob, &c).ok())
            .map_or_else(|| "missing".to_owned(), |o| o.to_string());
        text.push_str(&format!("\n{input}\0{hash}"));
    }
    git2::Oid::hash_object(git2::ObjectType::Blob, text.as_bytes()).map(|o| o.to_string()).unwrap_or(text)
}

/// Sends one report about `lease`; what it did, in words.
async fn report_once(q: &dyn Queue, lease: &Lease, report: &Report) -> Result<String> {
    match report {
        Report::Complete(c) => q.complete(lease, (**c).clone()).await.map(|()| "succeeded".to_owned()),
        Report::Fail(f) => q.fail(lease, f.clone()).await.map(|o| format!("failed ({}): {}; {o}", f.kind, f.message)),
        Report::Cancelled(tail) => q.report_cancelled(lease, tail.clone()).await.map(|()| "cancelled".to_owned()),
        Report::Release => q.release(lease).await.map(|()| "released".to_owned()),
        Report::WorkerFault(why) => {
            q.release(lease).await.map(|()| format!("given back uncharged: this worker cannot run jobs now ({why})"))
        }
        Report::Nothing => Ok("left as it is".to_owned()),
    }
}

/// Notes what a run's end says of this worker's environment: a worker fault
/// pauses it (for twice as long as last time, up to 5 minutes); a run that
/// got as far as the job's own code clears it.
fn note_health(ctx: &Ctx, report: &Report) {
    let mut health = lock(&ctx.health);
    match report {
        Report::WorkerFault(why) => {
            health.backoff = (health.backoff * 2).clamp(Duration::from_secs(1), MAX_FAULT_BACKOFF);
            health.paused_until = Some(tokio::time::Instant::now() + health.backoff);
            health.fault = Some(why.clone());
            warn!(
                "unhealthy: {why}; the job goes back uncharged and this worker takes no job for {}",
                humantime::format_duration(health.backoff)
            );
        }
        Report::Complete(_) | Report::Fail(_) | Report::Cancelled(_) => {
            if health.fault.take().is_some() {
                info!("healthy again: a run went through");
            }
            health.backoff = Duration::ZERO;
            health.paused_until = None;
        }
        Report::Release | Report::Nothing => {}
    }
}

/// Writes a run's end to the journal before it is reported (see
/// [`crate::journal`]). `None` for a report that records no result, or when
/// the journal cannot be written (said in the log; the report goes on).
async fn journal(ctx: &Ctx, lease: &Lease, report: &Report) -> Option<PathBuf> {
    let stored = match report {
        Report::Complete(c) => Stored::complete(c),
        Report::Fail(f) => Stored::fail(f),
        Report::Cancelled(tail) => Stored::Cancelled { output_tail: tail.clone() },
        Report::Release | Report::WorkerFault(_) | Report::Nothing => return None,
    };
    let entry = Entry {
        queue: ctx.cfg.queue_id.clone(),
        job: lease.id().to_string(),
        attempt: lease.attempt(),
        token: lease.token.clone(),
        expires_at: lease.expires_at.0,
        report: stored,
    };
    let data_dir = ctx.cfg.data_dir.clone();
    let written = tokio::task::spawn_blocking(move || {
        let instance = Instance::claim(&data_dir)?;
        crate::journal::write(&instance.journal(), &entry)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    match written {
        Ok(path) => Some(path),
        Err(e) => {
            warn!("cannot journal the result before reporting it ({e}); a crash now would lose it");
            None
        }
    }
}

/// Reports a run's end, retrying while the backend is unavailable: the
/// result is recorded once it is back, if the lease still holds. The caller
/// journaled it (`entry`), and the entry is removed once the queue has
/// answered for good; one still unanswered when this worker gives up is
/// delivered by the next worker on the data directory.
async fn deliver(ctx: &Ctx, lease: &Lease, report: Report, entry: Option<PathBuf>) {
    if matches!(report, Report::Nothing) {
        return;
    }
    if let (Some(_), Ok(flag)) = (&entry, std::env::var("GPUPOOL_TEST_HOLD_REPORT")) {
        // Test hook: a worker killed after its run ended and before the
        // queue heard of it (the journal has the result).
        let _ = std::fs::write(flag, lease.id().to_string());
        std::future::pending::<()>().await;
    }
    let give_up = tokio::time::Instant::now() + (ctx.cfg.lease * 10).max(Duration::from_secs(300));
    let mut backoff = Duration::from_millis(200);
    let answered = loop {
        match report_once(ctx.queue.as_ref(), lease, &report).await {
            Ok(what) => {
                info!("job {what}");
                break true;
            }
            Err(Error::LeaseLost { .. }) => {
                warn!("lease lost before the result was recorded; another worker owns the job now");
                break true;
            }
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < give_up => {
                warn!("cannot record the result yet ({e}); retrying in {}", humantime::format_duration(backoff));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) if e.is_retryable() => {
                warn!("cannot record the result ({e}); it stays in the journal for the next worker on this host");
                break false;
            }
            Err(e) => {
                warn!("cannot record the result: {e}");
                break true;
            }
        }
    };
    if let (true, Some(path)) = (answered, entry) {
        let _ = tokio::fs::remove_file(path).await;
    }
}

/// At start: what workers on this data directory left behind when they
/// died. Their checkouts are removed, and the results their journals hold
/// for this worker's queue are delivered, within the lease rules.
async fn recover(ctx: &Ctx) {
    let data_dir = ctx.cfg.data_dir.clone();
    let Ok(dead) = tokio::task::spawn_blocking(move || crate::host::dead_instances(&data_dir)).await else { return };
    for instance in dead {
        let checkouts = instance.checkouts();
        if tokio::fs::try_exists(&checkouts).await.unwrap_or(false) {
            match tokio::fs::remove_dir_all(&checkouts).await {
                Ok(()) => info!("removed the checkouts of worker {}, which is gone", instance.id),
                Err(e) => warn!("cannot remove {} ({e})", checkouts.display()),
            }
        }
        let journal = instance.journal();
        let entries = tokio::task::spawn_blocking(move || {
            crate::journal::read_all(&journal, |path, e| warn!("journal entry {} does not read ({e})", path.display()))
        })
        .await
        .unwrap_or_default();
        for (path, entry) in entries.into_iter().filter(|(_, e)| e.queue == ctx.cfg.queue_id) {
            if deliver_journaled(ctx, &instance.id, entry).await {
                let _ = tokio::fs::remove_file(path).await;
            }
        }
        let _ = tokio::task::spawn_blocking(move || instance.forget_if_done()).await;
    }
}

/// Delivers one journaled result of a worker that is gone. `true` once the
/// queue has answered for good (taken or refused it).
async fn deliver_journaled(ctx: &Ctx, from: &str, entry: Entry) -> bool {
    let id = gpupool_core::JobId::new(entry.job.clone());
    let job = match ctx.queue.get(&id).await {
        Ok(job) => job,
        Err(Error::NotFound { .. }) => {
            warn!(job_id = %id, "dropped a journaled result: the job is not in the queue");
            return true;
        }
        Err(e) => {
            warn!(job_id = %id, "cannot deliver a journaled result yet ({e})");
            return !e.is_retryable();
        }
    };
    let lease = Lease { job, token: entry.token, expires_at: gpupool_core::Timestamp(entry.expires_at) };
    let report = match entry.report {
        Stored::Complete { output_tail, result, log, run } => {
            let run = run.map(|(commit, gpu_ids)| RunInfo { commit, gpu_ids });
            Report::Complete(Box::new(Completion { output_tail, result, log, run }))
        }
        Stored::Fail { kind, exit_code, signal, message, output_tail } => {
            Report::Fail(Failure { kind, exit_code, signal, message, output_tail })
        }
        Stored::Cancelled { output_tail } => Report::Cancelled(output_tail),
    };
    match report_once(ctx.queue.as_ref(), &lease, &report).await {
        Ok(what) => {
            info!(job_id = %id, attempt = entry.attempt, "job {what}: delivered the result that worker {from} journaled before it stopped");
            true
        }
        Err(Error::LeaseLost { .. }) => {
            info!(job_id = %id, attempt = entry.attempt, "dropped the result that worker {from} journaled: another worker took the job over");
            true
        }
        Err(e) => {
            warn!(job_id = %id, "cannot deliver the result that worker {from} journaled ({e})");
            !e.is_retryable()
        }
    }
}
