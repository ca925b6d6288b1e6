//! `shipping`: what shipping running jobs' output costs a backend, and
//! whether it slows dispatch. Prints loadgen's `BENCH …` lines:
//!
//! - `ship_writes_per_s_per_job`, `ship_bytes_per_s_per_job`: the
//!   `RunLogs::ship` calls (each one transaction, script or pair of
//!   publishes) and their bytes, per running job, from jobs that print 20
//!   lines a second and a result line every second, through the real
//!   worker;
//! - `dispatch_ms_p50_shipping_on` / `_off`: push → the job's first
//!   instruction while six such jobs run on the same worker, with shipping
//!   on and off (the same worker, its queue's `run_logs` hidden), in
//!   interleaved rounds of one run.
//!
//! `cargo run --release -p gpupool-benches --bin shipping -- --queue URL [--secs S]`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpupool_benches::{cleanup, fresh, scheme};
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, FailOutcome, Failure, Heartbeat, JobId, JobRecord, JobSpec,
    JobState, Lease, ListFilter, LogPage, Progress, Pushed, Queue, ReserveRequest, Result, RunInfo, RunLogs,
    WorkerRegistry, async_trait,
};
use gpupool_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// A queue that counts what is shipped through it, or hides its
/// `run_logs` (shipping off).
#[derive(Debug)]
struct Counted {
    inner: Arc<dyn Queue>,
    ship: bool,
    writes: AtomicU64,
    bytes: AtomicU64,
}

#[async_trait]
impl Queue for Counted {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn init(&self) -> Result<()> {
        self.inner.init().await
    }
    async fn exists(&self) -> Result<bool> {
        self.inner.exists().await
    }
    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        self.inner.add(spec).await
    }
    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        self.inner.reserve(req).await
    }
    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        self.inner.reserve_many(req, max).await
    }
    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        self.inner.heartbeat(lease, extend).await
    }
    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        self.inner.started(lease, info).await
    }
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> {
        self.inner.complete(lease, done).await
    }
    fn completes_with_run(&self) -> bool {
        self.inner.completes_with_run()
    }
    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        self.inner.fail(lease, failure).await
    }
    async fn report_cancelled(&self, lease: &Lease, tail: String) -> Result<()> {
        self.inner.report_cancelled(lease, tail).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()> {
        self.inner.park(lease, gpus).await
    }
    async fn stop_reserving(&self, worker: &str) -> Result<()> {
        self.inner.stop_reserving(worker).await
    }
    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        self.inner.request_cancel(id).await
    }
    async fn retry(&self, id: &JobId) -> Result<()> {
        self.inner.retry(id).await
    }
    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        self.inner.list(filter).await
    }
    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        self.inner.errors(job, limit).await
    }
    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        self.inner.record_artifacts(id, artifacts).await
    }
    fn worker_registry(&self) -> Option<&dyn WorkerRegistry> {
        self.inner.worker_registry()
    }
    fn run_logs(&self) -> Option<&dyn RunLogs> {
        if self.ship && self.inner.run_logs().is_some() { Some(self) } else { None }
    }
}

