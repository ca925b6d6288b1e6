//! One unreadable job does not stall the queue (MySQL/MariaDB): a row whose
//! spec does not read ends `failed` with kind `invalid`, and the reserve
//! moves on to the jobs behind it.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{JobSpec, ListFilter, Queue, ReserveRequest};

#[tokio::test]
async fn an_unreadable_job_fails_as_invalid_and_the_reserve_moves_on() {
    let prefix = common::random_prefix("bad");
    let Some(q) = common::queue(&prefix).await else { return };
    let bad = q.push(JobSpec::new("main", "a.py")).await.unwrap();
    let good = q.push(JobSpec::new("main", "b.py")).await.unwrap();
    let update = format!("UPDATE {prefix}jobs SET spec = '{{\"git_ref\": 7}}' WHERE id = ?");
    sqlx::query(sqlx::AssertSqlSafe(update)).bind(bad.as_i64().unwrap()).execute(q.pool()).await.unwrap();

    let lease = q.reserve(&ReserveRequest::new("default")).await.unwrap().expect("the job behind it");
    assert_eq!(lease.id(), &good);
    let select = format!("SELECT state FROM {prefix}jobs WHERE id = ?");
    let (state,): (String,) =
        sqlx::query_as(sqlx::AssertSqlSafe(select)).bind(bad.as_i64().unwrap()).fetch_one(q.pool()).await.unwrap();
    assert_eq!(state, "failed");
    let errors = q.errors(Some(&bad), 10).await.unwrap();
    assert_eq!((errors.len(), errors[0].kind.as_str()), (1, "invalid"));
    let listed = q.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [good], "the bad row hides nothing");
    q.drop_tables().await.unwrap();
}

/// The conformance check, with rows rewritten behind push's back.
#[tokio::test]
async fn stored_jobs_are_checked_again() {
    let prefix = common::random_prefix("raw");
    let Some(q) = common::queue(&prefix).await else { return };
    let (raw, table) = (q.clone(), format!("{prefix}jobs"));
    let store: &gpupool_core::conformance::StoreRaw = &move |queue: String, spec: String| {
        let (q, update) = (raw.clone(), format!("UPDATE {table} SET spec = ? WHERE id = ?"));
        Box::pin(async move {
            let id = q.push(JobSpec::new("main", "x.py").with_queue(queue)).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(update))
                .bind(spec)
                .bind(id.as_i64().unwrap())
                .execute(q.pool())
                .await
                .unwrap();
            id
        })
    };
    gpupool_core::conformance::stored_jobs_are_checked_again(std::sync::Arc::new(q.clone()), store).await;
    q.drop_tables().await.unwrap();
}

/// An unreadable row inside a batch ([`Queue::reserve_many`]) is failed and
/// frees its place, and the batch goes on in order: the job it had refused
/// for lack of GPUs is taken before anything from the next queue.
#[tokio::test]
async fn an_unreadable_row_in_a_batch_skips_no_job() {
    let prefix = common::random_prefix("badb");
    let Some(q) = common::queue(&prefix).await else { return };
    let push = |queue: &'static str, gpus: u32| {
        let q = q.clone();
        async move {
            let mut spec = JobSpec::new("main", "a.py").with_queue(queue);
            spec.gpus = Some(gpus);
            q.push(spec).await.unwrap()
        }
    };
    let a = push("first", 1).await;
    let bad = push("first", 1).await;
    let c = push("first", 2).await;
    let _d = push("second", 2).await;
    let update = format!("UPDATE {prefix}jobs SET spec = '{{\"git_ref\": 7}}' WHERE id = ?");
    sqlx::query(sqlx::AssertSqlSafe(update)).bind(bad.as_i64().unwrap()).execute(q.pool()).await.unwrap();

    let req =
        ReserveRequest { queues: vec!["first".into(), "second".into()], ..ReserveRequest::new("first") }.gpus(3, true);
    let leases = q.reserve_many(&req, 8).await.unwrap();
    let ids: Vec<_> = leases.iter().map(|l| l.id().clone()).collect();
    assert_eq!(ids, [a, c], "the 2-GPU job of the first queue, not the second queue's");
    q.drop_tables().await.unwrap();
}
