//! The conformance suite on RabbitMQ, each test under its own name prefix.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use gpupool_amqp::AmqpQueue;
use gpupool_core::Queue;

async fn setup() -> Option<(AmqpQueue, Arc<dyn Queue>)> {
    let q = common::queue("conformance").await?;
    Some((q.clone(), Arc::new(q)))
}

async fn teardown(q: AmqpQueue, _: Arc<dyn Queue>) {
    q.delete_queues().await.unwrap();
}

gpupool_core::conformance_tests!(setup, teardown);
