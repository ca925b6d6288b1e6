//! A waiting `reserve` is woken by the NOTIFY of a push made through
//! another connection pool (another host), well before its fallback poll
//! would have looked again. Needs `GPUPOOL_TEST_POSTGRES_URL`.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
use gpupool_postgres_example::PgQueue;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_another_host_wakes_a_waiting_reserve() {
    let Some(base) = gpupool_core::conformance::service_url("GPUPOOL_TEST_POSTGRES_URL", "PostgreSQL test", || None)
    else {
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}prefix=t{}_notify_", gpupool_core::conformance::unique_suffix());
    let (worker, pusher) = (PgQueue::connect(&url).await.unwrap(), PgQueue::connect(&url).await.unwrap());
    worker.init().await.unwrap();
    let queue = gpupool_core::conformance::unique_queue("notify");

    for _ in 0..3 {
        let waiter = {
            let (worker, req) = (worker.clone(), ReserveRequest::new(&queue).wait(Duration::from_secs(10)));
            tokio::spawn(async move { (worker.reserve(&req).await, Instant::now()) })
        };
        // The waiter has looked once and now waits; without a NOTIFY it
        // would look again 500 ms after its first look.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let pushed_at = Instant::now();
        let id = pusher.push(JobSpec::new("main", "train.py").with_queue(&queue)).await.unwrap();
        let (lease, woken_at) = waiter.await.unwrap();
        let lease = lease.unwrap().expect("the pushed job");
        assert_eq!(lease.id(), &id);
        let latency = woken_at - pushed_at;
        assert!(latency < Duration::from_millis(250), "woken {latency:?} after the push: by a poll, not a NOTIFY");
        worker.complete(&lease, Completion::default()).await.unwrap();
    }
    worker.drop_tables().await.unwrap();
}
