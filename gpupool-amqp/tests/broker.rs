//! Tests that change the shared broker, one at a time, each restoring what
//! it changed (even when it fails):
//!
//! - a 90 s run under a 5 s `consumer_timeout` runs exactly once;
//! - `rabbitmqctl stop_app` / `start_app` mid-run: the worker reconnects by
//!   itself, no job is lost, and any job run twice is counted and reported.
//!
//! Both need `rabbitmqctl` (on this project's machines, and in CI).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpupool_amqp::AmqpQueue;
use gpupool_core::{JobSpec, JobState, ListFilter, Queue};
use gpupool_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// These tests drive the local broker with `rabbitmqctl`, so they run only
/// against the broker `GPUPOOL_TEST_AMQP_URL` names (never a container).
fn local_url(tag: &str) -> Option<String> {
    gpupool_core::conformance::service_url("GPUPOOL_TEST_AMQP_URL", "RabbitMQ broker test", || None)?;
    common::url(&common::random_prefix(tag))
}

/// One broker-changing test at a time.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl is installed");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restores the broker's consumer timeout when dropped.
struct ConsumerTimeout;

impl ConsumerTimeout {
    fn set(ms: u64) -> Self {
        rabbitmqctl(&["eval", &format!("application:set_env(rabbit, consumer_timeout, {ms}).")]);
        ConsumerTimeout
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["eval", "application:set_env(rabbit, consumer_timeout, 1800000)."])
            .status();
    }
}

/// Starts the app again if a test stopped it and failed before it could.
struct AppRunning;

impl Drop for AppRunning {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl").args(["await_startup", "--timeout", "60"]).status();
    }
}

/// A repository with `job.py`: it appends its job id to `runs`, then
/// sleeps `--seconds`.
fn repo(dir: &Path, runs: &Path) -> PathBuf {
    let script = format!(
        "import os, sys, time\nwith open({:?}, 'a') as f:\n    f.write(os.environ['GPUPOOL_JOB_ID'] + '\\n')\n\
         time.sleep(float(sys.argv[sys.argv.index('--seconds') + 1]))\n",
        runs.to_str().unwrap()
    );
    gpupool_worker::testing::job_repo(dir, &script)
}

fn runs_per_job(runs: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(runs).unwrap_or_default().lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

fn worker_config(dir: &Path, repo: &Path, slots: usize) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(dir.join("data"));
    cfg.repo = Some(repo.to_string_lossy().into_owned());
    cfg.slots = slots;
    cfg.lease = Duration::from_secs(20);
    cfg.heartbeat = Duration::from_secs(2);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_second_run_under_a_five_second_consumer_timeout_runs_once() {
    let Some(url) = local_url("longrun") else { return };
    let _one = BROKER.lock().await;
    let _restore = ConsumerTimeout::set(5000);
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs.log");
    let repo = repo(tmp.path(), &runs);

    // The worker connects after the timeout is set: its channels get 5 s.
    let q = AmqpQueue::connect(&url).await.unwrap();
    let id = q.push(JobSpec::new("main", "job.py").arg("seconds", 90)).await.unwrap();
    let mut cfg = worker_config(tmp.path(), &repo, 1);
    cfg.burst = true;
    let started = Instant::now();
    Worker::new(Arc::new(q.clone()), cfg).run(CancellationToken::new()).await.unwrap();
    let took = started.elapsed();

    let job = q.get(&id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1), "{job:?}");
    let counts = runs_per_job(&runs);
    assert_eq!(counts.get(id.as_str()), Some(&1), "the job counted its own executions: {counts:?}");
    assert!(took >= Duration::from_secs(90), "it really ran 90 s ({took:?})");
    println!("90 s run under consumer_timeout=5s: 1 execution, {took:?}");
    q.delete_queues().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_rides_out_a_broker_restart() {
    const JOBS: usize = 12;
    let Some(url) = local_url("restart") else { return };
    let _one = BROKER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs.log");
    let repo = repo(tmp.path(), &runs);
    let q = AmqpQueue::connect(&url).await.unwrap();
    for _ in 0..JOBS {
        q.push(JobSpec::new("main", "job.py").arg("seconds", 0.5)).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let worker =
        tokio::spawn(Worker::new(Arc::new(q.clone()), worker_config(tmp.path(), &repo, 2)).run(shutdown.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let guard = AppRunning;
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    drop(guard);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = q
            .list(&ListFilter { state: Some(JobState::Succeeded), limit: 100, ..ListFilter::default() })
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        if done == JOBS {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of {JOBS} succeeded after the restart");
        assert!(!worker.is_finished(), "the worker stopped");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    let all = q.list(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), JOBS, "no job lost");
    let counts = runs_per_job(&runs);
    assert_eq!(counts.len(), JOBS, "every job ran");
    let twice: Vec<String> =
        counts.iter().filter(|(_, n)| **n > 1).map(|(id, n)| format!("job {id}: {n} runs")).collect();
    println!("broker restart: {JOBS} jobs succeeded; {} ran more than once {twice:?}", twice.len());
    q.delete_queues().await.unwrap();
}
