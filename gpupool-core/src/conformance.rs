//! The conformance suite every [`Queue`] backend runs (feature
//! `conformance`). Not semver-stable: functions may be added in any release.
//!
//! Each function is one test: it takes the queue under test, uses its own
//! random queue name (see [`unique_queue`]), and panics on a violation, so a
//! backend's `tests/conformance.rs` calls each one from a `#[tokio::test]`
//! and the tests run in parallel. Capability-dependent checks read
//! [`Queue::capabilities`] and check only what is declared.
//!
//! Tests that wait for a lease to expire use leases of [`SHORT_LEASE`].

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    CancelOutcome, Completion, Error, FailOutcome, Failure, FailureKind, Heartbeat, JobId, JobSpec, JobState, Lease,
    ListFilter, Queue, ReserveRequest, RunInfo, Timestamp,
};

/// The lease used by the expiry tests.
pub const SHORT_LEASE: Duration = Duration::from_millis(1000);

/// The URL of a test service: the environment variable `var`, else what
/// `fallback` gives (a container), else `None` after printing one
/// `skipped: …` line. Under `GPUPOOL_REQUIRE_BACKENDS=1` (CI) a skip is a
/// failure.
pub fn service_url(var: &str, what: &str, fallback: impl FnOnce() -> Option<String>) -> Option<String> {
    if let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()).or_else(fallback) {
        return Some(url);
    }
    let why = format!("{var} is not set and no container was started (feature `testcontainers`, Docker)");
    assert!(std::env::var("GPUPOOL_REQUIRE_BACKENDS").as_deref() != Ok("1"), "GPUPOOL_REQUIRE_BACKENDS=1 but {why}");
    // Straight to stderr: the test harness captures print!.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {what}: {why}");
    None
}

/// A service for a test binary, started once (feature `testcontainers` of a
/// backend): `start` runs on a thread of its own that keeps what it returns
/// (the container) alive until the binary exits, and gives the service's
/// URL. `None`, after one line on stderr naming `what`, when it fails.
pub fn started_once<K, E: std::fmt::Display>(
    cell: &'static std::sync::OnceLock<Option<String>>,
    what: &'static str,
    start: impl FnOnce() -> Result<(K, Option<String>), E> + Send + 'static,
) -> Option<String> {
    cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || match start() {
            Ok((_keep, url)) => {
                let _ = tx.send(url);
                // `_keep` (the container) lives as long as the test binary.
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "testcontainers: no {what} container ({e})");
                let _ = tx.send(None);
            }
        });
        rx.recv().ok().flatten()
    })
    .clone()
}

/// What [`drain_exactly_once`] saw.
#[derive(Debug)]
pub struct Drained {
    /// How long pushing the jobs took.
    pub push_time: Duration,
    /// How long the workers took to drain them.
    pub drain_time: Duration,
    /// How many jobs each worker ran.
    pub per_worker: Vec<usize>,
}

/// A contention test for a backend's `tests/contention.rs`: `setup` pushes
/// `jobs` no-op jobs to queue `default`, then `workers` clients, each from
/// `connect` (its own connections, as separate hosts have), reserve and
/// complete until the queue is empty. Panics unless every job ran exactly
/// once and `setup` lists every one as succeeded on its first attempt; the
/// caller checks what its backend leaves behind.
pub async fn drain_exactly_once<Q, F, Fut>(setup: &dyn Queue, connect: F, jobs: usize, workers: usize) -> Drained
where
    Q: Queue + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Q> + Send + 'static,
{
    let pushing = std::time::Instant::now();
    for i in 0..jobs {
        setup.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
    }
    let push_time = pushing.elapsed();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = connect();
        tasks.push(tokio::spawn(async move {
            let q = client.await;
            let req = ReserveRequest::new("default").worker(format!("worker-{w}")).lease(Duration::from_secs(60));
            let mut runs = Vec::new();
            while let Some(lease) = q.reserve(&req).await.unwrap() {
                q.complete(&lease, Completion::default()).await.unwrap();
                runs.push(lease.id().to_string());
            }
            runs
        }));
    }
    let mut by_job: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
    let mut per_worker = Vec::new();
    for (w, task) in tasks.into_iter().enumerate() {
        let runs = task.await.unwrap();
        per_worker.push(runs.len());
        for id in runs {
            by_job.entry(id).or_default().push(w);
        }
    }
    let drain_time = started.elapsed();
    // The record of executions: each job once, so never two holders.
    let twice: Vec<_> = by_job.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(by_job.len(), jobs, "every job ran");
    // One more than pushed, so an extra job would show.
    let limit = u32::try_from(jobs).unwrap_or(u32::MAX).saturating_add(1);
    let all = setup.list(&ListFilter { limit, ..ListFilter::default() }).await.unwrap();
    assert_eq!(all.len(), jobs);
    assert!(all.iter().all(|r| r.state == JobState::Succeeded && r.attempt == 1), "all succeeded on attempt 1");
    Drained { push_time, drain_time, per_worker }
}

/// Lower-case hex that no other test, in this run or another, gets: the
/// process id, the clock and a counter. For table, key and queue prefixes.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}{:06x}{:x}", std::process::id(), nanos & 0xff_ffff, N.fetch_add(1, Ordering::Relaxed))
}

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn job(queue: &str) -> JobSpec {
    JobSpec::new("main", "train.py").with_queue(queue)
}

fn req(queue: &str) -> ReserveRequest {
    ReserveRequest::new(queue).worker("conformance:1")
}

async fn reserve_one(q: &dyn Queue, queue: &str) -> Lease {
    q.reserve(&req(queue)).await.expect("reserve").expect("a job to reserve")
}

async fn assert_empty(q: &dyn Queue, queue: &str) {
    let got = q.reserve(&req(queue)).await.expect("reserve");
    assert!(got.is_none(), "expected no job in {queue}, got {:?}", got.map(|l| l.job.id));
}

fn assert_lease_lost<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(Error::LeaseLost { .. }) => {}
        other => panic!("{what} with a stale lease: expected LeaseLost, got {other:?}"),
    }
}

/// Push, reserve, complete; the record tells the story; args keep order and
/// types.
pub async fn push_reserve_complete(q: Arc<dyn Queue>) {
    let queue = unique_queue("prc");
    let mut spec = job(&queue)
        .arg("zeta", "x")
        .arg("alpha", 1)
        .arg("lr", 0.001)
        .arg("flag", true)
        .arg("off", false)
        .arg("none", serde_json::Value::Null)
        .arg("resize", serde_json::json!(["128", 96]));
    spec.name = Some("first".into());
    spec.env.insert("WANDB_MODE".into(), "offline".into());
    spec.timeout = Some(Duration::from_secs(90));
    spec.priority = 3;
    spec.repo = Some("https://example.com/team/model.git".into());
    let id = q.push(spec.clone()).await.expect("push");

    let rec = q.get(&id).await.expect("get");
    assert_eq!(rec.state, JobState::Queued);
    assert_eq!(rec.attempt, 0);
    assert_eq!(rec.spec, spec, "the stored spec is the pushed spec");
    let keys: Vec<&str> = rec.spec.args.keys().map(String::as_str).collect();
    assert_eq!(keys, ["zeta", "alpha", "lr", "flag", "off", "none", "resize"], "args keep their order");

    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &id);
    assert_eq!(lease.attempt(), 1);
    assert_eq!(lease.job.state, JobState::Running);
    assert_eq!(lease.job.spec, spec);
    assert_eq!(q.get(&id).await.unwrap().state, JobState::Running);
    assert_eq!(q.get(&id).await.unwrap().worker.as_deref(), Some("conformance:1"));

    let info = RunInfo { commit: Some("0123456789abcdef0123456789abcdef01234567".into()), gpu_ids: vec![1, 3] };
    q.started(&lease, &info).await.expect("started");
    assert_empty(q.as_ref(), &queue).await;

    let done = Completion { output_tail: "loss 0.1\n".into(), ..Completion::default() };
    q.complete(&lease, done).await.expect("complete");
    let rec = q.get(&id).await.unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.commit, info.commit);
    assert_eq!(rec.gpu_ids, Some(vec![1, 3]));
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.output_tail.as_deref(), Some("loss 0.1\n"));
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    assert!(rec.errors.is_empty());
    assert_empty(q.as_ref(), &queue).await;

    assert_lease_lost(q.complete(&lease, Completion::default()).await, "a second complete");
    assert!(matches!(q.get(&JobId::new("987654321")).await, Err(Error::NotFound { .. })));

    // A run that ended before its start was recorded: its facts come with
    // its end.
    let id = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    let done = Completion { run: Some(info.clone()), ..Completion::default() };
    q.complete(&lease, done).await.expect("complete with the run's facts");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.commit, rec.gpu_ids), (JobState::Succeeded, info.commit, Some(vec![1, 3])));
}

