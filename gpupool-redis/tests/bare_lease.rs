//! A first attempt is leased by a bare `XREADGROUP`: until its holder's
//! first call the lease is only the entry in the group's pending list, and
//! the job's hash still says `queued`. Everything that reads or changes a
//! job must see it as running: `get`, `jobs --state`, cancel, another
//! worker's reclaim pass (which must respect the holder's lease, not its
//! own `reclaim_idle`), and the holder's own calls.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use gpupool_core::{
    CancelOutcome, Completion, FailureKind, Heartbeat, JobId, JobSpec, JobState, Lease, ListFilter, Queue,
    ReserveRequest, RunInfo,
};
use gpupool_redis::RedisQueue;

fn req(queue: &str, worker: &str, lease: Duration) -> ReserveRequest {
    ReserveRequest::new(queue).worker(worker).lease(lease)
}

/// Pushes a job to `queue` and leases it, as `worker` with a 60 s lease.
async fn push_and_lease(q: &RedisQueue, queue: &str, worker: &str) -> (JobId, Lease) {
    let id = q.push(JobSpec::new("main", "train.py").with_queue(queue)).await.unwrap();
    let lease = q.reserve(&req(queue, worker, Duration::from_secs(60))).await.unwrap().expect("the job");
    (id, lease)
}

async fn ids(q: &RedisQueue, queue: &str, state: JobState) -> Vec<String> {
    let filter = ListFilter { queue: Some(queue.into()), state: Some(state), limit: 100, offset: 0 };
    q.list(&filter).await.unwrap().into_iter().map(|r| r.id.to_string()).collect()
}

#[tokio::test]
async fn a_bare_lease_reads_as_running_and_its_holder_records_it() {
    let Some(q) = common::queue("bare-view").await else { return };
    let (id, lease) = push_and_lease(&q, "bv", "gpu-7").await;
    assert_eq!((lease.attempt(), lease.job.state), (1, JobState::Running));

    // Not recorded yet, and still shown as what it is.
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Running, 1));
    assert_eq!(rec.worker.as_deref(), Some("gpu-7"), "the worker, from the consumer's name");
    assert!(rec.started_at.is_some());
    assert_eq!(ids(&q, "bv", JobState::Running).await, [id.to_string()]);
    assert!(ids(&q, "bv", JobState::Queued).await.is_empty());
    let all = q.list(&ListFilter { queue: Some("bv".into()), ..ListFilter::default() }).await.unwrap();
    assert_eq!(all[0].state, JobState::Running);

    // The holder's first call records it; later ones are checked against it.
    let info = RunInfo { commit: Some("c0ffee".into()), gpu_ids: vec![2] };
    q.started(&lease, &info).await.unwrap();
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.worker.as_deref()), (JobState::Running, 1, Some("gpu-7")));
    assert_eq!(rec.commit.as_deref(), Some("c0ffee"));
    assert_eq!(q.heartbeat(&lease, Duration::from_secs(60)).await.unwrap(), Heartbeat::Extended);
    q.complete(&lease, Completion::default()).await.unwrap();
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt), (JobState::Succeeded, 1));
    assert!(q.complete(&lease, Completion::default()).await.is_err(), "a second complete is refused");
    common::cleanup(&q).await;
}

#[tokio::test]
async fn a_bare_lease_completed_at_once_is_recorded_whole() {
    let Some(q) = common::queue("bare-done").await else { return };
    let (id, lease) = push_and_lease(&q, "bd", "gpu-1").await;
    q.complete(&lease, Completion { output_tail: "ok\n".into(), ..Completion::default() }).await.unwrap();
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.worker.as_deref()), (JobState::Succeeded, 1, Some("gpu-1")));
    assert!(rec.started_at.is_some() && rec.finished_at.is_some());
    assert!(rec.started_at <= rec.finished_at);
    assert_eq!(rec.output_tail.as_deref(), Some("ok\n"));
    assert!(ids(&q, "bd", JobState::Running).await.is_empty());
    common::cleanup(&q).await;
}

#[tokio::test]
async fn a_bare_lease_completed_with_its_facts_and_last_output_is_recorded_whole() {
    let Some(q) = common::queue("bare-with").await else { return };
    let (id, lease) = push_and_lease(&q, "bw", "gpu-2").await;
    let run = RunInfo { commit: Some("c0ffee".into()), gpu_ids: vec![0, 1] };
    let done = Completion { log: "epoch 1\n".into(), run: Some(run), ..Completion::default() };
    q.complete(&lease, done).await.unwrap();
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.worker.as_deref()), (JobState::Succeeded, 1, Some("gpu-2")));
    assert_eq!((rec.commit.as_deref(), rec.gpu_ids), (Some("c0ffee"), Some(vec![0, 1])));
    assert_eq!(q.run_logs().unwrap().read_log(&id, 0).await.unwrap().text, "epoch 1\n");
    assert!(ids(&q, "bw", JobState::Running).await.is_empty());
    let again = Completion { log: "more\n".into(), ..Completion::default() };
    assert!(q.complete(&lease, again).await.is_err(), "a second complete is refused, and adds nothing");
    assert_eq!(q.run_logs().unwrap().read_log(&id, 0).await.unwrap().text, "epoch 1\n");
    common::cleanup(&q).await;
}

#[tokio::test]
async fn cancelling_a_bare_lease_asks_its_holder() {
    let Some(q) = common::queue("bare-cancel").await else { return };
    let (id, lease) = push_and_lease(&q, "bc", "w").await;
    assert_eq!(q.request_cancel(&id).await.unwrap(), CancelOutcome::Requested, "it runs, so the holder is asked");
    assert_eq!(q.heartbeat(&lease, Duration::from_secs(60)).await.unwrap(), Heartbeat::CancelRequested);
    q.report_cancelled(&lease, String::new()).await.unwrap();
    assert_eq!(q.get(&id).await.unwrap().state, JobState::Cancelled);
    common::cleanup(&q).await;
}

