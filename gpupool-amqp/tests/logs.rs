//! Shipped logs on RabbitMQ beyond the conformance suite: a job's log
//! stream is deleted `log_max_age` after the job ended, by a reserving
//! process, and once only.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, JobSpec, Progress, Queue, ReserveRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_jobs_log_stream_goes_after_log_max_age() {
    let Some(base) = common::url(&common::random_prefix("logs")) else { return };
    let url = format!("{base}&log_max_age=1s");
    let q = AmqpQueue::connect(&url).await.unwrap();
    let id = q.push(JobSpec::new("main", "train.py")).await.unwrap();
    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job");
    let logs = q.run_logs().unwrap();
    logs.ship(&lease, &Progress { log: "epoch 1\n".into(), result: None }).await.unwrap();
    q.complete(&lease, Completion::default()).await.unwrap();
    assert_eq!(logs.read_log(&id, 0).await.unwrap().text, "epoch 1\n", "kept after the end");

    // Another process (its first reserve sweeps at once), past the age.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = AmqpQueue::connect(&url).await.unwrap();
    assert!(other.reserve(&ReserveRequest::new("default")).await.unwrap().is_none());
    let page = other.run_logs().unwrap().read_log(&id, 0).await.unwrap();
    assert_eq!((page.text.as_str(), page.next), ("", 0), "the log is gone");
    let gone = q.delete_queues().await;
    assert!(gone.is_ok(), "{gone:?}");
}
