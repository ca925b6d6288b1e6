//! Finding the test database: `GPUPOOL_TEST_MYSQL_URL`, else a skip (a
//! failure under `GPUPOOL_REQUIRE_BACKENDS=1`).

// Not every test file uses every helper.
#![allow(dead_code)]

use std::io::Write;

use gpupool_mysql::MysqlQueue;

/// The test URL with a table prefix, or `None` after printing why the test
/// is skipped.
pub(crate) fn url(prefix: &str) -> Option<String> {
    match std::env::var("GPUPOOL_TEST_MYSQL_URL").ok().filter(|u| !u.is_empty()) {
        Some(base) => {
            let sep = if base.contains('?') { '&' } else { '?' };
            Some(format!("{base}{sep}prefix={prefix}"))
        }
        None => {
            let why = "GPUPOOL_TEST_MYSQL_URL is not set";
            assert!(
                std::env::var("GPUPOOL_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "GPUPOOL_REQUIRE_BACKENDS=1 but {why}"
            );
            // Straight to stderr: the test harness captures println!.
            let _ = writeln!(std::io::stderr(), "skipped: MySQL test: {why}");
            None
        }
    }
}

/// A connected, initialised queue with this table prefix.
pub(crate) async fn queue(prefix: &str) -> Option<MysqlQueue> {
    let url = url(prefix)?;
    let q = MysqlQueue::connect(&url).await.expect("connect to the test MySQL");
    gpupool_core::Queue::init(&q).await.expect("init");
    Some(q)
}

/// A prefix no other test run uses.
pub(crate) fn random_prefix(tag: &str) -> String {
    format!("t{}_{tag}_", &uuid_hex()[..8])
}

fn uuid_hex() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 64))
}
