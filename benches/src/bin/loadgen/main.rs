//! `loadgen`: measures one backend and prints one line per figure:
//!
//! ```text
//! BENCH backend=<scheme> figure=<name> value=<v> unit=<u> floor=<v|-> ratio=<value/floor|->
//! ```
//!
//! `cargo run --release -p gpupool-benches --bin loadgen -- --queue URL [--jobs N] [--consumers C] [--quick] [--scale]`
//!
//! Each floor is the fewest round trips the same job lifecycle needs on that
//! backend, done with the same client library in the same run (BENCHMARKS.md
//! says exactly what each does).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpupool_benches::{cleanup, fresh, scheme};
use gpupool_core::runner::{Outcome, RunResult, RunSpec, Runner, Stopper};
use gpupool_core::workspace::{Checkout, PrepareError, PrepareRequest, Workspace};
use gpupool_core::{Completion, JobSpec, JobState, ListFilter, Queue, ReserveRequest, async_trait};
use gpupool_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

mod floors;

/// How many times each push and drain figure, and its floor, is measured.
const ROUNDS: usize = 3;

struct Args {
    queue: String,
    jobs: usize,
    consumers: usize,
    quick: bool,
    scale: bool,
    /// Figure groups to run (`push`, `drain` (1 and C consumers, 1 worker
    /// with C slots), `drainc` (C consumers only), `drain1w` (the worker
    /// only), `worker`, `checkout`); empty: all.
    only: Vec<String>,
    /// Where the worker figures put the worker's files (default: a RAM disk).
    worker_dir: Option<PathBuf>,
    /// How many times each push and drain figure, and its floor, is measured.
    rounds: usize,
    /// Skip the floors (`scripts/bench-peers.sh`: the peers are the comparison).
    no_floors: bool,
}

