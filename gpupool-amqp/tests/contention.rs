//! 8 workers, each with its own connection, drain 2,000 no-op jobs: each is
//! completed exactly once and none is left.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Queue, ReserveRequest, conformance};

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let Some(url) = common::url(&common::random_prefix("contention")) else { return };
    let setup = AmqpQueue::connect(&url).await.unwrap();
    let connect = || {
        let url = url.clone();
        async move { AmqpQueue::connect(&url).await.unwrap() }
    };
    let drained = conformance::drain_exactly_once(&setup, connect, JOBS, WORKERS).await;
    // Nothing left in the work queue.
    let leftover = setup.reserve(&ReserveRequest::new("default")).await.unwrap();
    assert!(leftover.is_none());
    println!(
        "{JOBS} jobs: pushed in {:?} ({:.0}/s); {WORKERS} workers drained in {:?} ({:.0}/s)",
        drained.push_time,
        JOBS as f64 / drained.push_time.as_secs_f64(),
        drained.drain_time,
        JOBS as f64 / drained.drain_time.as_secs_f64()
    );
    setup.delete_queues().await.unwrap();
}
