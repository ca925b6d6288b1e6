//! A stored job is checked again when it is read for running: a `pushed`
//! event published behind push's back whose spec does not read, or that
//! fails the checks of push, ends `failed` (kind `invalid`) in every fold,
//! and the reserve goes on (the conformance check, issue 18).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_amqp::AmqpQueue;
use gpupool_core::{ListFilter, Queue};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

/// Publishes a `pushed` event with `spec` as it stands, and returns the id
/// of the job it made (the newest).
async fn publish_raw(q: &AmqpQueue, spec: &str) -> gpupool_core::JobId {
    let conn =
        lapin::Connection::connect(&q.options().driver_url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let nonce = gpupool_core::conformance::unique_suffix();
    let at = gpupool_core::Timestamp::now().0;
    let event = format!(r#"{{"nonce":"raw{nonce}","at":{at},"type":"pushed","spec":{spec}}}"#);
    let ledger = format!("{}ledger", q.options().prefix);
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let confirm = ch
        .basic_publish("".into(), ledger.as_str().into(), BasicPublishOptions::default(), event.as_bytes(), props)
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
    let _ = conn.close(200, "".into()).await;
    let newest = q.list(&ListFilter { limit: 1, ..ListFilter::default() }).await.unwrap();
    newest[0].id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_jobs_are_checked_again() {
    let Some(q) = common::queue("raw").await else { return };
    q.init().await.unwrap(); // the ledger the raw events go to
    let raw = q.clone();
    let store: &gpupool_core::conformance::StoreRaw = &move |_queue: String, spec: String| {
        let q = raw.clone();
        Box::pin(async move { publish_raw(&q, &spec).await })
    };
    gpupool_core::conformance::stored_jobs_are_checked_again(std::sync::Arc::new(q.clone()), store).await;
    q.delete_queues().await.unwrap();
}