/// Invalid jobs are refused at push and nothing is stored.
pub async fn push_refuses_invalid_jobs(q: Arc<dyn Queue>) {
    let queue = unique_queue("inv");
    let outside = JobSpec::new("main", "../x.py").with_queue(&queue);
    match q.push(outside).await {
        Err(Error::InvalidJob(m)) => assert!(m.contains("../x.py"), "the error names the value: {m}"),
        other => panic!("an entrypoint outside the repo must be refused, got {other:?}"),
    }
    let mut preload = job(&queue);
    preload.env.insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
    match q.push(preload).await {
        Err(Error::InvalidJob(m)) => assert!(m.contains("LD_PRELOAD"), "the error names the variable: {m}"),
        other => panic!("LD_PRELOAD must be refused, got {other:?}"),
    }
    assert!(matches!(q.push(JobSpec::new("main", "/abs.py").with_queue(&queue)).await, Err(Error::InvalidJob(_))));
    let filter = ListFilter { queue: Some(queue.clone()), ..ListFilter::default() };
    assert!(q.list(&filter).await.unwrap().is_empty(), "nothing was stored");
}

/// Stores a job behind push's back, unchecked: in queue `.0`, its spec the
/// JSON text `.1`; returns its id. A backend's test hook for
/// [`stored_jobs_are_checked_again`] (a row written by hand, a field of a
/// newer gpupool, an event published by something else).
pub type StoreRaw = dyn Fn(String, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = JobId> + Send>> + Sync;

/// A stored job is checked again when it is read for running: one that
/// does not read, and one that reads but fails the checks of push (an
/// `LD_PRELOAD` written straight into the store), each end `failed` with
/// kind `invalid` and a message naming the problem, and the reserve goes on
/// to the job behind them.
pub async fn stored_jobs_are_checked_again(q: Arc<dyn Queue>, store_raw: &StoreRaw) {
    let queue = unique_queue("raw");
    let unreadable = serde_json::json!({"git_ref": 7, "entrypoint": "a.py", "queue": queue, "from": "a newer gpupool"});
    let unreadable = store_raw(queue.clone(), unreadable.to_string()).await;
    let preload = serde_json::json!({"git_ref": "main", "entrypoint": "a.py", "queue": queue,
        "env": {"LD_PRELOAD": "/tmp/evil.so"}});
    let preload = store_raw(queue.clone(), preload.to_string()).await;
    let good = q.push(job(&queue)).await.unwrap();
    let mut req = ReserveRequest::new(&queue);
    req.wait = Duration::from_secs(2);
    let lease = q.reserve(&req).await.unwrap().expect("the job behind the bad ones");
    assert_eq!(lease.id(), &good, "the bad jobs are not handed out");
    for (bad, says) in [(&unreadable, "does not read"), (&preload, "LD_PRELOAD")] {
        let errors = q.errors(Some(bad), 10).await.unwrap();
        assert_eq!(errors.len(), 1, "job {bad}: {errors:?}");
        assert_eq!(errors[0].kind, FailureKind::Invalid, "job {bad}");
        assert!(errors[0].message.contains(says), "job {bad}: the message names the problem: {}", errors[0].message);
    }
    req.wait = Duration::ZERO;
    assert!(q.reserve(&req).await.unwrap().is_none(), "nothing else is queued");
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// 16 concurrent reservers never get the same job.
pub async fn no_double_reserve(q: Arc<dyn Queue>) {
    const JOBS: usize = 64;
    const RESERVERS: usize = 16;
    let queue = unique_queue("dbl");
    let mut pushed = HashSet::new();
    for i in 0..JOBS {
        pushed.insert(q.push(job(&queue).arg("i", i)).await.expect("push"));
    }
    let mut tasks = Vec::new();
    for _ in 0..RESERVERS {
        let q = Arc::clone(&q);
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(lease) = q.reserve(&req(&queue)).await.expect("reserve") {
                got.push(lease);
            }
            got
        }));
    }
    let mut seen = HashSet::new();
    let mut leases = Vec::new();
    for t in tasks {
        for lease in t.await.expect("reserver task") {
            assert!(seen.insert(lease.id().clone()), "job {} was reserved twice", lease.id());
            leases.push(lease);
        }
    }
    assert_eq!(seen, pushed, "every job was reserved exactly once");
    for lease in &leases {
        q.complete(lease, Completion::default()).await.expect("complete");
    }
    let done = ListFilter { queue: Some(queue.clone()), state: Some(JobState::Succeeded), limit: 1000, offset: 0 };
    assert_eq!(q.list(&done).await.unwrap().len(), JOBS);
}

/// [`Queue::reserve_many`]: concurrent callers asking for several jobs at
/// once still get each job once, each lease its own token and at most what
/// they asked for; a batch keeps queue order and stays within the GPUs
/// offered (the first job as `reserve` would pick it, then only what fits
/// in `free_gpus` with it, never skipping a job).
pub async fn reserve_many_leases_several(q: Arc<dyn Queue>) {
    const JOBS: usize = 48;
    let queue = unique_queue("many");
    let mut pushed = HashSet::new();
    for i in 0..JOBS {
        pushed.insert(q.push(job(&queue).arg("i", i)).await.expect("push"));
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (q, queue) = (Arc::clone(&q), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = q.reserve_many(&req(&queue), 5).await.expect("reserve_many");
                assert!(batch.len() <= 5, "asked for 5, got {}", batch.len());
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch);
            }
        }));
    }
    let (mut seen, mut tokens) = (HashSet::new(), HashSet::new());
    let mut leases = Vec::new();
    for t in tasks {
        for lease in t.await.expect("reserver task") {
            assert!(seen.insert(lease.id().clone()), "job {} was reserved twice", lease.id());
            assert!(tokens.insert(lease.token.clone()), "two leases share a token");
            assert_eq!((lease.job.state, lease.attempt()), (JobState::Running, 1));
            leases.push(lease);
        }
    }
    assert_eq!(seen, pushed, "every job was reserved exactly once");
    for lease in &leases {
        q.complete(lease, Completion::default()).await.expect("each lease completes with its own token");
    }
    let done = ListFilter { queue: Some(queue.clone()), state: Some(JobState::Succeeded), limit: 1000, offset: 0 };
    assert_eq!(q.list(&done).await.unwrap().len(), JOBS);

    if !q.capabilities().gpu_filter {
        return;
    }
    let queue = unique_queue("manygpu");
    let mut ids = Vec::new();
    for gpus in [2, 1, 1, 3] {
        let mut spec = job(&queue);
        spec.gpus = Some(gpus);
        ids.push(q.push(spec).await.unwrap());
    }
    let offer = req(&queue).gpus(3, true).max_gpus(4);
    let mut order = Vec::new();
    while order.len() < ids.len() {
        let batch = q.reserve_many(&offer, 8).await.unwrap();
        assert!(!batch.is_empty(), "a job is left: {:?}", &ids[order.len()..]);
        let needs: Vec<u32> = batch.iter().map(|l| l.job.spec.gpus_needed(true)).collect();
        assert!(batch.len() == 1 || needs.iter().sum::<u32>() <= 3, "a batch of {needs:?} GPUs offered 3");
        for lease in batch {
            order.push(lease.job.id.clone());
            q.complete(&lease, Completion::default()).await.unwrap();
        }
    }
    assert_eq!(order, ids, "batches keep queue order and skip no job");
}

