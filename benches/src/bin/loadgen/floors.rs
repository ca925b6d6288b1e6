//! The floor of each figure: the fewest round trips the same job lifecycle
//! needs on that backend, with the same client library, in the same run.
//!
//! - SQLite (the same file format, WAL, same pool settings): push = one
//!   `INSERT` of the job row; drain = `BEGIN IMMEDIATE`, `SELECT id … LIMIT
//!   1`, `UPDATE … running`, `COMMIT`, then `UPDATE … succeeded`.
//! - MySQL: push = one `INSERT`; drain = `BEGIN`, `SELECT id … FOR UPDATE
//!   SKIP LOCKED`, `UPDATE`, `COMMIT`, then the completion `UPDATE`.
//! - Redis: push = `XADD` of an entry holding the job's JSON spec; drain =
//!   `XREADGROUP COUNT 1` then `XACK`.
//! - RabbitMQ: push = a persistent publish of the job's JSON spec to a quorum
//!   queue, confirmed; drain = a consumer with prefetch 1 acking each
//!   delivery.
//! - memory: no floor.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gpupool_benches::{redis_floor, spec_text};
use sqlx::{Connection, Executor};

/// A fresh name for floor tables, streams and queues.
fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

pub(crate) async fn push(url: &str, n: usize, dir: &Path) -> Option<f64> {
    match super::scheme(url) {
        "sqlite" => Some(sqlite(n, 1, dir, false).await),
        "mysql" | "mariadb" => Some(mysql(url, n, 1, false).await),
        "redis" | "rediss" => Some(redis_floor(url, n, 1, false).await),
        "amqp" | "amqps" => Some(amqp(url, n, 1, false).await),
        _ => None,
    }
}

pub(crate) async fn drain(url: &str, n: usize, consumers: usize, dir: &Path) -> Option<f64> {
    match super::scheme(url) {
        "sqlite" => Some(sqlite(n, consumers, dir, true).await),
        "mysql" | "mariadb" => Some(mysql(url, n, consumers, true).await),
        "redis" | "rediss" => Some(redis_floor(url, n, consumers, true).await),
        "amqp" | "amqps" => Some(amqp(url, n, consumers, true).await),
        _ => None,
    }
}

async fn sqlite(n: usize, consumers: usize, dir: &Path, drain: bool) -> f64 {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
    let opts = SqliteConnectOptions::new()
        .filename(dir.join(format!("floor-{}.db", tag())))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(consumers.max(1) as u32 + 1).connect_with(opts).await.unwrap();
    pool.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, state TEXT, priority INTEGER, \
         spec TEXT, token TEXT); CREATE INDEX r ON jobs (queue, state, priority DESC, id)",
    )
    .await
    .unwrap();
    let spec = spec_text();
    let insert = async |pool: &sqlx::SqlitePool| {
        sqlx::query("INSERT INTO jobs (queue, state, priority, spec) VALUES ('default', 'queued', 0, ?1)")
            .bind(&spec)
            .execute(pool)
            .await
            .unwrap();
    };
    if !drain {
        let t = Instant::now();
        for _ in 0..n {
            insert(&pool).await;
        }
        return n as f64 / t.elapsed().as_secs_f64();
    }
    for _ in 0..n {
        insert(&pool).await;
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
                let id: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE queue = 'default' AND state = 'queued' ORDER BY priority DESC, id LIMIT 1",
                )
                .fetch_optional(&mut *tx)
                .await
                .unwrap();
                let Some(id) = id else { break };
                sqlx::query("UPDATE jobs SET state = 'running', token = 't' WHERE id = ?1").bind(id).execute(&mut *tx).await.unwrap();
                tx.commit().await.unwrap();
                sqlx::query("UPDATE jobs SET state = 'succeeded', token = NULL WHERE id = ?1 AND token = 't'")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn mysql(url: &str, n: usize, consumers: usize, drain: bool) -> f64 {
    let opts = gpupool_mysql::MysqlOptions::from_url(url).unwrap();
    let table = format!("floor_{}", tag());
    let mut admin = sqlx::mysql::MySqlConnection::connect_with(&opts.connect).await.unwrap();
    let create = format!(
        "CREATE TABLE {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, queue VARCHAR(64), state VARCHAR(16), \
         priority INT, spec LONGTEXT, token CHAR(32), KEY r (queue, state, priority DESC, id)) ENGINE=InnoDB"
    );
    sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut admin).await.unwrap();
    let insert = format!("INSERT INTO {table} (queue, state, priority, spec) VALUES ('default', 'queued', 0, ?)");
    let select = format!(
        "SELECT id FROM {table} WHERE queue = 'default' AND state = 'queued' ORDER BY priority DESC, id LIMIT 1 \
         FOR UPDATE SKIP LOCKED"
    );
    let lease = format!("UPDATE {table} SET state = 'running', token = 'tok' WHERE id = ?");
    let done = format!("UPDATE {table} SET state = 'succeeded', token = NULL WHERE id = ? AND token = 'tok'");
    let spec = spec_text();
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(consumers as u32 + 1)
        .connect_with(opts.connect.clone())
        .await
        .unwrap();
    let push_all = async || {
        for _ in 0..n {
            sqlx::query(sqlx::AssertSqlSafe(insert.clone())).bind(&spec).execute(&pool).await.unwrap();
        }
    };
    let rate = if drain {
        push_all().await;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..consumers {
            let (pool, select, lease, done) = (pool.clone(), select.clone(), lease.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let mut tx = pool.begin().await.unwrap();
                    let id: Option<i64> =
                        sqlx::query_scalar(sqlx::AssertSqlSafe(select.clone())).fetch_optional(&mut *tx).await.unwrap();
                    let Some(id) = id else { break };
                    sqlx::query(sqlx::AssertSqlSafe(lease.clone())).bind(id).execute(&mut *tx).await.unwrap();
                    tx.commit().await.unwrap();
                    sqlx::query(sqlx::AssertSqlSafe(done.clone())).bind(id).execute(&pool).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        n as f64 / t.elapsed().as_secs_f64()
    } else {
        let t = Instant::now();
        push_all().await;
        n as f64 / t.elapsed().as_secs_f64()
    };
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&mut admin).await.unwrap();
    rate
}

