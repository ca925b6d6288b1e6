//! Many workers on one database: 8 workers, each with its own connection
//! pool, drain 2,000 no-op jobs. Every job is completed exactly once, none is
//! left, and no job is ever held by two leases at once, as the database and a
//! record of every execution both show.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{Queue, conformance};
use gpupool_mysql::MysqlQueue;

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let prefix = common::random_prefix("contention");
    let Some(url) = common::url(&prefix) else { return };
    let setup = MysqlQueue::connect(&url).await.unwrap();
    setup.init().await.unwrap();
    // Each worker its own pool: separate connections, as separate hosts have.
    let connect = || {
        let url = url.clone();
        async move { MysqlQueue::connect(&url).await.unwrap() }
    };
    let drained = conformance::drain_exactly_once(&setup, connect, JOBS, WORKERS).await;
    let per_worker = &drained.per_worker;
    assert!(per_worker.iter().filter(|n| **n > 0).count() > 1, "the work was shared: {per_worker:?}");

    // The database: no lease left, no error record.
    let leftover: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {prefix}jobs WHERE lease_token IS NOT NULL OR state <> 'succeeded'"
    )))
    .fetch_one(setup.pool())
    .await
    .unwrap();
    assert_eq!(leftover, 0);
    assert!(setup.errors(None, 10).await.unwrap().is_empty());
    println!(
        "{JOBS} jobs, {WORKERS} workers: {:?} ({:.0} jobs/s); per worker {per_worker:?}",
        drained.drain_time,
        JOBS as f64 / drained.drain_time.as_secs_f64()
    );
    setup.drop_tables().await.unwrap();
}
