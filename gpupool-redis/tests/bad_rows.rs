//! One unreadable job does not stall a Redis queue: a job whose stored spec
//! does not read (written by hand, or by a newer gpupool) ends `failed`
//! with kind `invalid`, and the reserve moves on to the jobs behind it, on
//! a first attempt (the spec read from the stream entry) and on a later
//! one (read by `claim.lua`).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{Failure, FailureKind, JobId, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_redis::RedisQueue;

const BAD: &str = r#"{"git_ref": 7, "from": "a newer gpupool"}"#;

/// Pushes `spec` as `push.lua` would, whatever it holds.
async fn push_raw(q: &RedisQueue, queue: &str, spec: &str) -> JobId {
    let script = redis::Script::new(concat!(include_str!("../lua/prelude.lua"), "\n", include_str!("../lua/push.lua")));
    let mut c = q.connection();
    let id: String = script
        .arg(&q.options().prefix)
        .arg(spec)
        .arg(queue)
        .arg("3")
        .arg("")
        .arg("")
        .invoke_async(&mut c)
        .await
        .unwrap();
    JobId::new(id)
}

async fn assert_failed_invalid(q: &RedisQueue, bad: &JobId) {
    let errors = q.errors(Some(bad), 10).await.unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, FailureKind::Invalid);
    assert!(errors[0].message.contains("the stored job does not read"), "{}", errors[0].message);
    let listed = q.list(&ListFilter::default()).await.unwrap();
    assert!(listed.iter().all(|j| &j.id != bad), "the bad job hides nothing, and shows only through get");
    let mut c = q.connection();
    let state: String = redis::cmd("HGET")
        .arg(format!("{}job:{bad}", q.options().prefix))
        .arg("state")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(state, JobState::Failed.as_str());
}

#[tokio::test]
async fn an_unreadable_first_attempt_fails_as_invalid_and_the_reserve_moves_on() {
    let Some(q) = common::queue("bad-first").await else { return };
    let bad = push_raw(&q, "default", BAD).await;
    let good = q.push(JobSpec::new("main", "b.py")).await.unwrap();
    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job behind it");
    assert_eq!(lease.id(), &good);
    assert_failed_invalid(&q, &bad).await;
    assert!(q.reserve(&ReserveRequest::new("default")).await.unwrap().is_none(), "nothing else queued");
    common::cleanup(&q).await;
}

#[tokio::test]
async fn an_unreadable_retry_fails_as_invalid_and_the_reserve_moves_on() {
    let Some(q) = common::queue("bad-retry").await else { return };
    let mut spec = JobSpec::new("main", "a.py");
    spec.max_attempts = Some(3);
    let bad = q.push(spec).await.unwrap();
    let first = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job");
    q.fail(&first, Failure::new(FailureKind::Exit, "exit 1")).await.unwrap();
    // Rewritten behind push's back before its next attempt.
    let mut c = q.connection();
    let _: () = redis::cmd("HSET")
        .arg(format!("{}job:{bad}", q.options().prefix))
        .arg("spec")
        .arg(BAD)
        .query_async(&mut c)
        .await
        .unwrap();
    let good = q.push(JobSpec::new("main", "b.py")).await.unwrap();
    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job behind it");
    assert_eq!(lease.id(), &good);
    let errors = q.errors(Some(&bad), 10).await.unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].kind, FailureKind::Invalid, "newest first");
    common::cleanup(&q).await;
}

/// The conformance check, with jobs pushed as `push.lua` would, unchecked.
#[tokio::test]
async fn stored_jobs_are_checked_again() {
    let Some(q) = common::queue("raw").await else { return };
    let raw = q.clone();
    let store: &gpupool_core::conformance::StoreRaw = &move |queue: String, spec: String| {
        let q = raw.clone();
        Box::pin(async move { push_raw(&q, &queue, &spec).await })
    };
    gpupool_core::conformance::stored_jobs_are_checked_again(std::sync::Arc::new(q.clone()), store).await;
    common::cleanup(&q).await;
}
