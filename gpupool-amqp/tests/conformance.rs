//! The conformance suite on RabbitMQ, each test under its own name prefix.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use gpupool_core::Queue;
use gpupool_core::conformance as c;

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(q) = common::queue(stringify!($name)).await else { return };
                let shared: Arc<dyn Queue> = Arc::new(q.clone());
                c::$name(shared).await;
                q.delete_queues().await.unwrap();
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
