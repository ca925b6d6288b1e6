//! What a lease carries on Redis, first attempt and later: a first
//! attempt's lease is built from its stream entry alone (its `created` time
//! from the entry's id), a later one by `claim.lua` (whose reply ends
//! before the errors list on a first attempt), so both kinds of lease and
//! the creation time are checked here.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{FailOutcome, Failure, FailureKind, JobSpec, Queue, ReserveRequest, Timestamp};

#[tokio::test]
async fn a_first_lease_has_no_errors_and_a_later_one_has_the_earlier_attempts() {
    let Some(q) = common::queue("lease-reply").await else { return };
    let before = Timestamp::now();
    let mut spec = JobSpec::new("main", "train.py").with_queue("lr");
    spec.max_attempts = Some(2);
    let id = q.push(spec).await.unwrap();
    let after = Timestamp::now();
    let created = q.get(&id).await.unwrap().created_at;
    // The server's clock, read from the entry id: within the push, give or
    // take a second of clock difference between this host and the server.
    assert!(created.0 >= before.0 - 1000 && created.0 <= after.0 + 1000, "created {created:?}");

    let req = ReserveRequest::new("lr");
    let first = q.reserve(&req).await.unwrap().expect("the job");
    assert_eq!((first.attempt(), first.job.errors.len()), (1, 0));
    assert_eq!(first.job.created_at, created);
    let failure = Failure::new(FailureKind::Exit, "exited with code 3");
    assert_eq!(q.fail(&first, failure).await.unwrap(), FailOutcome::Requeued);

    let second = q.reserve(&req).await.unwrap().expect("the job again");
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.job.created_at, created);
    assert_eq!(second.job.errors.len(), 1, "the second lease carries the first attempt's error");
    assert_eq!((second.job.errors[0].attempt, second.job.errors[0].kind), (1, FailureKind::Exit));
    common::cleanup(&q).await;
}
