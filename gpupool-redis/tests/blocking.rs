//! A waiting reserve blocks in `XREADGROUP … BLOCK` longer than the driver's
//! default response timeout (500 ms): the wait must end in "nothing" or in
//! the job pushed meanwhile, never in a "timed out" error (which made an
//! idle worker log a failure and back off every second).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_core::{JobSpec, Queue, ReserveRequest};

#[tokio::test]
async fn a_long_wait_ends_in_none_or_the_pushed_job_not_an_error() {
    let Some(q) = common::queue("blocking").await else { return };
    let req = ReserveRequest::new("default").wait(Duration::from_millis(2500));
    let got = q.reserve(&req).await.expect("an empty wait is not an error");
    assert!(got.is_none());

    let pusher = q.clone();
    let push = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        pusher.push(JobSpec::new("main", "noop.py")).await.unwrap()
    });
    let lease = q.reserve(&req).await.expect("a wait that a push ends is not an error");
    let id = push.await.unwrap();
    assert_eq!(lease.expect("the pushed job").id(), &id);
    common::cleanup(&q).await;
}
