//! A waiting reserve leaves a want in the ledger that outlives the call:
//! the next reserve picks up a job handed to it in between, and a worker
//! that stops reserving gives such a job back without charging an attempt.

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

    // Handed to an idle want, then the worker stops: back, uncharged.
    assert!(worker.reserve(&waiting("host-a:1")).await.unwrap().is_none());
    let id = pusher.push(JobSpec::new("main", "t.py")).await.unwrap();
    assert_eq!(pusher.get(&id).await.unwrap().state, JobState::Running);
    worker.stop_reserving("host-a:1").await.unwrap();
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

/// A stopping worker lets go of its open reserve at once, not after its
/// running jobs drain: a job pushed meanwhile stays queued for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_takes_no_new_job_while_it_drains() {
    use std::sync::Arc;

    use gpupool_worker::{Worker, WorkerConfig};
    use tokio_util::sync::CancellationToken;

    let Some(url) = common::url(&common::random_prefix("wantstop")) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = gpupool_worker::testing::job_repo(tmp.path(), "import time\ntime.sleep(3)\n");

    let q = AmqpQueue::connect(&url).await.unwrap();
    let long = q.push(JobSpec::new("main", "job.py")).await.unwrap();
    let mut cfg = WorkerConfig::new(tmp.path().join("data"));
    cfg.repo = Some(repo_dir.to_string_lossy().into_owned());
    cfg.slots = 2;
    cfg.lease = Duration::from_secs(30);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(Arc::new(q.clone()), cfg).run(shutdown.clone()));
    // The long job runs; the free slot's reserve waits with a want.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while q.get(&long).await.unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "the first job never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    // The reserve that was waiting when the stop came runs out (≤ 1 s) and
    // leaves its want; the worker withdraws it while the long job drains.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!worker.is_finished(), "the long job is still draining");
    let late = q.push(JobSpec::new("main", "job.py")).await.unwrap();
    assert_eq!(q.get(&late).await.unwrap().state, JobState::Queued, "not handed to the stopping worker");
    assert!(!worker.is_finished(), "checked while the long job drains");
    worker.await.unwrap().unwrap();
    assert_eq!(q.get(&long).await.unwrap().state, JobState::Succeeded, "the running job drained");
    let rec = q.get(&late).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.errors.len()), (JobState::Queued, 0, 0), "{rec:?}");
    q.delete_queues().await.unwrap();
}

/// A want lives 30 s in the ledger; a reserve that waits longer renews it,
/// so a job pushed after 32 s still reaches it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_wait_renews_its_want() {
    let Some(url) = common::url(&common::random_prefix("wantlong")) else { return };
    let worker = AmqpQueue::connect(&url).await.unwrap();
    let pusher = AmqpQueue::connect(&url).await.unwrap();
    let waiting = tokio::spawn({
        let worker = worker.clone();
        async move {
            let mut req = ReserveRequest::new("default").worker("host-b:1");
            req.wait = Duration::from_secs(45);
            let lease = worker.reserve(&req).await.unwrap();
            (lease, std::time::Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_secs(32)).await;
    assert!(!waiting.is_finished(), "still waiting");
    let id = pusher.push(JobSpec::new("main", "t.py")).await.unwrap();
    let pushed = std::time::Instant::now();
    let (lease, got) = waiting.await.unwrap();
    let lease = lease.expect("the renewed want was handed the job");
    assert_eq!(lease.id(), &id);
    assert!(got.duration_since(pushed) < Duration::from_secs(5), "handed at once, not at a renewal");
    worker.complete(&lease, Completion::default()).await.unwrap();
    pusher.delete_queues().await.unwrap();
}
