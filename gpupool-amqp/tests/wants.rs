//! A waiting reserve leaves a want in the ledger that outlives the call:
//! the next reserve picks up a job handed to it in between, and a worker
//! that unregisters gives such a job back without charging an attempt.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, JobSpec, JobState, Queue, ReserveRequest};

fn waiting(worker: &str) -> ReserveRequest {
    let mut req = ReserveRequest::new("default").worker(worker);
    req.wait = Duration::from_millis(300);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_between_reserves_is_picked_up_or_given_back() {
    let Some(url) = common::url(&common::random_prefix("wants")) else { return };
    let worker = AmqpQueue::connect(&url).await.unwrap();
    let pusher = AmqpQueue::connect(&url).await.unwrap();

    // Nothing queued: the wait runs out and the want stays in the ledger.
    assert!(worker.reserve(&waiting("host-a:1")).await.unwrap().is_none());
    let id = pusher.push(JobSpec::new("main", "t.py")).await.unwrap();
    let rec = pusher.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.worker.as_deref()), (JobState::Running, Some("host-a:1")), "handed to the want");
    // The pusher cannot take it; the worker's next reserve gets it at once.
    assert!(pusher.reserve(&ReserveRequest::new("default")).await.unwrap().is_none());
    let lease = worker.reserve(&ReserveRequest::new("default").worker("host-a:1")).await.unwrap().expect("picked up");
    assert_eq!((lease.id(), lease.attempt()), (&id, 1));
    worker.complete(&lease, Completion::default()).await.unwrap();

    // Handed to an idle want, then the worker leaves: back, uncharged.
    assert!(worker.reserve(&waiting("host-a:1")).await.unwrap().is_none());
    let id = pusher.push(JobSpec::new("main", "t.py")).await.unwrap();
    assert_eq!(pusher.get(&id).await.unwrap().state, JobState::Running);
    worker.unregister_worker("host-a:1").await.unwrap();
    let rec = pusher.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Queued, 0), "given back, no attempt charged");
    let lease = pusher.reserve(&ReserveRequest::new("default")).await.unwrap().expect("queued again");
    assert_eq!((lease.id(), lease.attempt()), (&id, 1));
    pusher.complete(&lease, Completion::default()).await.unwrap();
    // Its want was withdrawn: a new push stays queued.
    let id = pusher.push(JobSpec::new("main", "t.py")).await.unwrap();
    assert_eq!(pusher.get(&id).await.unwrap().state, JobState::Queued);
    pusher.delete_queues().await.unwrap();
}
