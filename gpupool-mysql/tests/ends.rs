//! Ends that finish together share one transaction (`complete` with the
//! run's last output): each job ends once, with its own output after what
//! it shipped, its own result and facts; a stale or repeated end changes
//! nothing and is told its lease is lost.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use gpupool_core::{Completion, JobSpec, JobState, Progress, Queue, ReserveRequest, RunInfo};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ends_that_finish_together_each_end_once_with_their_own_output() {
    let Some(q) = common::queue(&common::random_prefix("ends")).await else { return };
    let q = Arc::new(q);
    let n = 24;
    for _ in 0..n {
        q.push(JobSpec::new("main", "train.py").with_queue("ends")).await.unwrap();
    }
    let mut leases = Vec::new();
    while leases.len() < n {
        let batch = q.reserve_many(&ReserveRequest::new("ends"), 16).await.unwrap();
        assert!(!batch.is_empty(), "every job leased");
        leases.extend(batch);
    }
    let logs = q.run_logs().unwrap();
    for lease in &leases {
        logs.ship(lease, &Progress { log: format!("start {}\n", lease.id()), result: None }).await.unwrap();
    }
    // Every end at once, and the first job's twice: one of those two is
    // refused.
    let mut ends = Vec::new();
    for (i, lease) in leases.iter().chain(std::iter::once(&leases[0])).enumerate() {
        let (q, lease) = (Arc::clone(&q), lease.clone());
        ends.push(tokio::spawn(async move {
            let done = Completion {
                output_tail: format!("tail {}", lease.id()),
                result: Some(serde_json::json!({"n": i})),
                log: format!("end {}\n", lease.id()),
                run: Some(RunInfo {
                    commit: Some(format!("c{}", lease.id())),
                    gpu_ids: vec![u32::try_from(i % 4).unwrap()],
                }),
            };
            q.complete(&lease, done).await
        }));
    }
    let mut refused = 0;
    for end in ends {
        match end.await.unwrap() {
            Ok(()) => {}
            Err(gpupool_core::Error::LeaseLost { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 1, "the repeated end is refused");
    for lease in &leases {
        let id = lease.id();
        let rec = q.get(id).await.unwrap();
        assert_eq!(rec.state, JobState::Succeeded);
        assert_eq!(rec.output_tail.as_deref(), Some(format!("tail {id}").as_str()));
        assert_eq!(rec.commit.as_deref(), Some(format!("c{id}").as_str()));
        assert!(rec.result.is_some() && rec.gpu_ids.is_some());
        let page = logs.read_log(id, 0).await.unwrap();
        assert_eq!(page.text, format!("start {id}\nend {id}\n"), "its own output, after what it shipped, once");
        assert_eq!(page.next, page.text.len() as u64);
    }
    // A stale lease's end, carrying output: nothing changes.
    let stale = Completion { log: "late\n".into(), ..Completion::default() };
    assert!(matches!(q.complete(&leases[1], stale).await, Err(gpupool_core::Error::LeaseLost { .. })));
    let id = leases[1].id();
    assert_eq!(logs.read_log(id, 0).await.unwrap().text, format!("start {id}\nend {id}\n"));
}
