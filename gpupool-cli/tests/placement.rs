//! GPU placement without a GPU: a real worker, real processes, and an
//! injected GPU inventory (the `GpuInventory` trait, not an environment
//! hack). Each job's script records the `CUDA_VISIBLE_DEVICES` it got and
//! when it started and ended.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpupool_core::gpu::{GpuInventory, GpuStatus, StaticInventory};
use gpupool_core::{FailureKind, JobSpec, JobState, ListFilter, Queue};
use gpupool_sqlite::SqliteQueue;
use gpupool_worker::{Worker, WorkerConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const JOB_PY: &str = r#"import json, os, sys, time
args = sys.argv[1:]
start = time.time()
time.sleep(float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0)
if "--oom" in args:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB", file=sys.stderr)
    sys.exit(1)
rec = {"job": os.environ["GPUPOOL_JOB_ID"], "cuda": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}
with open(os.path.join(os.environ["PLACEMENT_OUT"], rec["job"] + ".json"), "w") as f:
    json.dump(rec, f)
"#;

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    repo: PathBuf,
    out: PathBuf,
    queue: Arc<SqliteQueue>,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let repo = dir.join("repo");
    let r = git2::Repository::init(&repo).unwrap();
    std::fs::write(repo.join("job.py"), JOB_PY).unwrap();
    let mut index = r.index().unwrap();
    index.add_path(Path::new("job.py")).unwrap();
    let tree = r.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    r.commit(Some("refs/heads/main"), &sig, &sig, "job", &tree, &[]).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let queue = Arc::new(SqliteQueue::connect(&format!("sqlite://{}/q.db", dir.display())).await.unwrap());
    Setup { _tmp: tmp, dir, repo, out, queue }
}

impl Setup {
    fn config(&self, inventory: Arc<dyn GpuInventory>) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(self.dir.join("data"));
        cfg.repo = Some(self.repo.to_string_lossy().into_owned());
        cfg.gpus = inventory.status().iter().map(|g| g.index).collect();
        cfg.inventory = Some(inventory);
        cfg.burst = true;
        cfg.heartbeat = Duration::from_millis(200);
        cfg.lease = Duration::from_secs(10);
        cfg
    }

    async fn push(&self, gpus: u32, args: Value) -> String {
        let mut spec = JobSpec::new("main", "job.py");
        spec.gpus = Some(gpus);
        spec.env.insert("PLACEMENT_OUT".into(), self.out.to_string_lossy().into_owned());
        if let Value::Object(a) = args {
            spec.args = a;
        }
        self.queue.push(spec).await.unwrap().to_string()
    }

    fn record(&self, id: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.out.join(format!("{id}.json"))).unwrap()).unwrap()
    }
}

