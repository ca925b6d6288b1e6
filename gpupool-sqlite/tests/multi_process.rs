//! Several worker processes on one host share one queue file: they open a
//! new file at the same time (racing the migration), push, and drain it
//! together. Every job must run exactly once.
//!
//! The child processes are this test binary itself, run with `--ignored
//! --exact child_process` and the file to use in the environment.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use gpupool_core::{Completion, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_sqlite::SqliteQueue;

const CHILDREN: usize = 4;
const JOBS_PER_CHILD: usize = 50;
const ENV_URL: &str = "GPUPOOL_TEST_CHILD_URL";
const ENV_OUT: &str = "GPUPOOL_TEST_CHILD_OUT";

#[test]
fn several_processes_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared/queue.db", dir.path().display());
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|i| {
            let out = dir.path().join(format!("child-{i}.txt"));
            let child = Command::new(&exe)
                .args(["--ignored", "--exact", "child_process", "--nocapture", "--test-threads=1"])
                .env(ENV_URL, &url)
                .env(ENV_OUT, &out)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let mut seen = HashSet::new();
    for (child, out) in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a child failed:\n{}", String::from_utf8_lossy(&output.stdout));
        for id in std::fs::read_to_string(out).unwrap().lines() {
            assert!(seen.insert(id.to_owned()), "job {id} ran twice");
        }
    }
    assert_eq!(seen.len(), CHILDREN * JOBS_PER_CHILD, "every job ran");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let q = SqliteQueue::connect(&url).await.unwrap();
        let all = q.list(&ListFilter { limit: 10_000, ..ListFilter::default() }).await.unwrap();
        assert_eq!(all.len(), CHILDREN * JOBS_PER_CHILD);
        assert!(all.iter().all(|r| r.state == JobState::Succeeded && r.attempt == 1));
        assert!(q.errors(None, 10).await.unwrap().is_empty());
    });
}

/// One child: open the shared file, push its jobs, then drain the queue with
/// the others, writing each job it ran to its output file.
#[test]
#[ignore = "run by several_processes_share_one_file as a child process"]
fn child_process() {
    let (Ok(url), Ok(out)) = (std::env::var(ENV_URL), std::env::var(ENV_OUT)) else {
        panic!("run only as a child of several_processes_share_one_file");
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ran = rt.block_on(async {
        let q = SqliteQueue::connect(&url).await.expect("open the shared file");
        for i in 0..JOBS_PER_CHILD {
            q.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
        }
        let req = ReserveRequest::new("default").wait(Duration::from_millis(500));
        let mut ran = Vec::new();
        while let Some(lease) = q.reserve(&req).await.unwrap() {
            ran.push(lease.id().to_string());
            q.complete(&lease, Completion::default()).await.unwrap();
        }
        ran
    });
    std::fs::write(out, ran.join("\n")).unwrap();
}

/// Many opens of one new file at once, in one process: each races the others
/// to switch the file to WAL and to migrate it, and every one must succeed.
#[test]
fn racing_opens_of_a_new_file_all_succeed() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/queue.db", dir.path().display());
            let opens: Vec<_> = (0..8)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { SqliteQueue::connect(&url).await })
                })
                .collect();
            for open in opens {
                if let Err(e) = open.await.unwrap() {
                    panic!("round {round}: {e}");
                }
            }
        }
    });
}
