//! 8 workers, each with its own connections, drain 2,000 no-op jobs: each is
//! completed exactly once, none is left, and none is ever held by two
//! workers at once.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpupool_core::{Completion, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_redis::RedisQueue;

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let Some(url) = common::url(&common::random_prefix("contention")) else { return };
    let setup = RedisQueue::connect(&url).await.unwrap();
    for i in 0..JOBS {
        setup.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let q = RedisQueue::connect(&url).await.unwrap();
            let req = ReserveRequest::new("default").worker(format!("worker-{w}")).lease(Duration::from_secs(60));
            let mut runs = Vec::new();
            while let Some(lease) = q.reserve(&req).await.unwrap() {
                q.complete(&lease, Completion::default()).await.unwrap();
                runs.push((lease.id().to_string(), w));
            }
            runs
        }));
    }
    let mut runs = Vec::new();
    for w in workers {
        runs.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    let mut by_job: HashMap<String, Vec<usize>> = HashMap::new();
    for (id, w) in &runs {
        by_job.entry(id.clone()).or_default().push(*w);
    }
    let twice: Vec<_> = by_job.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(twice.is_empty(), "jobs held twice: {twice:?}");
    assert_eq!(by_job.len(), JOBS);
    let all = setup.list(&ListFilter { limit: 10_000, ..ListFilter::default() }).await.unwrap();
    assert_eq!(all.len(), JOBS);
    assert!(all.iter().all(|r| r.state == JobState::Succeeded && r.attempt == 1));
    // Nothing left in the stream or pending in the group.
    let mut c = setup.connection();
    let stream = format!("{}stream:default", setup.options().prefix);
    setup.trim("default").await.unwrap();
    let len: i64 = redis::cmd("XLEN").arg(&stream).query_async(&mut c).await.unwrap();
    let pending: redis::Value = redis::cmd("XPENDING").arg(&stream).arg("gpupool").query_async(&mut c).await.unwrap();
    assert_eq!(len, 0, "stream drained and trimmed");
    let count: i64 = match pending {
        redis::Value::Array(v) => redis::from_redis_value(v[0].clone()).unwrap(),
        other => panic!("XPENDING: {other:?}"),
    };
    assert_eq!(count, 0, "nothing pending");
    println!("{JOBS} jobs, {WORKERS} workers: {elapsed:?} ({:.0} jobs/s)", JOBS as f64 / elapsed.as_secs_f64());
    common::cleanup(&setup).await;
}