fn gpus_of(rec: &Value) -> Vec<u32> {
    let s = rec["cuda"].as_str().unwrap();
    if s.is_empty() { Vec::new() } else { s.split(',').map(|g| g.parse().unwrap()).collect() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gpu_is_double_booked_across_200_random_jobs() {
    let s = setup().await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut want = HashMap::new();
    for _ in 0..200 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let n = [1, 2, 4][(seed >> 33) as usize % 3];
        let sleep = ((seed >> 40) % 40) as f64 / 1000.0;
        want.insert(s.push(n, serde_json::json!({"sleep": sleep})).await, n);
    }
    let inventory: Arc<dyn GpuInventory> = Arc::new(StaticInventory::new(&[0, 1, 2, 3, 4, 5, 6, 7]));
    Worker::new(s.queue.clone(), s.config(inventory)).run(CancellationToken::new()).await.unwrap();

    let done = s
        .queue
        .list(&ListFilter { state: Some(JobState::Succeeded), limit: 1000, ..ListFilter::default() })
        .await
        .unwrap();
    assert_eq!(done.len(), 200, "every job ran");
    let mut per_gpu: HashMap<u32, Vec<(f64, f64, String)>> = HashMap::new();
    let mut concurrent_peak = 0;
    for (id, n) in &want {
        let rec = s.record(id);
        let gpus = gpus_of(&rec);
        assert_eq!(gpus.len(), *n as usize, "job {id} got exactly its {n} GPUs: {gpus:?}");
        let mut distinct = gpus.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), gpus.len(), "distinct GPUs");
        for g in gpus {
            per_gpu.entry(g).or_default().push((
                rec["start"].as_f64().unwrap(),
                rec["end"].as_f64().unwrap(),
                id.clone(),
            ));
        }
    }
    for (gpu, mut runs) in per_gpu {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in runs.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "GPU {gpu} given to jobs {} and {} at once", pair[0].2, pair[1].2);
        }
        concurrent_peak = concurrent_peak.max(runs.len());
    }
    assert!(concurrent_peak > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_one_gpu_jobs_does_not_starve_a_four_gpu_job() {
    let s = setup().await;
    let first = s.push(1, serde_json::json!({"sleep": 1.0})).await;
    let big = s.push(4, serde_json::json!({})).await;
    let mut small = Vec::new();
    for _ in 0..6 {
        small.push(s.push(1, serde_json::json!({"sleep": 0.2})).await);
    }
    let inventory: Arc<dyn GpuInventory> = Arc::new(StaticInventory::new(&[0, 1, 2, 3]));
    Worker::new(s.queue.clone(), s.config(inventory)).run(CancellationToken::new()).await.unwrap();
    let big_rec = s.record(&big);
    assert_eq!(gpus_of(&big_rec), [0, 1, 2, 3]);
    assert!(big_rec["start"].as_f64().unwrap() >= s.record(&first)["end"].as_f64().unwrap(), "it waited for its GPUs");
    for id in &small {
        assert!(
            s.record(id)["start"].as_f64().unwrap() >= big_rec["end"].as_f64().unwrap(),
            "1-GPU job {id} pushed after the 4-GPU job did not start before it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_busy_with_other_processes_are_skipped_and_out_of_memory_is_its_own_kind() {
    let s = setup().await;
    const GIB: u64 = 1 << 30;
    let inventory: Arc<dyn GpuInventory> = Arc::new(StaticInventory::with_status(vec![
        GpuStatus {
            index: 0,
            memory_total: 80 * GIB,
            memory_used: 70 * GIB,
            processes: vec![4242],
            ..GpuStatus::default()
        },
        GpuStatus { index: 1, memory_total: 80 * GIB, memory_used: GIB / 4, ..GpuStatus::default() },
    ]));
    let a = s.push(1, serde_json::json!({"sleep": 0.1})).await;
    let b = s.push(1, serde_json::json!({"sleep": 0.1})).await;
    let oom = s.push(1, serde_json::json!({"oom": true})).await;
    let mut cfg = s.config(inventory);
    cfg.gpu_busy_fraction = 0.1;
    Worker::new(s.queue.clone(), cfg).run(CancellationToken::new()).await.unwrap();
    assert_eq!(gpus_of(&s.record(&a)), [1], "GPU 0 is taken by someone else's process");
    assert_eq!(gpus_of(&s.record(&b)), [1]);
    let errors = s.queue.errors(Some(&oom.parse().unwrap()), 10).await.unwrap();
    assert!(!errors.is_empty() && errors.iter().all(|e| e.kind == FailureKind::Oom), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_bigger_than_any_worker_stays_queued_and_status_says_why() {
    let s = setup().await;
    let huge = s.push(8, serde_json::json!({})).await;
    let fits = s.push(2, serde_json::json!({})).await;
    let inventory: Arc<dyn GpuInventory> = Arc::new(StaticInventory::new(&[0, 1, 2, 3]));
    let mut cfg = s.config(inventory);
    cfg.burst = false;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(s.queue.clone(), cfg).run(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.queue.get(&fits.parse().unwrap()).await.unwrap().state != JobState::Succeeded {
        assert!(std::time::Instant::now() < deadline, "the 2-GPU job ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workers = s.queue.worker_registry().expect("SQLite keeps a worker registry").workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].gpus.len(), 4);
    let report = gpupool_cli::status_report(s.queue.as_ref(), "sqlite://q.db", &workers).await.unwrap();
    assert!(
        report.contains(&format!("waiting: 1 job: need 8 GPUs; the largest live worker has 4 (job {huge})")),
        "{report}"
    );
    let job = s.queue.get(&huge.parse().unwrap()).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Queued, 0), "never reserved, never bounced");
    stop.cancel();
    worker.await.unwrap().unwrap();
    assert!(
        s.queue.worker_registry().expect("SQLite keeps a worker registry").workers().await.unwrap().is_empty(),
        "a worker that stops cleanly unregisters"
    );
}

/// A batch (MySQL leases several jobs in one transaction) whose first job
/// waits for GPU memory: the jobs leased with it go back at once,
/// uncharged, and are not left leased without a heartbeat while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_leased_with_one_that_waits_for_its_gpus_go_back_uncharged() {
    let Some(base) = gpupool_core::conformance::service_url("GPUPOOL_TEST_MYSQL_URL", "MySQL", || None) else {
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}prefix=batch{}_", gpupool_core::conformance::unique_suffix());
    let s = setup().await;
    let mysql = Arc::new(gpupool_mysql::MysqlQueue::connect(&url).await.unwrap());
    let queue: Arc<dyn Queue> = mysql.clone();
    queue.init().await.unwrap();
    const GIB: u64 = 1 << 30;
    let busy = |index| GpuStatus { index, memory_total: 80 * GIB, memory_used: 70 * GIB, ..GpuStatus::default() };
    let inventory: Arc<dyn GpuInventory> = Arc::new(StaticInventory::with_status(vec![busy(0), busy(1)]));
    let mut ids = Vec::new();
    for memory in [Some(40 * 1024), None, None] {
        let mut spec = JobSpec::new("main", "job.py");
        spec.gpus = Some(1);
        spec.gpu_memory = memory;
        spec.env.insert("PLACEMENT_OUT".into(), s.out.to_string_lossy().into_owned());
        ids.push(queue.push(spec).await.unwrap());
    }
    let mut cfg = s.config(inventory);
    cfg.burst = false;
    cfg.gpu_busy_fraction = 1.0; // memory in use, not "busy": the job with 40 GiB waits
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(Arc::clone(&queue), cfg).run(stop.clone()));
    // The first job is held (running, heartbeated); the one leased with it
    // is back in the queue, uncharged, well before its lease could end.
    let mut held = false;
    for _ in 0..100 {
        let (first, second) = (queue.get(&ids[0]).await.unwrap(), queue.get(&ids[1]).await.unwrap());
        if first.state == JobState::Running && second.state == JobState::Queued {
            assert_eq!(second.attempt, 0, "given back uncharged");
            assert!(second.errors.is_empty(), "{:?}", second.errors);
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "the first job holds, the one leased with it goes back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &ids[1..] {
        let job = queue.get(id).await.unwrap();
        assert_eq!((job.state, job.attempt), (JobState::Queued, 0), "nothing else reserved while it waits");
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
    assert_eq!(queue.get(&ids[0]).await.unwrap().attempt, 0, "released at the stop, uncharged");
    mysql.drop_tables().await.unwrap();
}