/// A lease that is not heartbeated expires: the job is reserved again with
/// attempt + 1 and the lost attempt is recorded with kind `lease_lost`.
pub async fn lease_expires(q: Arc<dyn Queue>) {
    let queue = unique_queue("exp");
    let id = q.push(job(&queue)).await.unwrap();
    let first = q.reserve(&req(&queue).lease(SHORT_LEASE)).await.unwrap().unwrap();
    assert_eq!(first.attempt(), 1);
    assert_empty(q.as_ref(), &queue).await;
    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(600)).await;
    let second = q.reserve(&req(&queue).lease(Duration::from_secs(30))).await.unwrap().expect("the expired job");
    assert_eq!(second.id(), &id);
    assert_eq!(second.attempt(), 2);
    assert_ne!(second.token, first.token);
    let errors = q.errors(Some(&id), 10).await.unwrap();
    assert_eq!(errors.len(), 1, "one lost attempt: {errors:?}");
    assert_eq!(errors[0].kind, FailureKind::LeaseLost);
    assert_eq!(errors[0].attempt, 1);
    q.complete(&second, Completion::default()).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().state, JobState::Succeeded);
}

/// A job whose last attempt's lease expires ends `failed` with `lease_lost`.
pub async fn lease_expiry_uses_up_attempts(q: Arc<dyn Queue>) {
    let queue = unique_queue("expf");
    let mut spec = job(&queue);
    spec.max_attempts = Some(1);
    let id = q.push(spec).await.unwrap();
    let _lease = q.reserve(&req(&queue).lease(SHORT_LEASE)).await.unwrap().unwrap();
    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(600)).await;
    assert_empty(q.as_ref(), &queue).await;
    let rec = q.get(&id).await.unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.errors.len(), 1);
    assert_eq!(rec.errors[0].kind, FailureKind::LeaseLost);
}

/// Heartbeats keep a job past its first lease.
pub async fn heartbeat_extends_lease(q: Arc<dyn Queue>) {
    let queue = unique_queue("hb");
    let id = q.push(job(&queue)).await.unwrap();
    let lease = q.reserve(&req(&queue).lease(SHORT_LEASE)).await.unwrap().unwrap();
    for _ in 0..5 {
        tokio::time::sleep(SHORT_LEASE / 2).await;
        assert_eq!(q.heartbeat(&lease, SHORT_LEASE).await.expect("heartbeat"), Heartbeat::Extended);
    }
    // 2.5 leases have passed; the job is still ours.
    assert_empty(q.as_ref(), &queue).await;
    q.complete(&lease, Completion::default()).await.expect("complete after heartbeats");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Succeeded, 1));
    assert!(rec.errors.is_empty());
}

/// After a lease expired and the job was reserved again, the old holder can
/// neither heartbeat, complete, fail, cancel nor release it.
pub async fn stale_lease_is_refused(q: Arc<dyn Queue>) {
    let queue = unique_queue("stale");
    let id = q.push(job(&queue)).await.unwrap();
    let old = q.reserve(&req(&queue).lease(SHORT_LEASE)).await.unwrap().unwrap();
    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(600)).await;
    let new = q.reserve(&req(&queue)).await.unwrap().expect("the expired job");
    assert_lease_lost(q.heartbeat(&old, SHORT_LEASE).await, "heartbeat");
    assert_lease_lost(q.complete(&old, Completion::default()).await, "complete");
    assert_lease_lost(q.fail(&old, Failure::new(FailureKind::Exit, "x")).await, "fail");
    assert_lease_lost(q.release(&old).await, "release");
    assert_lease_lost(q.report_cancelled(&old, String::new()).await, "report_cancelled");
    assert_lease_lost(q.started(&old, &RunInfo::default()).await, "started");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Running, 2), "the stale calls changed nothing");
    q.complete(&new, Completion::default()).await.expect("the current holder completes");
}

/// A failing job is retried up to `max_attempts`, then `failed`, with every
/// attempt kept.
pub async fn failures_retry_then_fail(q: Arc<dyn Queue>) {
    let queue = unique_queue("fail");
    let mut spec = job(&queue);
    spec.max_attempts = Some(3); // asks for `exit` failures to be retried
    let id = q.push(spec).await.unwrap();
    for attempt in 1..=3u32 {
        let lease = reserve_one(q.as_ref(), &queue).await;
        assert_eq!(lease.attempt(), attempt);
        let failure = Failure {
            kind: FailureKind::Exit,
            exit_code: Some(3),
            signal: None,
            message: format!("exited with code 3 on attempt {attempt}"),
            output_tail: format!("Traceback {attempt}\nValueError: boom\n"),
        };
        let outcome = q.fail(&lease, failure).await.expect("fail");
        let expected = if attempt < 3 { FailOutcome::Requeued } else { FailOutcome::Failed };
        assert_eq!(outcome, expected, "attempt {attempt}");
    }
    assert_empty(q.as_ref(), &queue).await;
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.exit_code), (JobState::Failed, 3, Some(3)));
    assert_eq!(rec.errors.len(), 3);
    let attempts: Vec<u32> = rec.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "get lists errors oldest first");
    let newest_first = q.errors(Some(&id), 10).await.unwrap();
    assert_eq!(newest_first.iter().map(|e| e.attempt).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(newest_first[0].exit_code, Some(3));
    assert_eq!(newest_first[0].kind, FailureKind::Exit);
    assert!(newest_first[0].output_tail.contains("Traceback 3"));
    assert_eq!(q.errors(Some(&id), 2).await.unwrap().len(), 2, "errors honours its limit");
}

/// A job that names no `max_attempts` is not run again after its own code
/// fails (`exit`) or runs past its timeout, and is after a fault of the
/// host or the moment (`oom`, `signal`), up to the default limit.
pub async fn exit_and_timeout_retry_only_when_asked(q: Arc<dyn Queue>) {
    let queue = unique_queue("ask");
    for kind in [FailureKind::Exit, FailureKind::Timeout] {
        let id = q.push(job(&queue)).await.unwrap();
        let lease = reserve_one(q.as_ref(), &queue).await;
        assert_eq!(lease.job.attempt_limit, crate::DEFAULT_MAX_ATTEMPTS, "the lease carries the limit");
        let outcome = q.fail(&lease, Failure::new(kind, format!("{kind} failure"))).await.unwrap();
        assert_eq!(outcome, FailOutcome::Failed, "{kind} is not retried unless the job asks");
        let rec = q.get(&id).await.unwrap();
        assert_eq!((rec.state, rec.attempt, rec.attempt_limit), (JobState::Failed, 1, crate::DEFAULT_MAX_ATTEMPTS));
    }
    let id = q.push(job(&queue)).await.unwrap();
    for attempt in 1..=crate::DEFAULT_MAX_ATTEMPTS {
        let lease = reserve_one(q.as_ref(), &queue).await;
        assert_eq!(lease.id(), &id);
        let expected = if attempt < crate::DEFAULT_MAX_ATTEMPTS { FailOutcome::Requeued } else { FailOutcome::Failed };
        let outcome = q.fail(&lease, Failure::new(FailureKind::Oom, "CUDA out of memory")).await.unwrap();
        assert_eq!(outcome, expected, "oom on attempt {attempt} is retried up to the default limit");
    }
    let asked = q.push(job(&queue).with_max_attempts(2)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &asked);
    let outcome = q.fail(&lease, Failure::new(FailureKind::Timeout, "ran past 2h")).await.unwrap();
    assert_eq!(outcome, FailOutcome::Requeued, "a job that names max_attempts retries a timeout");
    let lease = reserve_one(q.as_ref(), &queue).await;
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// `ref`, `repo`, `setup` and `invalid` failures end the job at once; a
/// signal is kept.
pub async fn failure_kinds(q: Arc<dyn Queue>) {
    let queue = unique_queue("kinds");
    for kind in [FailureKind::Ref, FailureKind::Repo, FailureKind::Setup, FailureKind::Invalid] {
        let id = q.push(job(&queue)).await.unwrap();
        let lease = reserve_one(q.as_ref(), &queue).await;
        let outcome = q.fail(&lease, Failure::new(kind, format!("{kind} failure"))).await.unwrap();
        assert_eq!(outcome, FailOutcome::Failed, "{kind} is not retried");
        let rec = q.get(&id).await.unwrap();
        assert_eq!((rec.state, rec.attempt), (JobState::Failed, 1));
        assert_eq!(rec.errors[0].kind, kind);
    }
    let id = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    let failure = Failure { signal: Some(9), ..Failure::new(FailureKind::Signal, "killed by signal 9") };
    assert_eq!(q.fail(&lease, failure).await.unwrap(), FailOutcome::Requeued);
    let e = &q.errors(Some(&id), 1).await.unwrap()[0];
    assert_eq!((e.kind, e.signal, e.exit_code), (FailureKind::Signal, Some(9), None));
}

/// Release gives a job back without charging an attempt or an error record.
pub async fn release_charges_no_attempt(q: Arc<dyn Queue>) {
    let queue = unique_queue("rel");
    let id = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    q.release(&lease).await.expect("release");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Queued, 0));
    assert_lease_lost(q.complete(&lease, Completion::default()).await, "complete after release");
    let again = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(again.attempt(), 1);
    q.complete(&again, Completion::default()).await.unwrap();
    assert!(q.errors(Some(&id), 10).await.unwrap().is_empty());
}

