//! Shipped logs on RabbitMQ beyond the conformance suite: every job's log
//! is in the one log stream (no stream a job, which would hold the
//! broker's files), read apart by job from any process, and an attempt
//! after a lost lease appends after what the lost holder shipped.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, JobSpec, Progress, Queue, ReserveRequest};

fn piece(text: &str) -> Progress {
    Progress { log: text.to_owned(), result: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_share_one_log_stream_and_read_apart_from_any_process() {
    let Some(url) = common::url(&common::random_prefix("logs")) else { return };
    let q = AmqpQueue::connect(&url).await.unwrap();
    let logs = q.run_logs().unwrap();
    let mut leases = Vec::new();
    for _ in 0..3 {
        q.push(JobSpec::new("main", "train.py")).await.unwrap();
        leases.push(q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("a job"));
    }
    // Interleaved, as runs on one pool ship.
    for round in 0..4 {
        for (n, lease) in leases.iter().enumerate() {
            logs.ship(lease, &piece(&format!("job {n} line {round}\n"))).await.unwrap();
        }
    }
    let other = AmqpQueue::connect(&url).await.unwrap();
    let other_logs = other.run_logs().unwrap();
    let want = |n: usize| (0..4).map(|r| format!("job {n} line {r}\n")).collect::<String>();
    for (n, lease) in leases.iter().enumerate() {
        let page = other_logs.read_log(lease.id(), 0).await.unwrap();
        assert_eq!((page.text.as_str(), page.dropped), (want(n).as_str(), 0), "job {n}, running, from another process");
        let from = "job 0 line 0\n".len() as u64;
        assert_eq!(other_logs.read_log(lease.id(), from).await.unwrap().text, want(n)[from as usize..]);
    }
    // One ends with its last output (the worker's way for a short run),
    // the others without.
    for (n, lease) in leases.iter().enumerate() {
        let log = if n == 1 { "the last line\n".to_owned() } else { String::new() };
        q.complete(lease, Completion { log, ..Completion::default() }).await.unwrap();
    }
    let page = other_logs.read_log(leases[1].id(), 0).await.unwrap();
    assert_eq!(page.text, format!("{}the last line\n", want(1)), "ended: read up to its end");
    assert_eq!(other_logs.read_log(leases[0].id(), 0).await.unwrap().text, want(0));
    assert_eq!(page.next, page.text.len() as u64);
    let done = other_logs.read_log(leases[1].id(), page.next).await.unwrap();
    assert_eq!((done.text.as_str(), done.next), ("", page.next), "nothing past the end");

    // No stream of a job's own: only the pool's one log stream.
    let names = q.declared_queues();
    assert!(names.iter().any(|n| n.ends_with("logs")), "{names:?}");
    let gone = q.delete_queues().await;
    assert!(gone.is_ok(), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_after_a_lost_lease_appends_after_the_lost_holders_log() {
    let Some(url) = common::url(&common::random_prefix("logslost")) else { return };
    let lost = AmqpQueue::connect(&url).await.unwrap();
    let id = lost.push(JobSpec::new("main", "train.py")).await.unwrap();
    let short = ReserveRequest::new("default").lease(Duration::from_secs(1));
    let first = lost.reserve(&short).await.unwrap().expect("the job");
    let logs = lost.run_logs().unwrap();
    // Marked (the first piece), then not (within 10 s and a MiB): the end
    // is past the last mark when the holder goes.
    for line in ["one\n", "two\n", "three\n"] {
        logs.ship(&first, &piece(line)).await.unwrap();
    }
    drop(lost);

    let next = AmqpQueue::connect(&url).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let long = ReserveRequest::new("default").lease(Duration::from_secs(30)).wait(Duration::from_secs(5));
    let second = next.reserve(&long).await.unwrap().expect("the job, its lease lost");
    assert_eq!((second.id(), second.attempt()), (&id, 2));
    let logs = next.run_logs().unwrap();
    logs.ship(&second, &piece("four\n")).await.unwrap();
    next.complete(&second, Completion::default()).await.unwrap();
    let page = logs.read_log(&id, 0).await.unwrap();
    assert_eq!(page.text, "one\ntwo\nthree\nfour\n", "appended after the lost holder's pieces");
    let gone = next.delete_queues().await;
    assert!(gone.is_ok(), "{gone:?}");
}
