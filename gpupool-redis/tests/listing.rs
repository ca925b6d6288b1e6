//! Queued, running and succeeded jobs have no index on Redis: `list` reads
//! them from the streams, the group's pending entries and the id sequence.
//! These checks cover what the conformance suite does not: several queues
//! with no queue filter, pages, a job sent back to the end of its line, a
//! parked job, and a queue no worker has read yet.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{Completion, JobId, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_redis::RedisQueue;

fn job(queue: &str, i: u32) -> JobSpec {
    JobSpec::new("main", "noop.py").with_queue(queue).arg("i", i)
}

async fn ids(q: &RedisQueue, state: Option<JobState>, queue: Option<&str>, offset: u64, limit: u32) -> Vec<JobId> {
    let filter = ListFilter { state, queue: queue.map(str::to_owned), offset, limit };
    q.list(&filter).await.unwrap().into_iter().map(|r| r.id).collect()
}

#[tokio::test]
async fn queued_running_and_succeeded_are_listed_without_indexes() {
    let Some(q) = common::queue("listing").await else { return };
    // Pushed in turn: a0 b0 a1 b1 a2. Queue `b` has no group yet.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..3 {
        a.push(q.push(job("a", i)).await.unwrap());
        if i < 2 {
            b.push(q.push(job("b", i)).await.unwrap());
        }
    }
    let queued = |offset, limit| ids(&q, Some(JobState::Queued), None, offset, limit);
    assert_eq!(queued(0, 10).await, [&a[2], &b[1], &a[1], &b[0], &a[0]].map(Clone::clone));
    assert_eq!(queued(1, 2).await, [b[1].clone(), a[1].clone()]);
    assert_eq!(queued(4, 2).await, [a[0].clone()]);
    assert!(queued(5, 2).await.is_empty());
    assert_eq!(ids(&q, Some(JobState::Queued), Some("b"), 0, 10).await, [b[1].clone(), b[0].clone()]);
    // No filter: every id, newest first, counted down from the sequence.
    assert_eq!(ids(&q, None, None, 1, 2).await, [b[1].clone(), a[1].clone()]);
    assert_eq!(ids(&q, None, None, 4, 2).await, [a[0].clone()]);
    assert_eq!(ids(&q, None, Some("b"), 1, 5).await, [b[0].clone()]);

    // a0 and a1 run; a0 succeeds.
    let req = ReserveRequest::new("a");
    let first = q.reserve(&req).await.unwrap().unwrap();
    let second = q.reserve(&req).await.unwrap().unwrap();
    assert_eq!((first.id(), second.id()), (&a[0], &a[1]));
    assert_eq!(ids(&q, Some(JobState::Running), None, 0, 10).await, [a[1].clone(), a[0].clone()]);
    assert_eq!(ids(&q, Some(JobState::Running), None, 1, 10).await, [a[0].clone()]);
    assert!(ids(&q, Some(JobState::Running), Some("b"), 0, 10).await.is_empty());
    q.complete(&first, Completion::default()).await.unwrap();
    assert_eq!(ids(&q, Some(JobState::Running), None, 0, 10).await, [a[1].clone()]);
    assert_eq!(ids(&q, Some(JobState::Succeeded), None, 0, 10).await, [a[0].clone()]);
    assert_eq!(ids(&q, Some(JobState::Succeeded), Some("a"), 0, 10).await, [a[0].clone()]);
    assert!(ids(&q, Some(JobState::Succeeded), Some("b"), 0, 10).await.is_empty());

    // a1 goes back to the end of its line: last in line is listed first.
    q.release(&second).await.unwrap();
    assert!(ids(&q, Some(JobState::Running), None, 0, 10).await.is_empty());
    assert_eq!(queued(0, 10).await, [&a[1], &a[2], &b[1], &b[0]].map(Clone::clone));

    // A parked job is queued too, after those in line.
    let big = q.push(JobSpec { gpus: Some(4), ..job("a", 9) }).await.unwrap();
    let greq = ReserveRequest::new("a").gpus(4, true);
    let mut leased = Vec::new();
    while let Some(l) = q.reserve(&greq).await.unwrap() {
        let is_big = l.id() == &big;
        leased.push(l);
        if is_big {
            break;
        }
    }
    let parked = leased.pop().unwrap();
    q.park(&parked, 4).await.unwrap();
    assert_eq!(ids(&q, Some(JobState::Queued), Some("a"), 0, 10).await, std::slice::from_ref(&big));
    assert_eq!(queued(0, 10).await, [&b[1], &b[0], &big].map(Clone::clone));
    for l in leased {
        q.complete(&l, Completion::default()).await.unwrap();
    }
    assert_eq!(ids(&q, Some(JobState::Succeeded), None, 0, 2).await, [a[2].clone(), a[1].clone()]);
    assert_eq!(ids(&q, Some(JobState::Succeeded), None, 2, 2).await, [a[0].clone()]);

    // Cancelled keeps its index.
    q.request_cancel(&b[0]).await.unwrap();
    assert_eq!(ids(&q, Some(JobState::Cancelled), None, 0, 10).await, [b[0].clone()]);
    assert_eq!(queued(0, 10).await, [&b[1], &big].map(Clone::clone));
    common::cleanup(&q).await;
}

/// Entries written before gpupool put the spec in them (`job` = id only)
/// are leased with the spec from the job's hash.
#[tokio::test]
async fn an_entry_without_its_spec_is_leased_from_the_hash() {
    let Some(q) = common::queue("oldentry").await else { return };
    let id = q.push(job("default", 7)).await.unwrap();
    let p = &q.options().prefix;
    let (stream, hash) = (format!("{p}stream:default"), format!("{p}job:{id}"));
    let mut c = q.connection();
    // Replace the entry with one in the old form.
    let entry: String = redis::cmd("HGET").arg(&hash).arg("entry").query_async(&mut c).await.unwrap();
    let _: i64 = redis::cmd("XDEL").arg(&stream).arg(&entry).query_async(&mut c).await.unwrap();
    let old: String =
        redis::cmd("XADD").arg(&stream).arg("*").arg("job").arg(id.as_str()).query_async(&mut c).await.unwrap();
    let _: i64 = redis::cmd("HSET").arg(&hash).arg("entry").arg(&old).query_async(&mut c).await.unwrap();
    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job is leased");
    assert_eq!(lease.id(), &id);
    assert_eq!(lease.job.spec.args, job("default", 7).args);
    q.complete(&lease, Completion::default()).await.unwrap();
    common::cleanup(&q).await;
}
