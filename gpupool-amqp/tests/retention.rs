//! The ledger's retention cuts events while a job is leased: a process
//! that connects afterwards starts from the newest snapshot, so it still
//! knows the job, as running under the same lease, and no worker gets it
//! twice (issue 18, RabbitMQ item 2).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, Heartbeat, JobSpec, JobState, ListFilter, Queue, ReserveRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_leased_across_a_retention_cut_keeps_its_lease_on_a_process_that_joins_later() {
    let prefix = common::random_prefix("cut");
    let Some(url) = common::url(&prefix) else { return };
    // 1 MB segments, 3 MB kept: the ledger drops its oldest events after
    // about 4 MB.
    let url = format!("{url}&ledger_max_bytes=3000000&ledger_segment_bytes=1000000");
    let worker = AmqpQueue::connect(&url).await.unwrap();
    let pusher = AmqpQueue::connect(&url).await.unwrap();
    let id = pusher.push(JobSpec::new("main", "train.py")).await.unwrap();
    let mut req = ReserveRequest::new("default");
    req.lease = Duration::from_secs(60);
    let lease = worker.reserve(&req).await.unwrap().expect("the job");
    assert_eq!(lease.id(), &id);

    // About 5 MB of other jobs, while the lease is renewed; the worker
    // (which reserved, so it takes part in the writer's election) writes
    // snapshots as the ledger grows.
    let pad = "x".repeat(8_000);
    for _ in 0..10 {
        for _ in 0..60 {
            let mut spec = JobSpec::new("main", "filler.py");
            spec.queue = "filler".into();
            spec.args.insert("pad".into(), pad.clone().into());
            pusher.push(spec).await.unwrap();
        }
        assert_eq!(worker.heartbeat(&lease, req.lease).await.unwrap(), Heartbeat::Extended);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let cut = common::ledger_events(&worker, Duration::from_secs(2)).await.first().expect("events").0;
    let job_offset: i64 = id.as_str().parse::<i64>().unwrap() - 1;
    assert!(
        cut > job_offset + 100,
        "retention cut the ledger's start (now at {cut}) past the job's push ({job_offset})"
    );
    let covers = worker.last_snapshot().await.unwrap().expect("a snapshot was written");
    assert!(covers >= cut, "the newest snapshot ({covers}) holds events past the cut ({cut})");

    // A process that joins now knows the job as running, under the lease.
    let joined = AmqpQueue::connect(&url).await.unwrap();
    let record = joined.get(&id).await.unwrap();
    assert_eq!((record.state, record.attempt), (JobState::Running, 1));
    assert_eq!(record.worker, lease.job.worker);
    let mut now = ReserveRequest::new("default");
    now.wait = Duration::ZERO;
    assert!(joined.reserve(&now).await.unwrap().is_none(), "no second worker gets the job");
    assert_eq!(joined.heartbeat(&lease, req.lease).await.unwrap(), Heartbeat::Extended, "the lease holds there");
    joined.complete(&lease, Completion::default()).await.unwrap();
    assert_eq!(worker.get(&id).await.unwrap().state, JobState::Succeeded);

    // Both see the same jobs.
    let all = ListFilter { limit: 10_000, ..ListFilter::default() };
    let ids = |jobs: Vec<gpupool_core::JobRecord>| jobs.into_iter().map(|j| (j.id, j.state)).collect::<Vec<_>>();
    let (a, b) = (ids(worker.list(&all).await.unwrap()), ids(joined.list(&all).await.unwrap()));
    assert_eq!(a.len(), 601);
    assert_eq!(a, b);
    worker.delete_queues().await.unwrap();
}
