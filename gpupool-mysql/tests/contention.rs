//! Many workers on one database: 8 workers, each with its own connection
//! pool, drain 2,000 no-op jobs. Every job is completed exactly once, none is
//! left, and no job is ever held by two leases at once, as the database and a
//! record of every execution both show.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpupool_core::{Completion, JobSpec, JobState, ListFilter, Queue, ReserveRequest};
use gpupool_mysql::MysqlQueue;

const WORKERS: usize = 8;
const JOBS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_drain_two_thousand_jobs_exactly_once() {
    let prefix = common::random_prefix("contention");
    let Some(url) = common::url(&prefix) else { return };
    let setup = MysqlQueue::connect(&url).await.unwrap();
    setup.init().await.unwrap();
    for i in 0..JOBS {
        setup.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
    }

    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            // Its own pool: separate connections, as separate hosts have.
            let q = MysqlQueue::connect(&url).await.unwrap();
            let req = ReserveRequest::new("default").worker(format!("worker-{w}")).lease(Duration::from_secs(60));
            let mut runs = Vec::new();
            while let Some(lease) = q.reserve(&req).await.unwrap() {
                let begin = Instant::now();
                q.complete(&lease, Completion::default()).await.unwrap();
                runs.push((lease.id().to_string(), lease.token.clone(), w, begin, Instant::now()));
            }
            runs
        }));
    }
    let mut runs = Vec::new();
    for w in workers {
        runs.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();

    // The record of executions: each job once, so never two holders.
    let mut by_job: HashMap<String, Vec<usize>> = HashMap::new();
    for (id, _, worker, _, _) in &runs {
        by_job.entry(id.clone()).or_default().push(*worker);
    }
    let twice: Vec<_> = by_job.iter().filter(|(_, w)| w.len() > 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(by_job.len(), JOBS, "every job ran");
    let per_worker: Vec<usize> = (0..WORKERS).map(|w| runs.iter().filter(|r| r.2 == w).count()).collect();
    assert!(per_worker.iter().filter(|n| **n > 0).count() > 1, "the work was shared: {per_worker:?}");

    // The database: all succeeded on their first attempt, no lease left,
    // no error record.
    let all = setup.list(&ListFilter { limit: 10_000, ..ListFilter::default() }).await.unwrap();
    assert_eq!(all.len(), JOBS);
    assert!(all.iter().all(|r| r.state == JobState::Succeeded && r.attempt == 1));
    let leftover: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {prefix}jobs WHERE lease_token IS NOT NULL OR state <> 'succeeded'"
    )))
    .fetch_one(setup.pool())
    .await
    .unwrap();
    assert_eq!(leftover, 0);
    assert!(setup.errors(None, 10).await.unwrap().is_empty());
    println!(
        "{JOBS} jobs, {WORKERS} workers: {elapsed:?} ({:.0} jobs/s); per worker {per_worker:?}",
        JOBS as f64 / elapsed.as_secs_f64()
    );
    setup.drop_tables().await.unwrap();
}
