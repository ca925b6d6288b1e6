//! The conformance suite on MariaDB/MySQL. Tests share one table prefix
//! (and so race each other's `init`, as hosts do) and each uses its own
//! random queue names.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use gpupool_core::Queue;

async fn setup() -> Option<((), Arc<dyn Queue>)> {
    let q = common::queue("conformance_").await?;
    Some(((), Arc::new(q)))
}

async fn teardown(_: (), _: Arc<dyn Queue>) {}

gpupool_core::conformance_tests!(setup, teardown);