impl Args {
    fn runs(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

fn bench(backend: &str, figure: &str, value: f64, unit: &str, floor: Option<f64>) {
    let (f, r) = match floor {
        Some(f) if f > 0.0 => (format!("{f:.1}"), format!("{:.2}", value / f)),
        _ => ("-".to_owned(), "-".to_owned()),
    };
    println!("BENCH backend={backend} figure={figure} value={value:.1} unit={unit} floor={f} ratio={r}");
}

async fn open(url: &str) -> Arc<dyn Queue> {
    let q = gpupool::connect(url).await.expect("connect");
    q.init().await.expect("init");
    q
}

fn noop(i: usize) -> JobSpec {
    JobSpec::new("main", "noop.py").arg("i", i)
}

async fn push_rate(q: &dyn Queue, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        q.push(noop(i)).await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn drain_rate(url: &str, q: &Arc<dyn Queue>, n: usize, consumers: usize) -> f64 {
    for i in 0..n {
        q.push(noop(i)).await.unwrap();
    }
    // Separate clients, as separate workers would have (memory: shared).
    let mut clients = Vec::new();
    for _ in 0..consumers {
        clients.push(if scheme(url) == "memory" { Arc::clone(q) } else { open(url).await });
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            let req = ReserveRequest::new("default");
            let mut done = 0usize;
            while let Some(lease) = c.reserve(&req).await.unwrap() {
                c.complete(&lease, Completion::default()).await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, n, "every job drained once");
    n as f64 / t.elapsed().as_secs_f64()
}

/// Code that is already there: the no-op job's "checkout" is an empty folder.
#[derive(Debug)]
struct NoCode(PathBuf);

#[async_trait]
impl Workspace for NoCode {
    async fn prepare(&self, job: &PrepareRequest<'_>) -> Result<Checkout, PrepareError> {
        Ok(Checkout { dir: self.0.clone(), commit: job.git_ref.to_owned() })
    }

    async fn remove(&self, _checkout: &Checkout) {}

    async fn changed(&self, _checkout: &Checkout) -> Result<Vec<PathBuf>, String> {
        Ok(Vec::new())
    }

    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A run that ends at once, successfully.
#[derive(Debug)]
struct NoRun;

#[async_trait]
impl Runner for NoRun {
    async fn run(&self, _spec: &RunSpec, _stop: &Stopper, launched: &CancellationToken) -> Result<RunResult, String> {
        launched.cancel();
        Ok(RunResult { outcome: Outcome::Exited(0), tail: String::new(), pid: None })
    }
}

/// `drain_per_s_1wN`: pre-pushed no-op jobs drained by one real [`Worker`]
/// with `slots` slots (heartbeats, result journal with its fsync, the
/// outputs folder, the record of each run), with a workspace and runner
/// that do nothing, so no git and no process. Its files go in `dir` (see
/// [`worker_files`]).
async fn worker_drain_rate(url: &str, q: &Arc<dyn Queue>, n: usize, slots: usize, dir: &Path) -> f64 {
    for i in 0..n {
        q.push(noop(i)).await.unwrap();
    }
    let wq = if scheme(url) == "memory" { Arc::clone(q) } else { open(url).await };
    let data = tempfile::tempdir_in(dir).unwrap();
    let code = data.path().join("code");
    std::fs::create_dir(&code).unwrap();
    let mut cfg = WorkerConfig::new(data.path().join("data"));
    cfg.slots = slots;
    cfg.burst = true;
    // The workspace ignores it, but the worker asks every job for a repo.
    cfg.repo = Some(code.display().to_string());
    let worker = Worker::builder(wq, cfg).workspace(Arc::new(NoCode(code))).runner(Arc::new(NoRun)).build();
    let t = Instant::now();
    let summary = worker.run(CancellationToken::new()).await.unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(summary.reserved, n as u64, "every job reserved once");
    let jobs = gpupool_core::all_jobs(q.as_ref(), &ListFilter::default()).await.unwrap();
    if let Some(bad) = jobs.iter().find(|j| j.state != JobState::Succeeded) {
        let full = q.get(&bad.id).await.unwrap();
        panic!("job {} ended {:?}: {:?}", bad.id, bad.state, full.errors);
    }
    assert_eq!(jobs.len(), n, "every job succeeded");
    rate
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A repository with `probe` (an argument file for the native probe),
/// `noop.py` and `sleep.py`.
fn make_repo(dir: &Path, files: usize) -> PathBuf {
    let path = dir.join("repo");
    let repo = git2::Repository::init(&path).unwrap();
    std::fs::write(path.join("probe"), "probe\n").unwrap();
    std::fs::write(path.join("noop.py"), "pass\n").unwrap();
    std::fs::write(path.join("sleep.py"), "import time\ntime.sleep(3)\n").unwrap();
    let mut index = repo.index().unwrap();
    for p in ["probe", "noop.py", "sleep.py"] {
        index.add_path(Path::new(p)).unwrap();
    }
    // Some weight for the checkout figure.
    std::fs::create_dir_all(path.join("src")).unwrap();
    for i in 0..files {
        let f = format!("src/module_{i:04}.py");
        std::fs::write(path.join(&f), format!("# module {i}\n{}\n", "x = 1\n".repeat(200))).unwrap();
        index.add_path(Path::new(&f)).unwrap();
    }
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("bench", "bench@example.com").unwrap();
    repo.commit(Some("refs/heads/main"), &sig, &sig, "bench", &tree, &[]).unwrap();
    path
}

/// A worker in a child process (this binary, `--worker`), so its memory is
/// its own.
fn spawn_worker(url: &str, repo: &Path, data: &Path, slots: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--worker", url, repo.to_str().unwrap(), data.to_str().unwrap(), &slots.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_for(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

async fn worker_figures(backend: &str, url: &str, args: &Args, dir: &Path) {
    let repo = make_repo(&dir.join("w"), 10);
    let data = dir.join("w/data");
    let q = open(url).await;
    let mut child = spawn_worker(url, &repo, &data, 8);
    // Warm up: the first job fills the mirror.
    let probe_dir = dir.join("probes");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let probe_job = |out: &Path| {
        let mut spec = JobSpec::new("main", "probe");
        spec.args.insert("out".into(), out.to_string_lossy().into_owned().into());
        spec
    };
    let warm = probe_dir.join("warm");
    q.push(probe_job(&warm)).await.unwrap();
    assert!(wait_for(Duration::from_secs(60), async || warm.exists()).await, "the worker ran the warm-up job");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Idle RSS, and an idle SQL worker's queries per second.
    let idle_rss = rss_kib(child.id()) / 1024.0;
    bench(backend, "worker_rss_idle", idle_rss, "MB", None);
    if matches!(backend, "mysql" | "mariadb") {
        let window = if args.quick { 5 } else { 10 };
        let qps = floors::mysql_questions_per_s(url, Duration::from_secs(window)).await;
        bench(backend, "idle_worker_queries_per_s", qps, "q/s", None);
    }

    // Dispatch: push → the native probe's first instruction.
    let samples = if args.quick { 40 } else { 200 };
    let mut lat = Vec::new();
    for i in 0..samples {
        let out = probe_dir.join(format!("p{i}"));
        let t0 = now_ns();
        q.push(probe_job(&out)).await.unwrap();
        assert!(wait_for(Duration::from_secs(30), async || out.exists()).await, "probe {i} ran");
        let started: u128 = std::fs::read_to_string(&out).unwrap().trim().parse().unwrap();
        lat.push((started.saturating_sub(t0)) as f64 / 1e6);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bench(backend, "dispatch_ms_p50", percentile(&mut lat, 0.5), "ms", None);
    bench(backend, "dispatch_ms_p99", percentile(&mut lat, 0.99), "ms", None);

    // Job overhead: a trivial python3 job end to end vs the same command spawned directly.
    let n = if args.quick { 5 } else { 20 };
    let mut through = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let id = q.push(JobSpec::new("main", "noop.py").with_queue("default")).await.unwrap();
        assert!(
            wait_for(Duration::from_secs(30), async || q
                .get(&id)
                .await
                .map(|j| j.state.is_terminal())
                .unwrap_or(false))
            .await
        );
        through.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut direct = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        Command::new("python3").arg(repo.join("noop.py")).status().unwrap();
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (a, b) = (percentile(&mut through, 0.5), percentile(&mut direct, 0.5));
    bench(backend, "job_overhead_ms", a - b, "ms", None);
    bench(backend, "job_end_to_end_ms", a, "ms", Some(b));

    // RSS with 8 jobs running.
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(q.push(JobSpec::new("main", "sleep.py")).await.unwrap());
    }
    let eight = wait_for(Duration::from_secs(30), async || {
        q.list(&ListFilter { state: Some(JobState::Running), limit: 100, ..ListFilter::default() })
            .await
            .map(|v| v.len() >= 8)
            .unwrap_or(false)
    })
    .await;
    if eight {
        tokio::time::sleep(Duration::from_millis(500)).await;
        bench(backend, "worker_rss_8_running", rss_kib(child.id()) / 1024.0, "MB", None);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn checkout_figure(backend: &str, dir: &Path, quick: bool) {
    let base = dir.join("co");
    let repo = make_repo(&base, 500);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ws = gpupool_worker::GitWorkspace::new(base.join("data"), gpupool_worker::Credentials::default());
    let url = repo.to_string_lossy().into_owned();
    let sha = git2::Repository::open(&repo).unwrap().revparse_single("main").unwrap().id().to_string();
    // Cache the mirror (one fetch), then time checkouts of the commit.
    let first = rt
        .block_on(ws.prepare(&PrepareRequest {
            repo: &url,
            git_ref: "main",
            entrypoint: "noop.py",
            label: "warm",
            snapshot: None,
        }))
        .unwrap();
    rt.block_on(ws.remove(&first));
    // Ours and the git CLI's alternate, so that a slow stretch of the
    // shared disk falls on both.
    let n = if quick { 9 } else { 21 };
    let (mut ours, mut git) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        let c = rt
            .block_on(ws.prepare(&PrepareRequest {
                repo: &url,
                git_ref: &sha,
                entrypoint: "noop.py",
                label: &format!("b{i}"),
                snapshot: None,
            }))
            .unwrap();
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        rt.block_on(ws.remove(&c));

        let wt = base.join(format!("wt{i}"));
        let t = Instant::now();
        let ok = Command::new("git")
            .args(["-C", repo.to_str().unwrap(), "worktree", "add", "--quiet", "--detach", wt.to_str().unwrap(), &sha])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        git.push(t.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            return;
        }
        let _ = Command::new("git")
            .args(["-C", repo.to_str().unwrap(), "worktree", "remove", "--force", wt.to_str().unwrap()])
            .status();
    }
    bench(backend, "checkout_ms", percentile(&mut ours, 0.5), "ms", Some(percentile(&mut git, 0.5)));
}

async fn scale_figures(backend: &str, url: &str) {
    let q = open(url).await;
    let reserve_ms = |q: Arc<dyn Queue>| async move {
        let mut v = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().unwrap();
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            q.complete(&lease, Completion::default()).await.unwrap();
        }
        percentile(&mut v, 0.5)
    };
    for i in 0..1000 {
        q.push(noop(i)).await.unwrap();
    }
    let small = reserve_ms(Arc::clone(&q)).await;
    for i in 0..99_000 {
        q.push(noop(i)).await.unwrap();
    }
    let big = reserve_ms(Arc::clone(&q)).await;
    bench(backend, "reserve_ms_100k_queued", big, "ms", Some(small));
    let t = Instant::now();
    let page = q.list(&ListFilter::default()).await.unwrap();
    assert_eq!(page.len(), 100);
    bench(backend, "jobs_page_ms_100k", t.elapsed().as_secs_f64() * 1000.0, "ms", None);
    // What a user waits for: `gpupool jobs` (a process that connects,
    // reads a page and prints it), if the CLI was built beside loadgen.
    let cli = std::env::current_exe().unwrap().with_file_name("gpupool");
    if cli.exists() {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let out = Command::new(&cli).arg("jobs").env("GPUPOOL_QUEUE", url).output().unwrap();
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(out.status.success(), "gpupool jobs: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout.len() > 1000, "gpupool jobs printed a page");
        }
        bench(backend, "cli_jobs_ms_100k", percentile(&mut v, 0.5), "ms", None);
    } else {
        eprintln!("no {} (cargo build --release -p gpupool-cli): cli_jobs_ms_100k skipped", cli.display());
    }
}

/// The job command of the benchmark's worker: the tiny `probe` built beside
/// loadgen (`cargo build --release -p gpupool-benches --bins`), or, without
/// it, this binary in `--probe` mode (a bigger program: its start-up adds
/// about half a millisecond to the dispatch figure).
fn probe_command() -> Vec<String> {
    let me = std::env::current_exe().unwrap();
    let probe = me.with_file_name("probe");
    if probe.exists() {
        vec![probe.to_string_lossy().into_owned()]
    } else {
        vec![me.to_string_lossy().into_owned(), "--probe".into()]
    }
}

/// The drain figures: `drain_per_s_1c` and `_Cc` (the `drain` group, or
/// only `_Cc` for `drainc`), each beside its floor unless `--no-floors`,
/// and `drain_per_s_1wC` (`drain` or `drain1w`).
async fn drain_figures(args: &Args, backend: &str, dir: &Path) {
    let mut drain_floor_c = None;
    let counts = match (args.runs("drain"), args.runs("drainc")) {
        (true, _) => vec![1, args.consumers],
        (false, true) => vec![args.consumers],
        (false, false) => Vec::new(),
    };
    for consumers in counts {
        let (mut drain, mut drain_floor) = (0f64, None::<f64>);
        for _ in 0..args.rounds {
            let url = fresh(&args.queue, "drain", dir);
            let q = open(&url).await;
            drain = drain.max(drain_rate(&url, &q, args.jobs, consumers).await);
            cleanup(&url).await;
            if !args.no_floors {
                let f = floors::drain(&args.queue, args.jobs, consumers, dir).await;
                drain_floor = f.map(|f| drain_floor.map_or(f, |p| p.max(f)));
            }
        }
        bench(backend, &format!("drain_per_s_{consumers}c"), drain, "jobs/s", drain_floor);
        drain_floor_c = drain_floor;
    }
    // One worker process with C slots, beside C consumers: the shape
    // of a peer's single worker running C jobs at a time. Its floor is
    // the C-consumer floor, when that ran.
    if args.runs("drain") || args.runs("drain1w") {
        let jobs = args.jobs;
        let mut drain = 0f64;
        for _ in 0..args.rounds {
            let url = fresh(&args.queue, "drain1w", dir);
            let q = open(&url).await;
            let wdir = worker_files(args);
            drain = drain.max(worker_drain_rate(&url, &q, jobs, args.consumers, wdir.path()).await);
            cleanup(&url).await;
        }
        bench(backend, &format!("drain_per_s_1w{}", args.consumers), drain, "jobs/s", drain_floor_c);
    }
}

/// Where a worker's files go in the worker figures: a RAM disk where there
/// is one (`--worker-dir DIR` chooses). This VM's shared disk has stretches
/// where creating 13 small files takes 10 ms instead of 0.2 ms, and every
/// file or folder created there takes 0.6–0.9 ms (strace), which would make
/// these figures the disk's, not the queue's.
fn worker_files(args: &Args) -> tempfile::TempDir {
    match &args.worker_dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm").unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        queue: String::new(),
        jobs: 2000,
        consumers: 8,
        quick: false,
        scale: false,
        only: Vec::new(),
        worker_dir: None,
        rounds: ROUNDS,
        no_floors: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--queue" => a.queue = it.next().expect("--queue URL"),
            "--jobs" => a.jobs = it.next().and_then(|v| v.parse().ok()).expect("--jobs N"),
            "--consumers" => a.consumers = it.next().and_then(|v| v.parse().ok()).expect("--consumers C"),
            "--quick" => a.quick = true,
            "--scale" => a.scale = true,
            "--rounds" => a.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--no-floors" => a.no_floors = true,
            "--worker-dir" => a.worker_dir = Some(it.next().expect("--worker-dir DIR").into()),
            "--only" => a.only = it.next().expect("--only GROUP,…").split(',').map(str::to_owned).collect(),
            other => panic!(
                "unknown argument {other}; use --queue URL [--jobs N] [--consumers C] [--quick] [--scale] \
                 [--only push,drain,drainc,drain1w,worker,checkout] [--worker-dir DIR] [--rounds N] [--no-floors]"
            ),
        }
    }
    assert!(!a.queue.is_empty(), "--queue URL is required");
    if a.quick {
        // RabbitMQ drains a few hundred jobs a second here: half as many
        // keeps it, like the others, well inside a minute.
        let cap = if matches!(scheme(&a.queue), "amqp" | "amqps") { 500 } else { 1000 };
        a.jobs = a.jobs.min(cap);
    }
    a
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // The worker's command in the benchmark: `loadgen --probe ENTRYPOINT …`.
    // The native probe writes the time it started and exits; a Python
    // entrypoint is handed to python3 (the job-overhead and RSS figures).
    if argv.get(1).map(String::as_str) == Some("--probe") {
        let entry = argv.get(2).cloned().unwrap_or_default();
        if entry.ends_with(".py") {
            let code = Command::new("python3").args(&argv[2..]).status().map(|s| s.code().unwrap_or(1)).unwrap_or(127);
            std::process::exit(code);
        }
        if let Some(i) = argv.iter().position(|a| a == "--out") {
            let started = now_ns();
            let tmp = format!("{}.tmp", argv[i + 1]);
            std::fs::write(&tmp, started.to_string()).unwrap();
            std::fs::rename(&tmp, &argv[i + 1]).unwrap();
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if argv.get(1).map(String::as_str) == Some("--worker") {
        let (url, repo, data, slots) = (&argv[2], &argv[3], &argv[4], argv[5].parse().unwrap());
        rt.block_on(async {
            let q = gpupool::connect(url).await.unwrap();
            let mut cfg = WorkerConfig::new(data);
            cfg.repo = Some(repo.clone());
            cfg.slots = slots;
            cfg.command = probe_command();
            let worker = Worker::new(q, cfg);
            worker.run(CancellationToken::new()).await.unwrap();
        });
        return;
    }
    let args = parse_args();
    if probe_command().len() > 1 && args.runs("worker") {
        eprintln!(
            "loadgen: no `probe` beside this binary (cargo build --release -p gpupool-benches --bins); \
             the dispatch figure runs loadgen itself as the job, which starts slower"
        );
    }
    let backend = scheme(&args.queue).to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    rt.block_on(async {
        // Each figure and its floor run ROUNDS times, interleaved, and the
        // best of each is kept: this machine is shared and noisy.
        let (mut push, mut push_floor) = (0f64, None::<f64>);
        for _ in 0..if args.runs("push") { args.rounds } else { 0 } {
            let url = fresh(&args.queue, "push", dir);
            let q = open(&url).await;
            push = push.max(push_rate(q.as_ref(), args.jobs).await);
            cleanup(&url).await;
            if !args.no_floors {
                let f = floors::push(&args.queue, args.jobs, dir).await;
                push_floor = f.map(|f| push_floor.map_or(f, |p| p.max(f)));
            }
        }
        if args.runs("push") {
            bench(&backend, "push_per_s", push, "jobs/s", push_floor);
        }

        drain_figures(&args, &backend, dir).await;
        if backend != "memory" && args.runs("worker") {
            let url = fresh(&args.queue, "worker", dir);
            // The worker's repository, mirror, checkouts and logs go on a
            // RAM disk (worker_files). checkout_ms stays on the disk, beside
            // the git CLI on the same disk.
            let wdir = worker_files(&args);
            eprintln!("loadgen: worker figures with the worker's files in {}", wdir.path().display());
            worker_figures(&backend, &url, &args, wdir.path()).await;
            cleanup(&url).await;
        }
        if args.scale && matches!(backend.as_str(), "sqlite" | "mysql" | "mariadb") {
            let url = fresh(&args.queue, "scale", dir);
            scale_figures(&backend, &url).await;
            cleanup(&url).await;
        }
    });
    if args.runs("checkout") {
        checkout_figure(&backend, dir, args.quick);
    }
}
