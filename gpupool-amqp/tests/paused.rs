//! A process paused for longer than a lease (SIGSTOP, a stalled VM) wakes
//! with an old view of the ledger and reclaims the leases it sees expired;
//! a lease its holder renewed meanwhile holds, and the run goes on
//! (issue 18, RabbitMQ item 1). The paused process is this test binary
//! run again as a reserving handle (`a_reserving_process`).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{Completion, Heartbeat, JobSpec, JobState, Queue, ReserveRequest};

const URL_VAR: &str = "GPUPOOL_PAUSED_TEST_URL";

/// Run by the test below as a process of its own: reserves from a queue
/// with no jobs, so it looks for expired leases every second, until killed.
#[tokio::test]
#[ignore = "run by a_lease_renewed_while_a_process_was_paused_holds_when_it_wakes"]
async fn a_reserving_process() {
    let url = std::env::var(URL_VAR).expect("run by the paused test");
    let q = AmqpQueue::connect(&url).await.unwrap();
    let mut req = ReserveRequest::new("other");
    req.wait = Duration::from_secs(1);
    loop {
        let _ = q.reserve(&req).await;
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// How many `reclaim` events for job `id` the ledger holds.
async fn reclaims(q: &AmqpQueue, id: &str) -> usize {
    let events = common::ledger_events(q, Duration::from_millis(500)).await;
    events.iter().filter(|(_, v)| v["type"] == "reclaim" && v["id"] == id).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_while_a_process_was_paused_holds_when_it_wakes() {
    let prefix = common::random_prefix("paused");
    let Some(url) = common::url(&prefix) else { return };
    let holder = AmqpQueue::connect(&url).await.unwrap();
    let id = holder.push(JobSpec::new("main", "train.py")).await.unwrap();
    let mut req = ReserveRequest::new("default");
    req.lease = Duration::from_secs(3);
    let lease = holder.reserve(&req).await.unwrap().expect("the job");

    // The holder renews its 3 s lease every second, throughout.
    let beats = {
        let (holder, lease) = (holder.clone(), lease.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if holder.heartbeat(&lease, Duration::from_secs(3)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut other = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_reserving_process", "--ignored", "--quiet"])
        .env(URL_VAR, &url)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Paused for more than twice the lease, then woken.
    signal(other.id(), "-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(other.id(), "-CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;

    let record = holder.get(&id).await.unwrap();
    assert_eq!((record.state, record.attempt), (JobState::Running, 1), "the run goes on");
    assert!(record.errors.is_empty(), "nothing was charged: {:?}", record.errors);
    assert_eq!(holder.heartbeat(&lease, req.lease).await.unwrap(), Heartbeat::Extended);
    beats.abort();
    holder.complete(&lease, Completion::default()).await.unwrap();
    assert_eq!(holder.get(&id).await.unwrap().state, JobState::Succeeded);
    eprintln!("reclaims the woken process published (refused): {}", reclaims(&holder, id.as_str()).await);
    let _ = other.kill();
    let _ = other.wait();
    holder.delete_queues().await.unwrap();
}
