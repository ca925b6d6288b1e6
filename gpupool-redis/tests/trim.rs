//! Completed jobs' stream entries are only acknowledged; the sweep's trim
//! deletes them, and never an entry that is pending (a running job) or not
//! yet delivered.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
use gpupool_redis::RedisQueue;

async fn xlen(q: &RedisQueue) -> i64 {
    let stream = format!("{}stream:default", q.options().prefix);
    redis::cmd("XLEN").arg(&stream).query_async(&mut q.connection()).await.unwrap()
}

#[tokio::test]
async fn trim_deletes_only_entries_the_group_is_done_with() {
    let Some(q) = common::queue("trim").await else { return };
    for i in 0..3 {
        q.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
    }
    let req = ReserveRequest::new("default");
    let a = q.reserve(&req).await.unwrap().unwrap();
    let b = q.reserve(&req).await.unwrap().unwrap();
    q.complete(&b, Completion::default()).await.unwrap();
    // `a` is pending and the oldest: nothing may go.
    assert_eq!(q.trim("default").await.unwrap(), 0);
    assert_eq!(xlen(&q).await, 3);
    q.complete(&a, Completion::default()).await.unwrap();
    // Both done; the third was never delivered and stays.
    assert_eq!(q.trim("default").await.unwrap(), 2);
    assert_eq!(xlen(&q).await, 1);
    let c = q.reserve(&req).await.unwrap().unwrap();
    assert_eq!(q.trim("default").await.unwrap(), 0, "a running job's entry stays");
    q.complete(&c, Completion::default()).await.unwrap();
    assert_eq!(q.trim("default").await.unwrap(), 1);
    assert_eq!(xlen(&q).await, 0);
    // A queue with no stream yet: nothing to do.
    assert_eq!(q.trim("never-used").await.unwrap(), 0);
    common::cleanup(&q).await;
}
