//! The conformance suite on Redis, each test under its own key prefix.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use gpupool_core::Queue;
use gpupool_redis::RedisQueue;

async fn setup() -> Option<(RedisQueue, Arc<dyn Queue>)> {
    let q = common::queue("conformance").await?;
    Some((q.clone(), Arc::new(q)))
}

async fn teardown(q: RedisQueue, _: Arc<dyn Queue>) {
    common::cleanup(&q).await;
}

gpupool_core::conformance_tests!(setup, teardown);
