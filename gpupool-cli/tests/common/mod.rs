//! Test queues on every backend configured here, for the binary's tests.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::path::Path;

/// A queue for one test: a SQLite file in the test's folder, or a server
/// backend under a fresh prefix, removed when dropped.
pub(crate) struct TestQueue {
    /// `SQLite`, `MySQL`, `Redis` or `RabbitMQ`.
    pub(crate) name: &'static str,
    /// Its URL (SQLite's once [`TestQueue::in_dir`] placed it).
    pub(crate) url: String,
}

impl TestQueue {
    /// Every backend configured here; SQLite's file is placed by
    /// [`TestQueue::in_dir`].
    pub(crate) fn all() -> Vec<TestQueue> {
        let mut queues = vec![TestQueue { name: "SQLite", url: String::new() }];
        queues.extend(Self::servers());
        queues
    }

    /// The server backends configured here, each under a prefix no other
    /// test uses (so nothing is set up there yet).
    pub(crate) fn servers() -> Vec<TestQueue> {
        let id = gpupool_core::conformance::unique_suffix();
        let mut queues = Vec::new();
        for (var, name) in [
            ("GPUPOOL_TEST_MYSQL_URL", "MySQL"),
            ("GPUPOOL_TEST_REDIS_URL", "Redis"),
            ("GPUPOOL_TEST_AMQP_URL", "RabbitMQ"),
        ] {
            let Some(base) = gpupool_core::conformance::service_url(var, name, || None) else { continue };
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = match name {
                "Redis" => format!("{base}{sep}prefix=gpbin:{id}:"),
                "RabbitMQ" => format!("{base}{sep}prefix=gpbin.{id}.&ledger_max_age=1D"),
                _ => format!("{base}{sep}prefix=bin{id}_"),
            };
            queues.push(TestQueue { name, url });
        }
        queues
    }

    /// The queue for a test in `dir` (where SQLite keeps its file).
    pub(crate) fn in_dir(mut self, dir: &Path) -> Self {
        if self.name == "SQLite" {
            self.url = format!("sqlite://{}/queue.db", dir.display());
        }
        self
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let url = self.url.clone();
        let removed = rt.block_on(async {
            match self.name {
                "MySQL" => gpupool_mysql::MysqlQueue::connect(&url).await?.drop_tables().await,
                "Redis" => {
                    let q = gpupool_redis::RedisQueue::connect(&url).await?;
                    let mut c = q.connection();
                    let keys: Vec<String> =
                        redis::cmd("KEYS").arg(format!("{}*", q.options().prefix)).query_async(&mut c).await.unwrap();
                    if !keys.is_empty() {
                        let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut c).await.unwrap();
                    }
                    Ok(())
                }
                "RabbitMQ" => gpupool_amqp::AmqpQueue::connect(&url).await?.delete_queues().await,
                _ => Ok(()),
            }
        });
        if let Err(e) = removed {
            eprintln!("could not remove the test queue: {e}");
        }
    }
}