/// Cancel of a queued job, of a running one (seen at the next heartbeat),
/// of an ended one, and of an unknown one.
pub async fn cancel_queued_and_running(q: Arc<dyn Queue>) {
    let queue = unique_queue("cancel");
    let queued = q.push(job(&queue)).await.unwrap();
    assert_eq!(q.request_cancel(&queued).await.unwrap(), CancelOutcome::Cancelled);
    assert_eq!(q.get(&queued).await.unwrap().state, JobState::Cancelled);
    assert_empty(q.as_ref(), &queue).await;

    let running = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(q.heartbeat(&lease, Duration::from_secs(30)).await.unwrap(), Heartbeat::Extended);
    assert_eq!(q.request_cancel(&running).await.unwrap(), CancelOutcome::Requested);
    assert_eq!(q.get(&running).await.unwrap().state, JobState::Running, "running until its process is dead");
    assert_eq!(q.heartbeat(&lease, Duration::from_secs(30)).await.unwrap(), Heartbeat::CancelRequested);
    q.report_cancelled(&lease, "stopped\n".into()).await.expect("report_cancelled");
    let rec = q.get(&running).await.unwrap();
    assert_eq!(rec.state, JobState::Cancelled);
    assert!(rec.errors.is_empty(), "a cancel is not an error");
    assert_eq!(q.request_cancel(&running).await.unwrap(), CancelOutcome::AlreadyEnded(JobState::Cancelled));
    assert!(matches!(q.request_cancel(&JobId::new("987654321")).await, Err(Error::NotFound { .. })));
}

/// Retry moves a failed or cancelled job back to `queued`, keeps its attempt
/// count and errors, and gives it `max_attempts` more attempts.
pub async fn retry_failed_and_cancelled(q: Arc<dyn Queue>) {
    let queue = unique_queue("retry");
    let mut spec = job(&queue);
    spec.max_attempts = Some(1);
    let id = q.push(spec).await.unwrap();
    assert!(matches!(q.retry(&id).await, Err(Error::InvalidState { state: JobState::Queued, .. })));
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(q.fail(&lease, Failure::new(FailureKind::Exit, "exit 1")).await.unwrap(), FailOutcome::Failed);
    assert_eq!(q.get(&id).await.unwrap().attempt_limit, 1);
    q.retry(&id).await.expect("retry a failed job");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.errors.len()), (JobState::Queued, 1, 1));
    assert_eq!(rec.attempt_limit, 2, "a retry gives max_attempts more attempts");
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.attempt(), 2, "attempt keeps counting");
    q.complete(&lease, Completion::default()).await.unwrap();
    assert!(matches!(q.retry(&id).await, Err(Error::InvalidState { state: JobState::Succeeded, .. })));

    let cancelled = q.push(job(&queue)).await.unwrap();
    q.request_cancel(&cancelled).await.unwrap();
    q.retry(&cancelled).await.expect("retry a cancelled job");
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &cancelled);
    q.complete(&lease, Completion::default()).await.unwrap();
    assert!(matches!(q.retry(&JobId::new("987654321")).await, Err(Error::NotFound { .. })));
}

/// Queue order first, then priority (where declared), then FIFO.
pub async fn reserve_order(q: Arc<dyn Queue>) {
    let first = unique_queue("ord-a");
    let second = unique_queue("ord-b");
    let push = |queue: &str, priority: i32, tag: &str| {
        let mut spec = job(queue).arg("tag", tag);
        spec.priority = priority;
        let q = Arc::clone(&q);
        async move { q.push(spec).await.unwrap() }
    };
    push(&second, 100, "b-high").await;
    push(&first, 0, "a").await;
    push(&first, 5, "b").await;
    push(&first, 5, "c").await;
    push(&first, 0, "d").await;
    let expected = if q.capabilities().priority { ["b", "c", "a", "d"] } else { ["a", "b", "c", "d"] };
    let both = req(&first).queues([first.clone(), second.clone()]);
    for tag in expected.into_iter().chain(["b-high"]) {
        let lease = q.reserve(&both).await.unwrap().expect("a job");
        assert_eq!(lease.job.spec.args["tag"], tag);
        q.complete(&lease, Completion::default()).await.unwrap();
    }
    assert!(q.reserve(&both).await.unwrap().is_none());
}

/// List filters by state and queue, newest first, paginated.
pub async fn list_filters_and_pages(q: Arc<dyn Queue>) {
    let queue = unique_queue("list");
    let other = unique_queue("list-other");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(q.push(job(&queue).arg("i", i)).await.unwrap());
    }
    q.push(job(&other)).await.unwrap();
    let page = |offset, limit| ListFilter { queue: Some(queue.clone()), state: None, limit, offset };
    let got = |v: Vec<crate::JobRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(got(q.list(&page(0, 2)).await.unwrap()), [ids[4].clone(), ids[3].clone()]);
    assert_eq!(got(q.list(&page(2, 2)).await.unwrap()), [ids[2].clone(), ids[1].clone()]);
    assert_eq!(got(q.list(&page(4, 2)).await.unwrap()), [ids[0].clone()]);
    assert!(q.list(&page(5, 2)).await.unwrap().is_empty());

    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &ids[0]);
    q.complete(&lease, Completion::default()).await.unwrap();
    q.request_cancel(&ids[1]).await.unwrap();
    let by_state = |state| ListFilter { queue: Some(queue.clone()), state: Some(state), limit: 100, offset: 0 };
    assert_eq!(got(q.list(&by_state(JobState::Succeeded)).await.unwrap()), [ids[0].clone()]);
    assert_eq!(got(q.list(&by_state(JobState::Cancelled)).await.unwrap()), [ids[1].clone()]);
    let queued = got(q.list(&by_state(JobState::Queued)).await.unwrap());
    assert_eq!(queued, [ids[4].clone(), ids[3].clone(), ids[2].clone()], "queued jobs, newest first");
    assert!(q.list(&by_state(JobState::Running)).await.unwrap().is_empty());
    let all = q.list(&ListFilter { limit: 1000, ..ListFilter::default() }).await.unwrap();
    assert!(all.iter().any(|r| r.spec.queue == other), "no queue filter lists every queue");
}

/// A second push of the same job with the same idempotency key returns the
/// first job and says so; the key with a different job is refused, naming it.
pub async fn idempotency_key(q: Arc<dyn Queue>) {
    let queue = unique_queue("idem");
    let key = format!("run-{}", uuid::Uuid::new_v4());
    let mut spec = job(&queue).arg("lr", 0.001).arg("layers", serde_json::json!([64, "128"]));
    spec.idempotency_key = Some(key.clone());
    spec.timeout = Some(Duration::from_secs(90));
    let first = match q.add(spec.clone()).await.unwrap() {
        crate::Pushed::New(id) => id,
        other => panic!("a first push is new, got {other:?}"),
    };
    assert_eq!(q.add(spec.clone()).await.unwrap(), crate::Pushed::Existing(first.clone()));
    assert_eq!(q.push(spec.clone()).await.unwrap(), first);
    match q.add(spec.arg("different", 1)).await {
        Err(Error::IdempotencyConflict { key: k, id }) => assert_eq!((k, id), (key.clone(), first.to_string())),
        other => panic!("the key with a different job: expected IdempotencyConflict, got {other:?}"),
    }
    let filter = ListFilter { queue: Some(queue.clone()), ..ListFilter::default() };
    assert_eq!(q.list(&filter).await.unwrap().len(), 1);
    let mut other = job(&queue);
    other.idempotency_key = Some(format!("{key}-other"));
    assert_ne!(q.push(other).await.unwrap(), first);
}

