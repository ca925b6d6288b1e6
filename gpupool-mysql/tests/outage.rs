//! The database goes away while a job runs: the lost connection surfaces as
//! `Unavailable`, the worker neither crashes nor loses the result, and the
//! result is recorded once the database is back (the lease still holds).
//!
//! The worker reaches MariaDB through a TCP proxy that the test cuts: every
//! open connection is closed and new ones are refused until it is restored.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use gpupool_core::{Completion, Error, JobSpec, JobState, Queue, ReserveRequest};
use gpupool_mysql::MysqlQueue;
use gpupool_worker::{Worker, WorkerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A proxy to `upstream`; `up.send(false)` cuts it.
async fn proxy(upstream: String) -> (u16, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            let mut rx = rx.clone();
            if !*rx.borrow() {
                continue; // dropped: refused
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = rx.wait_for(|up| !*up) => {}
                }
            });
        }
    });
    (port, tx)
}

fn mysql_authority(url: &str) -> String {
    let after = url.split_once("://").unwrap().1;
    let host = after.split_once('@').map_or(after, |(_, h)| h);
    host.split('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_unavailable_and_the_result_survives_it() {
    let prefix = common::random_prefix("outage");
    let Some(direct) = common::url(&prefix) else { return };
    let authority = mysql_authority(&direct);
    let (port, up) = proxy(authority.clone()).await;
    let via_proxy = direct.replacen(&authority, &format!("127.0.0.1:{port}"), 1);
    let admin = MysqlQueue::connect(&direct).await.unwrap();
    admin.init().await.unwrap();
    let q = MysqlQueue::connect(&via_proxy).await.unwrap();

    // 1. The queue API: a cut connection is Unavailable (retryable), and the
    //    same lease completes once the database is back.
    q.push(JobSpec::new("main", "job.py").with_queue("api")).await.unwrap();
    let lease = q.reserve(&ReserveRequest::new("api").lease(Duration::from_secs(60))).await.unwrap().unwrap();
    up.send(false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    match q.complete(&lease, Completion::default()).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(e.is_retryable());
            assert!(!e.to_string().contains(":gpupool@"), "no password in {e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    up.send(true).unwrap();
    q.complete(&lease, Completion::default()).await.expect("recorded once the database is back");
    assert_eq!(admin.get(lease.id()).await.unwrap().state, JobState::Succeeded);

    // 2. A real worker: the database goes away mid-run and comes back after
    //    the job ended; the worker keeps going and the success is recorded.
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = gpupool_worker::testing::job_repo(tmp.path(), "import time\ntime.sleep(3)\nprint('trained')\n");

    let id = q.push(JobSpec::new("main", "job.py")).await.unwrap();
    let mut cfg = WorkerConfig::new(tmp.path().join("data"));
    cfg.repo = Some(repo_dir.to_string_lossy().into_owned());
    cfg.lease = Duration::from_secs(30);
    cfg.heartbeat = Duration::from_millis(500);
    cfg.burst = true;
    let worker = tokio::spawn(Worker::new(Arc::new(q.clone()), cfg).run(CancellationToken::new()));
    // Wait until it runs, then cut the database for 6 s (the job ends at 3 s).
    for _ in 0..100 {
        if admin.get(&id).await.unwrap().state == JobState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.send(false).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(admin.get(&id).await.unwrap().state, JobState::Running, "nothing recorded while the database is away");
    up.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker).await.expect("worker ends").unwrap().expect("worker ok");
    let job = admin.get(&id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1));
    assert!(job.output_tail.unwrap_or_default().contains("trained"));
    admin.drop_tables().await.unwrap();
}
