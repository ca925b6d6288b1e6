//! 8 workers, each with its own connection, drain 2,000 no-op jobs: each is
//! completed exactly once and none is left.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, JobSpec, JobState, ListFilter, Queue, ReserveRequest};

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let Some(url) = common::url(&common::random_prefix("contention")) else { return };
    let setup = AmqpQueue::connect(&url).await.unwrap();
    let pushing = Instant::now();
    for i in 0..JOBS {
        setup.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
    }
    let push_time = pushing.elapsed();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let q = AmqpQueue::connect(&url).await.unwrap();
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
    let mut by_job: HashMap<String, usize> = HashMap::new();
    for (id, _) in &runs {
        *by_job.entry(id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = by_job.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs run twice: {twice:?}");
    assert_eq!(by_job.len(), JOBS);
    let all = setup.list(&ListFilter { limit: 10_000, ..ListFilter::default() }).await.unwrap();
    assert_eq!(all.len(), JOBS);
    assert!(all.iter().all(|r| r.state == JobState::Succeeded && r.attempt == 1), "all succeeded on attempt 1");
    // Nothing left in the work queue.
    let leftover = setup.reserve(&ReserveRequest::new("default")).await.unwrap();
    assert!(leftover.is_none());
    println!(
        "{JOBS} jobs: pushed in {push_time:?} ({:.0}/s); {WORKERS} workers drained in {elapsed:?} ({:.0}/s)",
        JOBS as f64 / push_time.as_secs_f64(),
        JOBS as f64 / elapsed.as_secs_f64()
    );
    setup.delete_queues().await.unwrap();
}
