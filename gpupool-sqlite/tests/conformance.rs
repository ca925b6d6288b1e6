//! The conformance suite on SQLite, each test on its own file.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use gpupool_core::Queue;
use gpupool_core::conformance as c;
use gpupool_sqlite::SqliteQueue;

async fn queue() -> (tempfile::TempDir, Arc<dyn Queue>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/queue.db", dir.path().display());
    let q = SqliteQueue::connect(&url).await.expect("open sqlite queue");
    (dir, Arc::new(q))
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_dir, q) = queue().await;
                c::$name(q).await;
            }
        )*
    };
}

conformance_tests!(
    push_reserve_complete,
    push_refuses_invalid_jobs,
    no_double_reserve,
    lease_expires,
    lease_expiry_uses_up_attempts,
    heartbeat_extends_lease,
    stale_lease_is_refused,
    failures_retry_then_fail,
    failure_kinds,
    release_charges_no_attempt,
    cancel_queued_and_running,
    retry_failed_and_cancelled,
    reserve_order,
    list_filters_and_pages,
    idempotency_key,
    gpu_requirements,
    big_jobs_are_not_starved,
    parked_jobs_wait_for_a_big_enough_worker,
    worker_registry,
    reserve_waits_for_push,
);

/// All tests against one shared file, the way several workers share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_file() {
    let (_dir, q) = queue().await;
    c::run_all(q).await;
}
