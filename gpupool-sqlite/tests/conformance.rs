//! The conformance suite on SQLite, each test on its own file.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use gpupool_core::Queue;
use gpupool_sqlite::SqliteQueue;

async fn setup() -> Option<(tempfile::TempDir, Arc<dyn Queue>)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/queue.db", dir.path().display());
    let q = SqliteQueue::connect(&url).await.expect("open sqlite queue");
    Some((dir, Arc::new(q)))
}

async fn teardown(_dir: tempfile::TempDir, _q: Arc<dyn Queue>) {}

gpupool_core::conformance_tests!(setup, teardown);

/// All tests against one shared file, the way several workers share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_on_one_file() {
    let (_dir, q) = setup().await.unwrap();
    gpupool_core::conformance::run_all(q).await;
}
