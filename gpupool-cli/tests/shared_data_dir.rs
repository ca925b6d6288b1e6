//! Several worker processes on one host share a data directory, and a
//! finished run's result survives its worker's crash: through the real
//! binary, with real git repositories and Python processes, on every
//! backend whose test service is configured (`GPUPOOL_TEST_MYSQL_URL`, …).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::TestQueue;

/// `job.py`: appends its job id to the file `$RAN` names, then exits 0.
const RECORD_RUN: &str = "import os\n\
    with open(os.environ['RAN'], 'a') as f:\n    f.write(os.environ['GPUPOOL_JOB_ID'] + '\\n')\n";

fn gpupool(dir: &Path, url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    cmd.args(args)
        .current_dir(dir)
        .env("GPUPOOL_QUEUE", url)
        .env("GPUPOOL_DATA_DIR", dir.join("data"))
        .env_remove("GPUPOOL_LOG")
        .env_remove("GPUPOOL_TEST_HOLD_REPORT")
        .stdin(Stdio::null());
    cmd
}

fn ok(dir: &Path, url: &str, args: &[&str]) -> Output {
    let out = gpupool(dir, url, args).output().unwrap();
    assert!(out.status.success(), "gpupool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Pushes `n` jobs that record their runs in `ran`.
fn push_jobs(dir: &Path, url: &str, ran: &Path, n: usize) {
    let jobs: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({"git_ref": "main", "entrypoint": "job.py", "gpus": 0, "args": {"i": i},
                               "env": {"RAN": ran.display().to_string()}})
        })
        .collect();
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).unwrap()).unwrap();
    ok(dir, url, &["push", "jobs.json"]);
}

fn jobs(dir: &Path, url: &str) -> Vec<serde_json::Value> {
    let out = ok(dir, url, &["jobs", "--json", "--limit", "10000"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn runs(ran: &Path) -> Vec<String> {
    std::fs::read_to_string(ran).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn repo_arg(repo: &Path) -> String {
    repo.to_str().unwrap().to_owned()
}

#[test]
fn eight_worker_processes_share_one_data_directory_and_an_unmirrored_repository() {
    for q in TestQueue::all().into_iter().filter(|q| matches!(q.name, "SQLite" | "MySQL")) {
        let tmp = tempfile::tempdir().unwrap();
        eight_workers(tmp.path(), &q.in_dir(tmp.path()));
    }
}

fn eight_workers(dir: &Path, q: &TestQueue) {
    let name = q.name;
    let repo = repo_arg(&gpupool_worker::testing::job_repo(dir, RECORD_RUN));
    let ran = dir.join("ran.txt");
    ok(dir, &q.url, &["init"]);
    push_jobs(dir, &q.url, &ran, 400);
    // All at once, on one data directory that has no mirror yet.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            gpupool(dir, &q.url, &["worker", "--repo", &repo, "--gpus", "none", "--burst"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for worker in workers {
        let out = worker.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let listed = jobs(dir, &q.url);
    assert_eq!(listed.len(), 400, "{name}");
    for job in &listed {
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{name}: {job}");
    }
    let mut ran = runs(&ran);
    assert_eq!(ran.len(), 400, "{name}: every job ran once");
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), 400, "{name}: no job ran twice");
}

/// Waits up to `limit` for `f`.
fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn a_result_journaled_before_its_worker_was_killed_is_delivered_once_on_restart() {
    for q in TestQueue::all() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let q = q.in_dir(dir);
        let name = q.name;
        let repo = repo_arg(&gpupool_worker::testing::job_repo(dir, RECORD_RUN));
        let ran = dir.join("ran.txt");
        ok(dir, &q.url, &["init"]);
        push_jobs(dir, &q.url, &ran, 1);
        let held = dir.join("held");
        let mut worker = gpupool(dir, &q.url, &["worker", "--repo", &repo, "--gpus", "none"])
            .env("GPUPOOL_TEST_HOLD_REPORT", &held)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The run ended and its result is journaled; the queue has not heard.
        wait_until(Duration::from_secs(60), "the run to end", || held.exists());
        worker.kill().unwrap(); // SIGKILL
        worker.wait().unwrap();
        assert_eq!(runs(&ran).len(), 1, "{name}");
        assert_eq!(jobs(dir, &q.url)[0]["state"], "running", "{name}: not reported yet");
        let killed: Vec<PathBuf> = entries(&dir.join("data/checkouts"));
        assert_eq!(killed.len(), 1, "{name}: the killed worker's own folder");

        // A worker started on the same data directory delivers it.
        let out = ok(dir, &q.url, &["worker", "--repo", &repo, "--gpus", "none", "--burst"]);
        let said = String::from_utf8_lossy(&out.stderr);
        let job = &jobs(dir, &q.url)[0];
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{name}: {said}");
        assert_eq!(runs(&ran).len(), 1, "{name}: no second run");
        assert!(entries(&dir.join("data/journal")).iter().all(|j| entries(j).is_empty()), "{name}: journal emptied");
        assert!(!killed[0].exists(), "{name}: the crashed worker's checkouts are removed");
    }
}

/// Forwards every connection `listener` takes to `127.0.0.1:to`.
fn forward(listener: std::net::TcpListener, to: u16) {
    for client in listener.incoming().flatten() {
        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
        for (mut from, mut into) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut into);
                let _ = into.shutdown(std::net::Shutdown::Both);
            });
        }
    }
}

#[test]
fn a_worker_started_before_its_backend_is_up_waits_for_it() {
    // A host that boots before its database: the worker waits, then works.
    for q in TestQueue::servers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let name = q.name;
        let repo = repo_arg(&gpupool_worker::testing::job_repo(dir, RECORD_RUN));
        let ran = dir.join("ran.txt");
        ok(dir, &q.url, &["init"]);
        push_jobs(dir, &q.url, &ran, 1);
        // The worker's URL names a port nothing listens on yet.
        let real: u16 = q.url.split("127.0.0.1:").nth(1).and_then(|r| r.get(..4)).unwrap().parse().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = q.url.replacen(&format!("127.0.0.1:{real}"), &format!("127.0.0.1:{port}"), 1);
        let worker = gpupool(dir, &url, &["worker", "--repo", &repo, "--gpus", "none", "--burst"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        // The backend comes up.
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || forward(listener, real));
        let out = worker.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {said}");
        assert!(said.contains("trying again in"), "{name}: it said it waits: {said}");
        let job = &jobs(dir, &q.url)[0];
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{name}: {said}");
        assert_eq!(runs(&ran).len(), 1, "{name}");
    }
}