#[async_trait]
impl RunLogs for Counted {
    async fn ship(&self, lease: &Lease, progress: &Progress) -> Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let result = progress.result.as_ref().map_or(0, |r| r.to_string().len());
        self.bytes.fetch_add((progress.log.len() + result) as u64, Ordering::Relaxed);
        self.inner.run_logs().expect("shipping").ship(lease, progress).await
    }
    async fn read_log(&self, id: &JobId, from: u64) -> Result<LogPage> {
        self.inner.run_logs().expect("shipping").read_log(id, from).await
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

fn bench(backend: &str, figure: &str, value: f64, unit: &str) {
    println!("BENCH backend={backend} figure={figure} value={value:.1} unit={unit} floor=- ratio=-");
}

/// The worker's command: `shipping --job ENTRY [--out F] [--secs S]`.
fn job_main(argv: &[String]) {
    let opt = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    match argv.first().map(String::as_str) {
        Some("probe") => {
            let started = now_ns();
            let out = opt("--out").expect("--out");
            std::fs::write(format!("{out}.tmp"), started.to_string()).unwrap();
            std::fs::rename(format!("{out}.tmp"), out).unwrap();
        }
        _ => {
            // A training loop's output: 20 lines a second, a result a second.
            use std::io::Write;
            let secs: f64 = opt("--secs").and_then(|s| s.parse().ok()).unwrap_or(10.0);
            let t = Instant::now();
            let mut out = std::io::stdout().lock();
            let mut step = 0u64;
            while t.elapsed().as_secs_f64() < secs {
                step += 1;
                let _ = writeln!(out, "epoch 1 step {step:6} loss {:.4} lr 0.0003", 1.0 / step as f64);
                if step.is_multiple_of(20) {
                    let _ = writeln!(out, "GPUPOOL_RESULT {{\"step\": {step}, \"loss\": {:.4}}}", 1.0 / step as f64);
                }
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn make_repo(dir: &Path) -> PathBuf {
    let path = dir.join("repo");
    let repo = git2::Repository::init(&path).unwrap();
    for f in ["probe", "chatty"] {
        std::fs::write(path.join(f), f).unwrap();
    }
    let mut index = repo.index().unwrap();
    index.add_path(Path::new("probe")).unwrap();
    index.add_path(Path::new("chatty")).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("bench", "bench@example.com").unwrap();
    repo.commit(Some("refs/heads/main"), &sig, &sig, "bench", &tree, &[]).unwrap();
    path
}

fn chatty(secs: f64) -> JobSpec {
    JobSpec::new("main", "chatty").arg("secs", secs)
}

async fn wait_for(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// A worker on `queue` (8 slots) running this binary as its command.
fn start_worker(queue: Arc<dyn Queue>, repo: &Path, data: &Path) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut cfg = WorkerConfig::new(data);
    cfg.repo = Some(repo.to_string_lossy().into_owned());
    cfg.slots = 8;
    cfg.heartbeat = Duration::from_secs(5);
    cfg.drain_timeout = Duration::from_secs(1);
    cfg.command = vec![std::env::current_exe().unwrap().to_string_lossy().into_owned(), "--job".into()];
    let stop = CancellationToken::new();
    let worker = Worker::new(queue, cfg);
    let token = stop.clone();
    (stop, tokio::spawn(async move { worker.run(token).await.map(|_| ()).unwrap() }))
}

async fn running(q: &dyn Queue) -> usize {
    q.list(&ListFilter { state: Some(JobState::Running), limit: 100, ..ListFilter::default() })
        .await
        .map_or(0, |v| v.len())
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--job") {
        job_main(&argv[2..]);
        return;
    }
    let opt = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let url = opt("--queue").expect("--queue URL");
    let secs: f64 = opt("--secs").and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let backend = scheme(&url).to_owned();
    let tmp =
        if Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }.unwrap();
    let dir = tmp.path();
    let repo = make_repo(dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // The load: four chatty jobs of `secs` seconds, shipped.
        let fresh_url = fresh(&url, "ship", dir);
        let inner = gpupool::connect(&fresh_url).await.unwrap();
        inner.init().await.unwrap();
        let q = Arc::new(Counted { inner, ship: true, writes: AtomicU64::new(0), bytes: AtomicU64::new(0) });
        let (stop, handle) = start_worker(Arc::clone(&q) as Arc<dyn Queue>, &repo, &dir.join("data-load"));
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(q.push(chatty(secs)).await.unwrap());
        }
        let all_ended = wait_for(Duration::from_secs_f64(secs * 3.0 + 30.0), async || {
            let mut ended = 0;
            for id in &ids {
                ended += usize::from(q.get(id).await.is_ok_and(|j| j.state.is_terminal()));
            }
            ended == ids.len()
        })
        .await;
        assert!(all_ended, "the chatty jobs ended");
        let job_secs = 4.0 * secs;
        bench(&backend, "ship_writes_per_s_per_job", q.writes.load(Ordering::Relaxed) as f64 / job_secs, "writes/s");
        bench(&backend, "ship_bytes_per_s_per_job", q.bytes.load(Ordering::Relaxed) as f64 / job_secs, "B/s");
        stop.cancel();
        let _ = handle.await;
        cleanup(&fresh_url).await;

        // Dispatch with six chatty jobs running, shipping on and off, in
        // interleaved rounds.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..4 {
            let ship = round % 2 == 0;
            let fresh_url = fresh(&url, "ship", dir);
            let inner = gpupool::connect(&fresh_url).await.unwrap();
            inner.init().await.unwrap();
            let q = Arc::new(Counted { inner, ship, writes: AtomicU64::new(0), bytes: AtomicU64::new(0) });
            let (stop, handle) =
                start_worker(Arc::clone(&q) as Arc<dyn Queue>, &repo, &dir.join(format!("data-{round}")));
            let mut busy = Vec::new();
            for _ in 0..6 {
                busy.push(q.push(chatty(600.0)).await.unwrap());
            }
            assert!(wait_for(Duration::from_secs(60), async || running(q.as_ref()).await >= 6).await, "six running");
            let probes = dir.join(format!("probes-{round}"));
            std::fs::create_dir_all(&probes).unwrap();
            for i in 0..25 {
                let out = probes.join(format!("p{i}"));
                let spec = JobSpec::new("main", "probe").arg("out", out.to_string_lossy().into_owned());
                let t0 = now_ns();
                q.push(spec).await.unwrap();
                assert!(wait_for(Duration::from_secs(30), async || out.exists()).await, "probe {i} ran");
                let started: u128 = std::fs::read_to_string(&out).unwrap().trim().parse().unwrap();
                let ms = started.saturating_sub(t0) as f64 / 1e6;
                if i > 0 {
                    // The first probe also fills the checkout cache.
                    if ship { on.push(ms) } else { off.push(ms) }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            for id in &busy {
                let _ = q.request_cancel(id).await;
            }
            stop.cancel();
            let _ = handle.await;
            cleanup(&fresh_url).await;
        }
        bench(&backend, "dispatch_ms_p50_shipping_on", p50(&mut on), "ms");
        bench(&backend, "dispatch_ms_p50_shipping_off", p50(&mut off), "ms");
    });
}
