//! The lease decides when Redis reclaims a dead worker's job: not the
//! `reclaim_idle` setting, and not only the first entries the pending list
//! gives.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_core::{JobSpec, Queue, ReserveRequest};
use gpupool_redis::RedisQueue;

#[tokio::test]
async fn a_short_lease_is_reclaimed_soon_after_it_expires_whatever_reclaim_idle_says() {
    let Some(base) = gpupool_core::conformance::service_url("GPUPOOL_TEST_REDIS_URL", "Redis test", || None) else {
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    // The default reclaim_idle (30 s), far longer than the lease.
    let url = format!("{base}{sep}prefix={}", common::random_prefix("bylease"));
    let q = RedisQueue::connect(&url).await.unwrap();
    q.init().await.unwrap();
    let id = q.push(JobSpec::new("main", "t.py")).await.unwrap();
    let lost = q.reserve(&ReserveRequest::new("default").lease(Duration::from_millis(1500))).await.unwrap().unwrap();
    assert_eq!(lost.id(), &id);
    // Its worker dies; 1 s after the lease ends, a reserve takes the job.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let again = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("reclaimed by its lease");
    assert_eq!((again.id(), again.attempt()), (&id, 2));
    common::cleanup(&q).await;
}

#[tokio::test]
async fn every_idle_entry_is_looked_at_not_only_the_first_ten() {
    let Some(q) = common::queue("pages").await else { return };
    let mut ids = Vec::new();
    for i in 0..13 {
        ids.push(q.push(JobSpec::new("main", "t.py").arg("i", i)).await.unwrap());
    }
    // Twelve held by a live worker with a long lease, then one whose worker dies.
    let long = ReserveRequest::new("default").lease(Duration::from_secs(60)).worker("alive:1");
    for _ in 0..12 {
        q.reserve(&long).await.unwrap().unwrap();
    }
    let short = ReserveRequest::new("default").lease(Duration::from_millis(1000)).worker("dead:2");
    let dead = q.reserve(&short).await.unwrap().unwrap();
    assert!(ids.contains(dead.id()));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let again = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the dead worker's job");
    assert_eq!((again.id(), again.attempt()), (dead.id(), 2));
    common::cleanup(&q).await;
}