async fn redis_floor(url: &str, n: usize, consumers: usize, drain: bool) -> f64 {
    let opts = gpupool_redis::RedisOptions::from_url(url).unwrap();
    let client = redis::Client::open(opts.driver_url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("floor:{}", tag());
    redis_floor::create(&mut c, &stream).await.unwrap();
    let spec = spec_text();
    let push_all = async |c: &mut redis::aio::MultiplexedConnection| {
        for _ in 0..n {
            redis_floor::push(c, &stream, &spec).await.unwrap();
        }
    };
    let rate = if drain {
        push_all(&mut c).await;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..consumers {
            let (client, stream) = (client.clone(), stream.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = client.get_multiplexed_async_connection().await.unwrap();
                redis_floor::drain(&mut c, &stream, &format!("c{w}")).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        n as f64 / t.elapsed().as_secs_f64()
    } else {
        let t = Instant::now();
        push_all(&mut c).await;
        n as f64 / t.elapsed().as_secs_f64()
    };
    let _: i64 = redis::cmd("DEL").arg(&stream).query_async(&mut c).await.unwrap();
    rate
}

async fn amqp(url: &str, n: usize, consumers: usize, drain: bool) -> f64 {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    let opts = gpupool_amqp::AmqpOptions::from_url(url).unwrap();
    let conn = lapin::Connection::connect(&opts.driver_url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let queue = format!("floor.{}", tag());
    gpupool_benches::amqp::declare(&ch, &queue, "quorum").await.unwrap();
    let spec = spec_text();
    let payload = spec.as_bytes();
    let push_all = async || {
        for _ in 0..n {
            gpupool_benches::amqp::publish_confirmed(&ch, &queue, payload).await.unwrap();
        }
    };
    let rate = if drain {
        push_all().await;
        let t = Instant::now();
        let remaining = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(n));
        // The clock stops at the last ack, not when the other consumers'
        // waits for a next delivery time out.
        let done_at = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
        let mut tasks = Vec::new();
        for _ in 0..consumers {
            let c = conn.create_channel().await.unwrap();
            c.basic_qos(1, BasicQosOptions::default()).await.unwrap();
            let mut consumer = c
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .unwrap();
            let (remaining, done_at) = (std::sync::Arc::clone(&remaining), std::sync::Arc::clone(&done_at));
            tasks.push(tokio::spawn(async move {
                while remaining.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
                    else {
                        break;
                    };
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    if remaining.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
                        *done_at.lock().unwrap() = Some(Instant::now());
                    }
                }
                let _ = c.close(200, "done".into()).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let end = done_at.lock().unwrap().expect("every message acked");
        n as f64 / end.duration_since(t).as_secs_f64()
    } else {
        let t = Instant::now();
        push_all().await;
        n as f64 / t.elapsed().as_secs_f64()
    };
    let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done".into()).await;
    rate
}

/// Statements per second the MySQL server executed over a window in which
/// only an idle worker is connected (minus our own two reads).
pub(crate) async fn mysql_questions_per_s(url: &str, window: Duration) -> f64 {
    let opts = gpupool_mysql::MysqlOptions::from_url(url).unwrap();
    let mut c = sqlx::mysql::MySqlConnection::connect_with(&opts.connect).await.unwrap();
    let read = async |c: &mut sqlx::mysql::MySqlConnection| -> f64 {
        let row: (String, String) = sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Questions'").fetch_one(c).await.unwrap();
        row.1.parse().unwrap()
    };
    let a = read(&mut c).await;
    tokio::time::sleep(window).await;
    let b = read(&mut c).await;
    ((b - a - 1.0) / window.as_secs_f64()).max(0.0)
}
