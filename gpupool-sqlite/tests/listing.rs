//! Listing by state alone, on a file of its own (the conformance suite
//! filters by queue, since its backends are shared): each state's jobs,
//! newest first, whichever index serves the state.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpupool_core::{Completion, Failure, FailureKind, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_sqlite::SqliteQueue;

fn ids(records: Vec<gpupool_core::JobRecord>) -> Vec<String> {
    records.into_iter().map(|r| r.id.to_string()).collect()
}

#[tokio::test]
async fn each_state_lists_its_jobs_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::connect(&format!("sqlite://{}/q.db", dir.path().display())).await.unwrap();
    let mut pushed = Vec::new();
    for (i, queue) in ["a", "b", "a", "b", "a", "b"].into_iter().enumerate() {
        pushed.push(q.push(JobSpec::new("main", "train.py").with_queue(queue).arg("i", i)).await.unwrap().to_string());
    }
    // Jobs 1 and 2 (queue a, b) run: 1 succeeds, 2 fails for good.
    let req = ReserveRequest::new("a").queues(["a", "b"]);
    let first = q.reserve(&req).await.unwrap().unwrap();
    q.complete(&first, Completion::default()).await.unwrap();
    let b_only = ReserveRequest::new("b");
    let second = q.reserve(&b_only).await.unwrap().unwrap();
    q.fail(&second, Failure::new(FailureKind::Ref, "no such branch")).await.unwrap();
    let third = q.reserve(&req).await.unwrap().unwrap();

    let by = |state: JobState| ListFilter { state: Some(state), limit: 100, ..ListFilter::default() };
    let list = async |f: ListFilter| ids(q.list(&f).await.unwrap());
    assert_eq!(list(by(JobState::Succeeded)).await, [first.id().to_string()]);
    assert_eq!(list(by(JobState::Failed)).await, [second.id().to_string()]);
    assert_eq!(list(by(JobState::Running)).await, [third.id().to_string()]);
    let queued: Vec<String> = pushed
        .iter()
        .rev()
        .filter(|id| ![first.id(), second.id(), third.id()].iter().any(|l| &l.to_string() == *id))
        .cloned()
        .collect();
    assert_eq!(list(by(JobState::Queued)).await, queued, "queued jobs of every queue, newest first");
    let page = ListFilter { state: Some(JobState::Queued), limit: 1, offset: 1, ..ListFilter::default() };
    assert_eq!(list(page).await, [queued[1].clone()]);
    let queued_b = ListFilter { state: Some(JobState::Queued), queue: Some("b".into()), limit: 100, offset: 0 };
    let want_b: Vec<String> =
        queued.iter().filter(|id| pushed.iter().position(|p| p == *id).unwrap() % 2 == 1).cloned().collect();
    assert_eq!(list(queued_b).await, want_b);
}

/// A file from before migration 4 (its `jobs_state` holds every state) is
/// brought up to date when opened, and keeps its jobs.
#[tokio::test]
async fn an_older_file_gets_the_index_without_queued_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/q.db", dir.path().display());
    let id = {
        let q = SqliteQueue::connect(&url).await.unwrap();
        let id = q.push(JobSpec::new("main", "train.py")).await.unwrap();
        sqlx::raw_sql(
            "DROP INDEX jobs_state; CREATE INDEX jobs_state ON jobs (state, id); DROP TABLE job_logs; \
             ALTER TABLE jobs DROP COLUMN artifacts; ALTER TABLE jobs DROP COLUMN not_before; DROP TABLE blobs; PRAGMA user_version = 3",
        )
        .execute(q.pool())
        .await
        .unwrap();
        q.pool().close().await;
        id
    };
    let q = SqliteQueue::connect(&url).await.unwrap();
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(q.pool()).await.unwrap();
    assert_eq!(version, 8, "every migration since ran");
    let sql: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'jobs_state'")
        .fetch_one(q.pool())
        .await
        .unwrap();
    assert!(sql.contains("WHERE state <> 'queued'"), "{sql}");
    let queued = ListFilter { state: Some(JobState::Queued), limit: 10, ..ListFilter::default() };
    assert_eq!(ids(q.list(&queued).await.unwrap()), [id.to_string()]);
}
