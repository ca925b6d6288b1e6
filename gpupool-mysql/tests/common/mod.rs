//! Finding the test database: `GPUPOOL_TEST_MYSQL_URL`, else a skip (a
//! failure under `GPUPOOL_REQUIRE_BACKENDS=1`).

// Not every test file uses every helper.
#![allow(dead_code)]

use gpupool_mysql::MysqlQueue;

/// The test URL with a table prefix, or `None` after printing why the test
/// is skipped.
pub(crate) fn url(prefix: &str) -> Option<String> {
    let base = gpupool_core::conformance::service_url("GPUPOOL_TEST_MYSQL_URL", "MySQL test", container_url)?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}prefix={prefix}"))
}

/// A connected, initialised queue with this table prefix.
pub(crate) async fn queue(prefix: &str) -> Option<MysqlQueue> {
    let url = url(prefix)?;
    let q = MysqlQueue::connect(&url).await.expect("connect to the test MySQL");
    gpupool_core::Queue::init(&q).await.expect("init");
    Some(q)
}

/// A prefix no other test uses.
pub(crate) fn random_prefix(tag: &str) -> String {
    format!("t{}_{tag}_", gpupool_core::conformance::unique_suffix())
}

/// With feature `testcontainers` and a Docker daemon: a Mariadb container,
/// started once per test binary and kept until it exits.
#[cfg(feature = "testcontainers")]
fn container_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    gpupool_core::conformance::started_once(
        &URL,
        "Mariadb",
        || -> Result<_, testcontainers_modules::testcontainers::TestcontainersError> {
            use testcontainers_modules::testcontainers::runners::SyncRunner;
            let container = testcontainers_modules::mariadb::Mariadb::default().start()?;
            let url = container.get_host_port_ipv4(3306).ok().map(|p| format!("mysql://root@127.0.0.1:{p}/test"));
            Ok((container, url))
        },
    )
}

#[cfg(not(feature = "testcontainers"))]
fn container_url() -> Option<String> {
    None
}