/// `gpus` is stored as pushed (null stays null), and a backend that declares
/// `gpu_filter` never returns a job needing more GPUs than offered.
pub async fn gpu_requirements(q: Arc<dyn Queue>) {
    let queue = unique_queue("gpu");
    let mut ids = Vec::new();
    for gpus in [Some(4), Some(2), None, Some(0)] {
        let mut spec = job(&queue);
        spec.gpus = gpus;
        let id = q.push(spec).await.unwrap();
        assert_eq!(q.get(&id).await.unwrap().spec.gpus, gpus, "gpus stored as pushed");
        ids.push(id);
    }
    if !q.capabilities().gpu_filter {
        return;
    }
    let offer = |free, host| req(&queue).gpus(free, host);
    let take = |free: u32, host: bool| {
        let q = Arc::clone(&q);
        let r = offer(free, host);
        async move {
            let lease = q.reserve(&r).await.unwrap();
            if let Some(lease) = &lease {
                let need = lease.job.spec.gpus_needed(host);
                assert!(need <= free, "job needing {need} GPUs given to a caller offering {free}");
                q.complete(lease, Completion::default()).await.unwrap();
            }
            lease.map(|l| l.job.id)
        }
    };
    assert_eq!(take(3, true).await, Some(ids[1].clone()), "the 2-GPU job fits 3");
    assert_eq!(take(3, true).await, Some(ids[2].clone()), "an unset gpus takes one on a GPU host");
    assert_eq!(take(0, true).await, Some(ids[3].clone()), "a CPU job needs no GPU");
    assert_eq!(take(3, true).await, None, "the 4-GPU job does not fit 3");
    assert_eq!(take(0, false).await, None, "nor a CPU-only worker");
    assert_eq!(take(8, true).await, Some(ids[0].clone()));

    let mut unset = job(&queue);
    unset.gpus = None;
    let id = q.push(unset).await.unwrap();
    assert_eq!(take(0, false).await, Some(id), "an unset gpus runs on the CPU of a CPU-only worker");
}

/// With `max_gpus`, a filtering backend returns the oldest job the caller
/// could ever run even when it does not fit the free GPUs now, so smaller
/// jobs pushed after it cannot starve it; jobs bigger than `max_gpus` are
/// left for bigger workers.
pub async fn big_jobs_are_not_starved(q: Arc<dyn Queue>) {
    if !q.capabilities().gpu_filter {
        return;
    }
    let queue = unique_queue("starve");
    let mut huge = job(&queue);
    huge.gpus = Some(16);
    let huge = q.push(huge).await.unwrap();
    let mut big = job(&queue);
    big.gpus = Some(4);
    let big = q.push(big).await.unwrap();
    let mut small = job(&queue);
    small.gpus = Some(1);
    let small = q.push(small).await.unwrap();
    let only_free = req(&queue).gpus(1, true);
    let lease = q.reserve(&only_free).await.unwrap().expect("a job that fits one GPU");
    assert_eq!(lease.id(), &small, "without max_gpus only what fits now");
    q.release(&lease).await.unwrap();
    let lease = q.reserve(&req(&queue).gpus(1, true).max_gpus(8)).await.unwrap().expect("the oldest job that fits 8");
    assert_eq!(lease.id(), &big, "the 4-GPU job comes before the 1-GPU job pushed after it");
    q.complete(&lease, Completion::default()).await.unwrap();
    assert_eq!(q.get(&huge).await.unwrap().state, JobState::Queued, "the 16-GPU job waits for a bigger worker");
}

/// A parked job is not offered to a smaller worker again, charges no
/// attempt, and goes to the first big enough one.
pub async fn parked_jobs_wait_for_a_big_enough_worker(q: Arc<dyn Queue>) {
    let queue = unique_queue("park");
    let mut spec = job(&queue);
    spec.gpus = Some(8);
    let id = q.push(spec).await.unwrap();
    let lease = q.reserve(&req(&queue).gpus(8, true).max_gpus(8)).await.unwrap().expect("the 8-GPU job");
    q.park(&lease, 8).await.expect("park");
    assert_lease_lost(q.complete(&lease, Completion::default()).await, "complete after park");
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Queued, 0), "parked: queued, no attempt charged");
    for _ in 0..3 {
        let small = q.reserve(&req(&queue).gpus(2, true).max_gpus(2)).await.unwrap();
        assert!(small.is_none(), "a 2-GPU worker is not offered the parked job again");
    }
    let big = q.reserve(&req(&queue).gpus(8, true).max_gpus(8)).await.unwrap().expect("an 8-GPU worker gets it");
    assert_eq!((big.id(), big.attempt()), (&id, 1));
    q.complete(&big, Completion::default()).await.unwrap();
}

