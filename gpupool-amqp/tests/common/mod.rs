//! Finding the test broker: `GPUPOOL_TEST_AMQP_URL`, else a skip (a failure
//! under `GPUPOOL_REQUIRE_BACKENDS=1`).

// Not every test file uses every helper.
#![allow(dead_code)]

use gpupool_amqp::AmqpQueue;

/// The test URL with a name prefix, or `None` after printing why the test
/// is skipped.
pub(crate) fn url(prefix: &str) -> Option<String> {
    let base = gpupool_core::conformance::service_url("GPUPOOL_TEST_AMQP_URL", "RabbitMQ test", container_url)?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}prefix={prefix}&ledger_max_age=1D"))
}

/// A prefix no other test uses.
pub(crate) fn random_prefix(tag: &str) -> String {
    format!("gpt.{tag}.{}.", gpupool_core::conformance::unique_suffix())
}

/// A connected queue under a fresh prefix.
pub(crate) async fn queue(tag: &str) -> Option<AmqpQueue> {
    let q = AmqpQueue::connect(&url(&random_prefix(tag))?).await.expect("connect to the test RabbitMQ");
    Some(q)
}

/// With feature `testcontainers` and a Docker daemon: a RabbitMq container,
/// started once per test binary and kept until it exits.
#[cfg(feature = "testcontainers")]
fn container_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    gpupool_core::conformance::started_once(
        &URL,
        "RabbitMq",
        || -> Result<_, testcontainers_modules::testcontainers::TestcontainersError> {
            use testcontainers_modules::testcontainers::runners::SyncRunner;
            let container = testcontainers_modules::rabbitmq::RabbitMq::default().start()?;
            let url = container.get_host_port_ipv4(5672).ok().map(|p| format!("amqp://guest:guest@127.0.0.1:{p}/%2f"));
            Ok((container, url))
        },
    )
}

#[cfg(not(feature = "testcontainers"))]
fn container_url() -> Option<String> {
    None
}

/// The ledger's events from its first offset, read on a connection of the
/// test's own until none comes for `gap`: (offset, event as JSON).
pub(crate) async fn ledger_events(q: &AmqpQueue, gap: std::time::Duration) -> Vec<(i64, serde_json::Value)> {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let conn =
        lapin::Connection::connect(&q.options().driver_url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let ledger = format!("{}ledger", q.options().prefix);
    let mut consumer =
        ch.basic_consume(ledger.as_str().into(), "".into(), BasicConsumeOptions::default(), args).await.unwrap();
    let mut events = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(gap, consumer.next()).await {
        let offset = match d.properties.headers().as_ref().and_then(|h| h.inner().get("x-stream-offset").cloned()) {
            Some(AMQPValue::LongLongInt(n)) => n,
            other => panic!("no offset: {other:?}"),
        };
        events.push((offset, serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null)));
    }
    let _ = conn.close(200, "".into()).await;
    events
}
