//! Finding the test Redis: `GPUPOOL_TEST_REDIS_URL`, else a skip (a failure
//! under `GPUPOOL_REQUIRE_BACKENDS=1`).

// Not every test file uses every helper.
#![allow(dead_code)]

use gpupool_redis::RedisQueue;

/// The test URL with a key prefix and a short reclaim idle time, or `None`
/// after printing why the test is skipped.
pub(crate) fn url(prefix: &str) -> Option<String> {
    let base = gpupool_core::conformance::service_url("GPUPOOL_TEST_REDIS_URL", "Redis test", container_url)?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}prefix={prefix}&reclaim_idle=300ms"))
}

/// A prefix no other test uses.
pub(crate) fn random_prefix(tag: &str) -> String {
    format!("gpt:{tag}:{}:", gpupool_core::conformance::unique_suffix())
}

/// A connected queue under a fresh prefix.
pub(crate) async fn queue(tag: &str) -> Option<RedisQueue> {
    let q = RedisQueue::connect(&url(&random_prefix(tag))?).await.expect("connect to the test Redis");
    gpupool_core::Queue::init(&q).await.expect("init");
    Some(q)
}

/// Deletes every key under the queue's prefix.
pub(crate) async fn cleanup(q: &RedisQueue) {
    let mut c = q.connection();
    let pattern = format!("{}*", q.options().prefix);
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut c).await.unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
    }
}

/// With feature `testcontainers` and a Docker daemon: a Redis container,
/// started once per test binary and kept until it exits.
#[cfg(feature = "testcontainers")]
fn container_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    gpupool_core::conformance::started_once(
        &URL,
        "Redis",
        || -> Result<_, testcontainers_modules::testcontainers::TestcontainersError> {
            use testcontainers_modules::testcontainers::ImageExt;
            use testcontainers_modules::testcontainers::runners::SyncRunner;
            let container = testcontainers_modules::redis::Redis::default().with_tag("7").start()?;
            let url = container.get_host_port_ipv4(6379).ok().map(|p| format!("redis://127.0.0.1:{p}"));
            Ok((container, url))
        },
    )
}

#[cfg(not(feature = "testcontainers"))]
fn container_url() -> Option<String> {
    None
}
