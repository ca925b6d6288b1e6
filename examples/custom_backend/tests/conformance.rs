//! The whole gpupool conformance suite on PostgreSQL. Set
//! `GPUPOOL_TEST_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/test`); unset, every test prints one
//! `skipped:` line (and fails under `GPUPOOL_REQUIRE_BACKENDS=1`). Each test
//! gets tables of its own, under a random prefix, dropped at the end.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use gpupool_core::Queue;
use gpupool_postgres_example::PgQueue;

/// A connected queue on fresh tables, or `None` (skip) without a server.
async fn setup() -> Option<(PgQueue, Arc<dyn Queue>)> {
    let base = gpupool_core::conformance::service_url("GPUPOOL_TEST_POSTGRES_URL", "PostgreSQL test", || None)?;
    let prefix = format!("t{}_", gpupool_core::conformance::unique_suffix());
    let sep = if base.contains('?') { '&' } else { '?' };
    let queue = PgQueue::connect(&format!("{base}{sep}prefix={prefix}")).await.expect("connect to the test PostgreSQL");
    queue.init().await.expect("init");
    queue.init().await.expect("init is idempotent");
    Some((queue.clone(), Arc::new(queue)))
}

async fn teardown(queue: PgQueue, _: Arc<dyn Queue>) {
    queue.drop_tables().await.expect("drop the test tables");
}

gpupool_core::conformance_tests!(setup, teardown);