#[tokio::test]
async fn another_worker_reclaims_a_bare_lease_only_once_its_own_lease_is_over() {
    let Some(url) = common::url(&common::random_prefix("bare-reclaim")) else { return };
    // Both handles reclaim entries idle for 300 ms (the test URL).
    let holder = RedisQueue::connect(&url).await.unwrap();
    let other = RedisQueue::connect(&url).await.unwrap();
    let id = holder.push(JobSpec::new("main", "train.py").with_queue("br")).await.unwrap();
    let lease = holder.reserve(&req("br", "dies", Duration::from_millis(1500))).await.unwrap().expect("the job");

    // Idle past `reclaim_idle`, within its lease: not taken.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let early = other.reserve(&req("br", "takes", Duration::from_secs(60))).await.unwrap();
    assert!(early.is_none(), "reclaimed inside its holder's lease");

    // Past its lease: the lost attempt is recorded and the job is the other's.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let second = other.reserve(&req("br", "takes", Duration::from_secs(60))).await.unwrap().expect("the lost job");
    assert_eq!((second.id(), second.attempt()), (&id, 2));
    let rec = other.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.worker.as_deref()), (JobState::Running, 2, Some("takes")));
    assert_eq!(rec.errors.len(), 1);
    assert_eq!((rec.errors[0].attempt, rec.errors[0].kind), (1, FailureKind::LeaseLost));
    assert!(rec.errors[0].message.contains("dies"), "the error names the lost holder: {}", rec.errors[0].message);

    // The first holder's calls are refused; the new holder's are not.
    assert!(holder.started(&lease, &RunInfo::default()).await.is_err());
    assert!(holder.complete(&lease, Completion::default()).await.is_err());
    other.complete(&second, Completion::default()).await.unwrap();
    assert_eq!(other.get(&id).await.unwrap().state, JobState::Succeeded);
    common::cleanup(&holder).await;
}

/// What Redis does when it restarts and has lost the last second of its
/// append-only file: it forgets a delivery (the entry leaves the pending
/// list, the group's cursor moves back), so the entry is delivered again.
async fn forget_deliveries(q: &RedisQueue, queue: &str) {
    let stream = format!("{}stream:{queue}", q.options().prefix);
    let mut c = q.connection();
    let pending: redis::Value =
        redis::cmd("XPENDING").arg(&stream).arg("gpupool").arg("-").arg("+").arg(10).query_async(&mut c).await.unwrap();
    let redis::Value::Array(rows) = pending else { panic!("XPENDING: {pending:?}") };
    for row in rows {
        let redis::Value::Array(fields) = row else { continue };
        let entry: String = redis::from_redis_value(fields[0].clone()).unwrap();
        let _: i64 = redis::cmd("XACK").arg(&stream).arg("gpupool").arg(entry).query_async(&mut c).await.unwrap();
    }
    let _: () =
        redis::cmd("XGROUP").arg("SETID").arg(&stream).arg("gpupool").arg("0").query_async(&mut c).await.unwrap();
}

#[tokio::test]
async fn a_delivery_redis_lost_and_handed_out_again_has_one_holder() {
    let Some(q) = common::queue("bare-rollback").await else { return };
    let lost = |r: gpupool_core::Result<Heartbeat>| matches!(r, Err(gpupool_core::Error::LeaseLost { .. }));
    let info = RunInfo::default();

    // Delivered to A, forgotten, delivered to B: two tokens, and the entry
    // is pending under B only.
    let (id, a) = push_and_lease(&q, "rb", "gpu-a").await;
    forget_deliveries(&q, "rb").await;
    let b = q.reserve(&req("rb", "gpu-b", Duration::from_secs(60))).await.unwrap().expect("delivered again");
    assert_eq!((b.id(), b.attempt()), (&id, 1));
    assert_ne!(a.token, b.token, "a token per delivery");
    assert!(matches!(q.started(&a, &info).await, Err(gpupool_core::Error::LeaseLost { .. })), "A holds nothing");
    assert!(lost(q.heartbeat(&a, Duration::from_secs(60)).await));
    q.started(&b, &info).await.unwrap();
    assert_eq!(q.heartbeat(&b, Duration::from_secs(60)).await.unwrap(), Heartbeat::Extended);
    assert!(q.complete(&a, Completion::default()).await.is_err(), "A's result is not recorded");
    q.complete(&b, Completion::default()).await.unwrap();
    let rec = q.get(&id).await.unwrap();
    assert_eq!((rec.state, rec.attempt, rec.worker.as_deref()), (JobState::Succeeded, 1, Some("gpu-b")));

    // One consumer handed the entry twice: the first call decides.
    let (id, first) = push_and_lease(&q, "rc", "gpu-c").await;
    forget_deliveries(&q, "rc").await;
    let second = q.reserve(&req("rc", "gpu-c", Duration::from_secs(60))).await.unwrap().expect("delivered again");
    assert_eq!(second.id(), &id);
    assert_ne!(first.token, second.token, "a token per delivery, even to one consumer");
    assert_eq!(q.heartbeat(&second, Duration::from_secs(60)).await.unwrap(), Heartbeat::Extended);
    assert!(lost(q.heartbeat(&first, Duration::from_secs(60)).await), "the other delivery holds nothing");
    assert!(q.complete(&first, Completion::default()).await.is_err());
    q.complete(&second, Completion::default()).await.unwrap();
    common::cleanup(&q).await;
}