/// Workers register, refresh, show as lost when silent, and unregister
/// (where the backend keeps a [`WorkerRegistry`](crate::WorkerRegistry)).
pub async fn worker_registry(q: Arc<dyn Queue>) {
    let Some(r) = q.worker_registry() else { return };
    let name = format!("{}:{}", unique_queue("host"), std::process::id());
    let mut info = crate::WorkerInfo {
        name: name.clone(),
        host: "gpu-07".into(),
        queues: vec!["default".into()],
        slots: 2,
        gpus: vec![crate::gpu::GpuStatus { index: 0, name: "H100".into(), ..crate::gpu::GpuStatus::default() }],
        running: vec![crate::RunningJob { id: JobId::new("1"), gpus: vec![0] }],
        heartbeat_ms: 300,
        started_at: crate::Timestamp::now(),
        seen_at: crate::Timestamp(0),
        lost: false,
        draining: false,
        unhealthy: None,
    };
    r.register_worker(&info).await.expect("register");
    let mine = |all: Vec<crate::WorkerInfo>| all.into_iter().find(|w| w.name == name);
    let seen = mine(r.workers().await.unwrap()).expect("the worker is listed");
    assert!(!seen.lost, "just registered");
    assert!(seen.seen_at.0 > 0, "the backend stamped seen_at");
    assert_eq!((seen.host.as_str(), seen.slots, seen.gpus.len()), ("gpu-07", 2, 1));
    assert_eq!(seen.running, info.running);
    info.running.clear();
    r.register_worker(&info).await.expect("refresh");
    let seen = mine(r.workers().await.unwrap()).expect("still listed once");
    assert!(seen.running.is_empty(), "the refresh replaced what it holds");
    assert!(!seen.draining);
    info.draining = true;
    r.register_worker(&info).await.expect("refresh");
    assert!(mine(r.workers().await.unwrap()).expect("listed").draining, "a draining worker shows so");
    info.unhealthy = Some("command /x not found".into());
    r.register_worker(&info).await.expect("refresh");
    let seen = mine(r.workers().await.unwrap()).expect("listed");
    assert_eq!(seen.unhealthy.as_deref(), Some("command /x not found"), "an unhealthy worker shows why");
    info.unhealthy = None;
    assert_eq!(r.workers().await.unwrap().iter().filter(|w| w.name == name).count(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(mine(r.workers().await.unwrap()).expect("a lost worker is still shown").lost, "silent for 3 intervals");
    r.unregister_worker(&name).await.expect("unregister");
    assert!(mine(r.workers().await.unwrap()).is_none());

    // Silent for long (100 heartbeats of 5 ms), a lost worker is dropped.
    let gone = format!("{}:{}", unique_queue("gone"), std::process::id());
    let short = crate::WorkerInfo { name: gone.clone(), heartbeat_ms: 5, draining: false, ..info };
    r.register_worker(&short).await.expect("register");
    assert!(r.workers().await.unwrap().iter().any(|w| w.name == gone), "listed while fresh");
    tokio::time::sleep(Duration::from_millis(5 * crate::GONE_AFTER_HEARTBEATS + 600)).await;
    assert!(!r.workers().await.unwrap().iter().any(|w| w.name == gone), "dropped once gone");
    assert!(!r.workers().await.unwrap().iter().any(|w| w.name == gone), "and stays dropped");
}

/// `init` can run again, and after it the queue exists.
pub async fn exists_after_init(q: Arc<dyn Queue>) {
    q.init().await.expect("init is safe to repeat");
    assert!(q.exists().await.expect("exists"), "a queue that init set up exists");
}

/// A reserve that may wait returns a job pushed while it waits.
pub async fn reserve_waits_for_push(q: Arc<dyn Queue>) {
    let queue = unique_queue("wait");
    let waiter = {
        let q = Arc::clone(&q);
        let r = req(&queue).wait(Duration::from_secs(10));
        tokio::spawn(async move { q.reserve(&r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = q.push(job(&queue)).await.unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("reserve returned within its wait")
        .unwrap()
        .unwrap()
        .expect("the pushed job");
    assert_eq!(lease.id(), &id);
    q.complete(&lease, Completion::default()).await.unwrap();
    // And an empty queue returns None once the wait is over.
    let started = tokio::time::Instant::now();
    assert!(q.reserve(&req(&queue).wait(Duration::from_millis(300))).await.unwrap().is_none());
    assert!(started.elapsed() >= Duration::from_millis(250), "reserve waited before giving up");
}

/// One `#[tokio::test]` per conformance function, for a backend's
/// `tests/conformance.rs`:
///
/// ```ignore
/// // None: the test is skipped (print why).
/// async fn setup() -> Option<(Guard, Arc<dyn Queue>)> { todo!() }
/// async fn teardown(guard: Guard, queue: Arc<dyn Queue>) { todo!() }
/// gpupool_core::conformance_tests!(setup, teardown);
/// ```
///
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`).
/// Every test gets a fresh queue from `setup` and runs in parallel with the
/// others.
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path, $teardown:path) => {
        $crate::conformance_tests!(@each $setup, $teardown;
            push_reserve_complete, push_refuses_invalid_jobs, no_double_reserve, lease_expires,
            lease_expiry_uses_up_attempts, heartbeat_extends_lease, stale_lease_is_refused,
            failures_retry_then_fail, exit_and_timeout_retry_only_when_asked, failure_kinds, release_charges_no_attempt, cancel_queued_and_running,
            retry_failed_and_cancelled, reserve_order, list_filters_and_pages, idempotency_key,
            gpu_requirements, big_jobs_are_not_starved, parked_jobs_wait_for_a_big_enough_worker,
            worker_registry, run_logs, artifacts, reserve_waits_for_push, exists_after_init, sweep_runs,
            retry_policy, delayed_start, retry_backoff, defer_holds_a_job_back, after_waits_for_its_jobs,
            blobs_round_trip, reserve_many_leases_several);
    };
    (@each $setup:path, $teardown:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some((guard, queue)) = $setup().await else { return };
                $crate::conformance::$name(::std::sync::Arc::clone(&queue)).await;
                $teardown(guard, queue).await;
            }
        )*
    };
}

/// Shipped logs and live results ([`crate::RunLogs`]), where declared: a
/// job's log is its pieces in order, readable from any offset and after
/// the job ended; `result` follows the latest shipped; a stale lease ships
/// nothing; more than [`crate::LOG_CAP_BYTES`] drops the oldest part and
/// says how much.
pub async fn run_logs(q: Arc<dyn Queue>) {
    let Some(logs) = q.run_logs() else { return };
    let queue = unique_queue("logs");
    let id = q.push(job(&queue)).await.unwrap();
    assert_eq!(logs.read_log(&id, 0).await.expect("an empty log"), crate::LogPage::default());
    let lease = reserve_one(q.as_ref(), &queue).await;
    let first = crate::Progress { log: "epoch 1 ✓\n".into(), result: Some(serde_json::json!({"acc": 0.5})) };
    logs.ship(&lease, &first).await.expect("ship");
    let second = crate::Progress { log: "epoch 2\n".into(), result: None };
    logs.ship(&lease, &second).await.expect("ship");
    assert_eq!(q.get(&id).await.unwrap().result, Some(serde_json::json!({"acc": 0.5})), "the live result");
    let all = logs.read_log(&id, 0).await.unwrap();
    assert_eq!((all.text.as_str(), all.dropped), ("epoch 1 ✓\nepoch 2\n", 0));
    assert_eq!(all.next, all.text.len() as u64);
    let from = "epoch 1 ✓\n".len() as u64;
    assert_eq!(logs.read_log(&id, from).await.unwrap().text, "epoch 2\n", "read from an offset");
    let end = logs.read_log(&id, all.next).await.unwrap();
    assert_eq!((end.text.as_str(), end.next), ("", all.next), "nothing new yet");
    // The last output comes with the end.
    let done = Completion { log: "epoch 3\n".into(), ..Completion::default() };
    q.complete(&lease, done).await.unwrap();
    assert_lease_lost(logs.ship(&lease, &second).await, "ship");
    let ended = logs.read_log(&id, 0).await.unwrap();
    assert_eq!(ended.text, format!("{}epoch 3\n", all.text), "the completion's log, appended");
    assert_eq!(logs.read_log(&id, 0).await.unwrap(), ended, "kept after the end, nothing added");
    assert!(matches!(logs.read_log(&JobId::new("999999999"), 0).await, Err(Error::NotFound { .. })));

    // The cap: 17 pieces of 1 MiB keep the newest 16 MiB or less.
    let id = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    let line = format!("{}\n", "x".repeat(1023));
    for i in 0..17 {
        let piece = format!("piece {i:02}\n{}", line.repeat(1024));
        logs.ship(&lease, &crate::Progress { log: piece, result: None }).await.expect("ship a MiB");
    }
    let page = logs.read_log(&id, 0).await.unwrap();
    assert!(page.dropped > 0, "the oldest part went");
    let mut kept = page.text.len() as u64;
    let mut next = page.next;
    loop {
        let more = logs.read_log(&id, next).await.unwrap();
        if more.text.is_empty() {
            break;
        }
        kept += more.text.len() as u64;
        next = more.next;
    }
    assert!(kept <= crate::LOG_CAP_BYTES, "at most the cap is kept: {kept}");
    assert_eq!(page.dropped + kept, next, "dropped and kept add up to the whole log");
    assert!(page.text.starts_with("piece ") || page.text.starts_with('x'), "whole lines are dropped");
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// Where a run's files are ([`Queue::record_artifacts`]): kept on the
/// record after its end, shown by `get` and `list`, replaced by the same
/// or a later attempt's and never by an earlier one's; an unknown id is
/// `NotFound`.
pub async fn artifacts(q: Arc<dyn Queue>) {
    let queue = unique_queue("artifacts");
    let mut spec = job(&queue);
    spec.max_attempts = Some(2);
    let id = q.push(spec).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().artifacts, None, "none before a run");
    let lease = reserve_one(q.as_ref(), &queue).await;
    q.fail(&lease, Failure::new(FailureKind::Exit, "exit 1")).await.unwrap();
    let files = vec![
        crate::ArtifactFile { path: "model/best.pth".into(), size: 3 << 30 },
        crate::ArtifactFile { path: "ünïcode name.txt".into(), size: 0 },
    ];
    let local = crate::Artifacts {
        attempt: 1,
        location: "gpu-7:/var/lib/gpupool/outputs/q-1/job-1/attempt-1".into(),
        stored: false,
        files,
        error: None,
    };
    q.record_artifacts(&id, &local).await.expect("record a finished attempt's files");
    assert_eq!(q.get(&id).await.unwrap().artifacts.as_ref(), Some(&local));

    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.attempt(), 2);
    assert_eq!(q.get(&id).await.unwrap().artifacts.as_ref(), Some(&local), "kept while the next attempt runs");
    let second = crate::Artifacts { attempt: 2, files: Vec::new(), ..local.clone() };
    q.complete(&lease, Completion::default()).await.unwrap();
    q.record_artifacts(&id, &second).await.unwrap();
    let late = crate::Artifacts { error: Some("upload failed".into()), ..local.clone() };
    q.record_artifacts(&id, &late).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().artifacts.as_ref(), Some(&second), "an earlier attempt's never replaces");
    let uploaded = crate::Artifacts {
        location: "s3://bucket/runs/q-1/job-1/attempt-2/".into(),
        stored: true,
        error: Some("kept locally too".into()),
        ..second.clone()
    };
    q.record_artifacts(&id, &uploaded).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().artifacts.as_ref(), Some(&uploaded), "the same attempt's news replaces");
    let listed = q.list(&ListFilter { queue: Some(queue.clone()), ..ListFilter::default() }).await.unwrap();
    assert_eq!(listed.iter().find(|r| r.id == id).and_then(|r| r.artifacts.as_ref()), Some(&uploaded), "list shows it");
    assert_eq!(q.get(&id).await.unwrap().to_json()["artifacts"]["files"].as_array().map(Vec::len), Some(0));
    assert!(matches!(q.record_artifacts(&JobId::new("987654321"), &local).await, Err(Error::NotFound { .. })));
}

/// Every function above, one after another (for a quick local run; backends
/// call each from its own test so they run in parallel).
pub async fn run_all(q: Arc<dyn Queue>) {
    push_reserve_complete(Arc::clone(&q)).await;
    push_refuses_invalid_jobs(Arc::clone(&q)).await;
    no_double_reserve(Arc::clone(&q)).await;
    lease_expires(Arc::clone(&q)).await;
    lease_expiry_uses_up_attempts(Arc::clone(&q)).await;
    heartbeat_extends_lease(Arc::clone(&q)).await;
    stale_lease_is_refused(Arc::clone(&q)).await;
    failures_retry_then_fail(Arc::clone(&q)).await;
    exit_and_timeout_retry_only_when_asked(Arc::clone(&q)).await;
    failure_kinds(Arc::clone(&q)).await;
    release_charges_no_attempt(Arc::clone(&q)).await;
    cancel_queued_and_running(Arc::clone(&q)).await;
    retry_failed_and_cancelled(Arc::clone(&q)).await;
    reserve_order(Arc::clone(&q)).await;
    list_filters_and_pages(Arc::clone(&q)).await;
    idempotency_key(Arc::clone(&q)).await;
    gpu_requirements(Arc::clone(&q)).await;
    big_jobs_are_not_starved(Arc::clone(&q)).await;
    parked_jobs_wait_for_a_big_enough_worker(Arc::clone(&q)).await;
    worker_registry(Arc::clone(&q)).await;
    run_logs(Arc::clone(&q)).await;
    artifacts(Arc::clone(&q)).await;
    reserve_waits_for_push(Arc::clone(&q)).await;
    sweep_runs(Arc::clone(&q)).await;
    retry_policy(Arc::clone(&q)).await;
    delayed_start(Arc::clone(&q)).await;
    retry_backoff(Arc::clone(&q)).await;
    defer_holds_a_job_back(Arc::clone(&q)).await;
    after_waits_for_its_jobs(Arc::clone(&q)).await;
    blobs_round_trip(Arc::clone(&q)).await;
    reserve_many_leases_several(Arc::clone(&q)).await;
    exists_after_init(q).await;
}

/// A job's `retry` policy: the kinds it names are retried up to `max`
/// retries; others fail the job at once; a lost lease is always retried.
pub async fn retry_policy(q: Arc<dyn Queue>) {
    let queue = unique_queue("retrypol");
    let mut spec = job(&queue);
    spec.retry = Some(crate::RetryPolicy { on: vec![FailureKind::Oom], max: 2, backoff: None, factor: None });
    // A Python error is not among the kinds: failed at once.
    let python = q.push(spec.clone()).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &python);
    let outcome = q.fail(&lease, Failure::new(FailureKind::Exit, "ValueError")).await.unwrap();
    assert_eq!(outcome, FailOutcome::Failed, "exit is not retried when retry.on leaves it out");
    // OOM is: twice retried, then failed (3 attempts).
    let oom = q.push(spec).await.unwrap();
    for attempt in 1..=3u32 {
        let lease = reserve_one(q.as_ref(), &queue).await;
        assert_eq!((lease.id(), lease.attempt()), (&oom, attempt));
        let outcome = q.fail(&lease, Failure::new(FailureKind::Oom, "CUDA out of memory")).await.unwrap();
        let want = if attempt < 3 { FailOutcome::Requeued } else { FailOutcome::Failed };
        assert_eq!(outcome, want, "attempt {attempt}");
    }
    let record = q.get(&oom).await.unwrap();
    assert_eq!((record.state, record.attempt, record.errors.len()), (JobState::Failed, 3, 3));
    // Refused at push: a kind that cannot be retried, and both limits at once.
    let mut bad = job(&queue);
    bad.retry = Some(crate::RetryPolicy { on: vec![FailureKind::Setup], max: 1, backoff: None, factor: None });
    assert!(matches!(q.push(bad).await, Err(Error::InvalidJob(m)) if m.contains("retry.on")));
    let mut both = job(&queue).with_max_attempts(3);
    both.retry = Some(crate::RetryPolicy { on: vec![], max: 1, backoff: None, factor: None });
    assert!(matches!(q.push(both).await, Err(Error::InvalidJob(m)) if m.contains("not both")));
}

/// A sweep's runs (`gpupool sweep`): each job keeps its sweep through
/// push, `get`, `list` and a lease; pushing the sweep again adds nothing
/// (its runs' idempotency keys).
pub async fn sweep_runs(q: Arc<dyn Queue>) {
    let queue = unique_queue("sweep");
    let config = serde_json::json!({
        "method": "grid", "program": "train.py", "git_ref": "main", "queue": queue,
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {"lr": {"values": [0.1, 0.01]}, "bs": {"values": [16, 32, 64]}}
    });
    let sweep = crate::sweep::Sweep::from_value(&config).unwrap();
    let jobs = sweep.jobs().unwrap();
    let mut ids = Vec::new();
    for job in jobs.clone() {
        ids.push(q.push(job).await.unwrap());
    }
    for job in jobs.clone() {
        assert!(matches!(q.add(job).await.unwrap(), crate::Pushed::Existing(_)), "pushed again: nothing added");
    }
    let record = q.get(&ids[4]).await.unwrap();
    assert_eq!(record.spec, jobs[4], "the job reads back as pushed");
    let sweep_ref = record.spec.sweep.expect("its sweep");
    assert_eq!((sweep_ref.id.as_str(), sweep_ref.index), (sweep.id.as_str(), 4));
    let filter = ListFilter { queue: Some(queue.clone()), ..ListFilter::default() };
    let listed = q.list(&filter).await.unwrap();
    assert_eq!(listed.len(), 6);
    assert!(listed.iter().all(|j| j.spec.sweep.as_ref().is_some_and(|s| s.id == sweep.id)));
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.job.spec.sweep.as_ref().map(|s| s.index), Some(0), "the first point first");
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// How far apart this process's clock and a backend's (a server on this
/// host) may be in the timing checks below.
const CLOCK_SLACK_MS: i64 = 250;

/// Reserves from `queue`, waiting up to `wait`, and checks the job came no
/// earlier than its `not_before`.
async fn reserve_when_due(q: &dyn Queue, queue: &str, wait: Duration, not_before: Timestamp) -> Lease {
    let lease = q.reserve(&req(queue).wait(wait)).await.unwrap().expect("the job, once due, within the wait");
    let now = Timestamp::now();
    assert!(now.0 >= not_before.0 - CLOCK_SLACK_MS, "reserved {} ms before its start", not_before.0 - now.0);
    lease
}

/// `not_before`: a job pushed for later is not reserved before then (a
/// job pushed after it, for now, is), reads back with its start, and comes
/// to a reserve that was already waiting when its time comes.
pub async fn delayed_start(q: Arc<dyn Queue>) {
    if !q.capabilities().delays {
        return;
    }
    let queue = unique_queue("later");
    let mut later = job(&queue);
    let start = Timestamp::now().plus(Duration::from_millis(1500));
    later.not_before = Some(start);
    let later_id = q.push(later.clone()).await.unwrap();
    let now_id = q.push(job(&queue)).await.unwrap();
    let record = q.get(&later_id).await.unwrap();
    assert_eq!(record.spec, later, "not_before reads back as pushed");
    assert_eq!(record.waits_until(), Some(start));
    let queued = ListFilter { state: Some(JobState::Queued), queue: Some(queue.clone()), ..ListFilter::default() };
    let listed: Vec<JobId> = q.list(&queued).await.unwrap().into_iter().map(|j| j.id).collect();
    assert!(listed.contains(&later_id), "a job held back lists as queued: {listed:?}");
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &now_id, "the job for now first, though pushed later");
    q.complete(&lease, Completion::default()).await.unwrap();
    assert_empty(q.as_ref(), &queue).await;
    let lease = reserve_when_due(q.as_ref(), &queue, Duration::from_secs(10), start).await;
    assert_eq!(lease.id(), &later_id);
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// `retry.backoff` and `retry.factor`: a failure the policy retries holds
/// the job back for `backoff × factor^(attempt − 1)`, which the record
/// shows; a lost lease is retried at once.
pub async fn retry_backoff(q: Arc<dyn Queue>) {
    if !q.capabilities().delays {
        return;
    }
    let queue = unique_queue("backoff");
    let mut spec = job(&queue);
    spec.retry = Some(crate::RetryPolicy {
        on: vec![FailureKind::Oom],
        max: 3,
        backoff: Some(Duration::from_millis(600)),
        factor: Some(2.0),
    });
    let id = q.push(spec).await.unwrap();
    for (attempt, wait_ms) in [(1u32, 600i64), (2, 1200)] {
        let lease = q.reserve(&req(&queue).wait(Duration::from_secs(10))).await.unwrap().expect("the job");
        assert_eq!((lease.id(), lease.attempt()), (&id, attempt));
        let failed_at = Timestamp::now();
        assert_eq!(
            q.fail(&lease, Failure::new(FailureKind::Oom, "CUDA out of memory")).await.unwrap(),
            FailOutcome::Requeued
        );
        let start = q.get(&id).await.unwrap().waits_until().expect("a queued job held back by its backoff");
        let held = start.0 - failed_at.0;
        assert!(
            (wait_ms - CLOCK_SLACK_MS..=wait_ms + 2 * CLOCK_SLACK_MS).contains(&held),
            "attempt {attempt}: held back {held} ms, not about {wait_ms} ms"
        );
        assert_empty(q.as_ref(), &queue).await;
        let lease = reserve_when_due(q.as_ref(), &queue, Duration::from_secs(10), start).await;
        assert_eq!(lease.attempt(), attempt + 1);
        q.release(&lease).await.unwrap();
    }
    // A lost lease is not the job's doing: no backoff.
    let lease = q.reserve(&req(&queue).lease(SHORT_LEASE)).await.unwrap().expect("the job");
    tokio::time::sleep(SHORT_LEASE + Duration::from_millis(300)).await;
    let again = q.reserve(&req(&queue).wait(Duration::from_secs(5))).await.unwrap().expect("the job, at once");
    assert_eq!((again.id(), again.attempt()), (&id, lease.attempt() + 1));
    q.complete(&again, Completion::default()).await.unwrap();
}

/// `defer`: the job goes back uncharged and no reserve returns it before
/// the time given, which its record shows; a stale lease cannot defer.
pub async fn defer_holds_a_job_back(q: Arc<dyn Queue>) {
    if !q.capabilities().delays {
        return;
    }
    let queue = unique_queue("defer");
    let id = q.push(job(&queue)).await.unwrap();
    let lease = reserve_one(q.as_ref(), &queue).await;
    let pause = Duration::from_millis(1200);
    let deferred_at = Timestamp::now();
    q.defer(&lease, pause).await.unwrap();
    let record = q.get(&id).await.unwrap();
    assert_eq!((record.state, record.attempt), (JobState::Queued, 0));
    let until = record.waits_until().expect("its earliest start");
    let held = until.0 - deferred_at.0;
    assert!((1200 - CLOCK_SLACK_MS..=1200 + 2 * CLOCK_SLACK_MS).contains(&held), "held back {held} ms, not 1200");
    assert_lease_lost(q.defer(&lease, pause).await, "defer");
    assert_empty(q.as_ref(), &queue).await;
    let lease = reserve_when_due(q.as_ref(), &queue, Duration::from_secs(10), until).await;
    assert_eq!((lease.id(), lease.attempt()), (&id, 1), "deferring charged no attempt");
    q.complete(&lease, Completion::default()).await.unwrap();
}

/// `after` ([`crate::after`]): the ids must exist at push; a job waits
/// while one it runs after is queued or running, runs once all have
/// succeeded, and is cancelled, saying why, when one failed (unless
/// `after_any`). The sweep form names every run of the sweep.
pub async fn after_waits_for_its_jobs(q: Arc<dyn Queue>) {
    use crate::after::{Gate, gate, resolve};
    let queue = unique_queue("after");
    let missing = crate::After::Jobs(vec![JobId::new("999999999")]);
    assert!(matches!(resolve(q.as_ref(), &missing).await, Err(Error::InvalidJob(m)) if m.contains("999999999")));
    let parent = q.push(job(&queue)).await.unwrap();
    let doomed = q.push(job(&queue).with_max_attempts(1)).await.unwrap();
    let after = |ids: &[&JobId], any: bool| {
        let mut spec = job(&queue);
        spec.after = Some(crate::After::Jobs(ids.iter().map(|id| (*id).clone()).collect()));
        spec.after_any = any;
        spec
    };
    let child = q.push(after(&[&parent], false)).await.unwrap();
    let strict = q.push(after(&[&parent, &doomed], false)).await.unwrap();
    let lenient = q.push(after(&[&parent, &doomed], true)).await.unwrap();
    let look = |id: JobId| {
        let q = Arc::clone(&q);
        async move {
            let record = q.get(&id).await.unwrap();
            assert!(record.spec.after.is_some(), "after reads back");
            gate(q.as_ref(), &record, Timestamp::now()).await.unwrap()
        }
    };
    assert!(matches!(look(child.clone()).await, Gate::Wait(_)), "the parent is queued");
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &parent);
    assert!(matches!(look(child.clone()).await, Gate::Wait(_)), "the parent is running");
    q.complete(&lease, Completion::default()).await.unwrap();
    assert_eq!(look(child.clone()).await, Gate::Run, "the parent succeeded");
    assert!(matches!(look(strict.clone()).await, Gate::Wait(_)), "one parent is still queued");
    let lease = reserve_one(q.as_ref(), &queue).await;
    assert_eq!(lease.id(), &doomed);
    q.fail(&lease, Failure::new(FailureKind::Exit, "ValueError")).await.unwrap();
    match look(strict).await {
        Gate::Cancel(why) => assert!(why.contains(doomed.as_str()) && why.contains("failed"), "{why}"),
        other => panic!("a parent failed: expected a cancel, got {other:?}"),
    }
    assert_eq!(look(lenient).await, Gate::Run, "after_any runs once all have ended");
    // The sweep form: every run of the sweep, by id.
    let config = serde_json::json!({
        "method": "grid", "program": "train.py", "git_ref": "main", "queue": queue,
        "parameters": {"lr": {"values": [0.1, 0.01]}}
    });
    let sweep = crate::sweep::Sweep::from_value(&config).unwrap();
    let mut runs = Vec::new();
    for job in sweep.jobs().unwrap() {
        runs.push(q.push(job).await.unwrap());
    }
    let resolved = resolve(q.as_ref(), &crate::After::Sweep { sweep: sweep.id.clone() }).await.unwrap();
    assert_eq!(resolved, crate::After::Jobs(runs));
}

/// [`crate::Blobs`], where the backend has it: bytes of every value, in
/// several pieces' worth, read back exactly; an unknown hash reads `None`;
/// storing a hash again changes nothing. A job naming a snapshot keeps it.
pub async fn blobs_round_trip(q: Arc<dyn Queue>) {
    let Some(blobs) = q.blobs() else { return };
    let hash = format!("{:0>40}", unique_suffix());
    let bytes: Vec<u8> = (0..(crate::BLOB_PIECE_BYTES * 2 + 12_345)).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(blobs.get_blob(&hash).await.unwrap(), None, "nothing stored yet");
    blobs.put_blob(&hash, &bytes).await.unwrap();
    blobs.put_blob(&hash, &bytes).await.unwrap();
    assert!(blobs.get_blob(&hash).await.unwrap() == Some(bytes), "read back byte for byte");
    let small = format!("{:0>40}", unique_suffix());
    blobs.put_blob(&small, b"\0\x01\xff").await.unwrap();
    assert_eq!(blobs.get_blob(&small).await.unwrap().as_deref(), Some(&b"\0\x01\xff"[..]));
    let empty = format!("{:0>40}", unique_suffix());
    blobs.put_blob(&empty, b"").await.unwrap();
    assert_eq!(blobs.get_blob(&empty).await.unwrap(), Some(Vec::new()), "an empty blob is stored too");
    let base = "0123456789abcdef0123456789abcdef01234567".to_owned();
    let queue = unique_queue("snap");
    let mut spec = JobSpec::new(base.clone(), "train.py").with_queue(&queue);
    spec.snapshot = Some(crate::SnapshotRef { base, hash: hash.clone(), bytes: 2 });
    let id = q.push(spec.clone()).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().spec, spec, "the job keeps its snapshot");
}
