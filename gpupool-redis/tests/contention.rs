//! 8 workers, each with its own connections, drain 2,000 no-op jobs: each is
//! completed exactly once, none is left, and none is ever held by two
//! workers at once.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::conformance;
use gpupool_redis::RedisQueue;

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let Some(url) = common::url(&common::random_prefix("contention")) else { return };
    let setup = RedisQueue::connect(&url).await.unwrap();
    let connect = || {
        let url = url.clone();
        async move { RedisQueue::connect(&url).await.unwrap() }
    };
    let drained = conformance::drain_exactly_once(&setup, connect, JOBS, WORKERS).await;
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
    println!(
        "{JOBS} jobs, {WORKERS} workers: {:?} ({:.0} jobs/s)",
        drained.drain_time,
        JOBS as f64 / drained.drain_time.as_secs_f64()
    );
    common::cleanup(&setup).await;
}
