//! One unreadable job does not stall the queue: a row whose spec does not
//! read (edited by hand, or written by a newer gpupool) ends `failed` with
//! kind `invalid`, and the reserve moves on to the jobs behind it.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpupool_core::{JobSpec, ListFilter, Queue, ReserveRequest};
use gpupool_sqlite::SqliteQueue;

#[tokio::test]
async fn an_unreadable_job_fails_as_invalid_and_the_reserve_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::connect(&format!("sqlite://{}/q.db", dir.path().display())).await.unwrap();
    let bad = q.push(JobSpec::new("main", "a.py")).await.unwrap();
    let good = q.push(JobSpec::new("main", "b.py")).await.unwrap();
    sqlx::query("UPDATE jobs SET spec = '{\"git_ref\": 7, \"from\": \"a newer gpupool\"}' WHERE id = ?1")
        .bind(bad.as_i64().unwrap())
        .execute(q.pool())
        .await
        .unwrap();

    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job behind it");
    assert_eq!(lease.id(), &good);
    let (state,): (String,) = sqlx::query_as("SELECT state FROM jobs WHERE id = ?1")
        .bind(bad.as_i64().unwrap())
        .fetch_one(q.pool())
        .await
        .unwrap();
    assert_eq!(state, "failed");
    let errors = q.errors(Some(&bad), 10).await.unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind.as_str(), "invalid");
    assert!(errors[0].message.contains("does not read"), "{}", errors[0].message);
    assert!(q.reserve(&ReserveRequest::new("default")).await.unwrap().is_none(), "nothing else queued");
    // Listing shows every other job; `get` on the bad one says why.
    let listed = q.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [good]);
    assert!(q.get(&bad).await.is_err());
}

/// The conformance check, with rows rewritten behind push's back.
#[tokio::test]
async fn stored_jobs_are_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::connect(&format!("sqlite://{}/q.db", dir.path().display())).await.unwrap();
    let raw = q.clone();
    let store: &gpupool_core::conformance::StoreRaw = &move |queue: String, spec: String| {
        let q = raw.clone();
        Box::pin(async move {
            let id = q.push(JobSpec::new("main", "x.py").with_queue(queue)).await.unwrap();
            sqlx::query("UPDATE jobs SET spec = ?1 WHERE id = ?2")
                .bind(spec)
                .bind(id.as_i64().unwrap())
                .execute(q.pool())
                .await
                .unwrap();
            id
        })
    };
    gpupool_core::conformance::stored_jobs_are_checked_again(std::sync::Arc::new(q), store).await;
}
