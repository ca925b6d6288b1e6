//! The team binary, `gpupool-pg`, end to end: `init`, `push` and
//! `jobs --json` against PostgreSQL through the `postgres://` scheme it
//! registers. Needs `GPUPOOL_TEST_POSTGRES_URL`, like the conformance suite.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use gpupool_postgres_example::PgQueue;

fn gpupool_pg(dir: &std::path::Path, url: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-pg"))
        .current_dir(dir)
        .env_remove("GPUPOOL_QUEUE")
        .arg("--queue")
        .arg(url)
        .args(args)
        .output()
        .expect("run gpupool-pg");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gpupool-pg {args:?} failed: {stderr}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_push_and_list_through_the_team_binary() {
    let Some(base) = gpupool_core::conformance::service_url("GPUPOOL_TEST_POSTGRES_URL", "PostgreSQL test", || None)
    else {
        return;
    };
    let prefix = format!("t{}_cli_", gpupool_core::conformance::unique_suffix());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}prefix={prefix}");
    let dir = std::env::temp_dir().join(format!("gpupool-pg-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("job.json"), r#"{"git_ref": "main", "entrypoint": "train.py", "args": {"lr": 0.1}}"#)
        .unwrap();

    gpupool_pg(&dir, &url, &["init"]);
    gpupool_pg(&dir, &url, &["push", "job.json"]);
    let out = gpupool_pg(&dir, &url, &["jobs", "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("jobs --json prints JSON");
    let jobs = jobs.as_array().expect("a list of jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["state"], "queued");
    assert_eq!((jobs[0]["git_ref"].as_str(), jobs[0]["entrypoint"].as_str()), (Some("main"), Some("train.py")));
    assert_eq!(jobs[0]["args"]["lr"], 0.1);

    // The rows are where the library reads them.
    let queue = PgQueue::connect(&url).await.unwrap();
    let id = jobs[0]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(gpupool_core::Queue::get(&queue, &id).await.unwrap().spec.git_ref, "main");
    queue.drop_tables().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
