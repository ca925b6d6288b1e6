//! Benchmarks for gpupool: the pieces the measuring binaries share.

/// The JSON spec of the no-op job every floor stores, the same text
/// gpupool stores for it.
#[allow(clippy::expect_used)] // A fixed, valid spec always serializes.
pub fn spec_text() -> String {
    gpupool_core::JobSpec::new("main", "noop.py").arg("i", 1).to_json().expect("a fixed spec serializes")
}

/// The scheme of a queue URL (`sqlite`, `mysql`, …).
pub fn scheme(url: &str) -> &str {
    url.split(':').next().unwrap_or("")
}

/// A URL for a fresh, empty queue of the same backend as `url`: a new file
/// in `dir`, or a new name prefix starting with `tag`.
pub fn fresh(url: &str, tag: &str, dir: &std::path::Path) -> String {
    let id = format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let sep = if url.contains('?') { '&' } else { '?' };
    match scheme(url) {
        "sqlite" => format!("sqlite://{}/{id}.db", dir.display()),
        "memory" => url.to_owned(),
        "mysql" | "mariadb" => format!("{url}{sep}prefix=bench_{id}_"),
        "redis" | "rediss" => format!("{url}{sep}prefix=bench:{id}:"),
        _ => format!("{url}{sep}prefix=bench.{id}.&ledger_max_age=1h"),
    }
}

/// Removes what a [`fresh`] queue left on its server (tables, keys,
/// streams); a file goes with its folder.
pub async fn cleanup(url: &str) {
    match scheme(url) {
        "mysql" | "mariadb" => {
            if let Ok(q) = gpupool_mysql::MysqlQueue::connect(url).await {
                let _ = q.drop_tables().await;
            }
        }
        "redis" | "rediss" => {
            if let Ok(q) = gpupool_redis::RedisQueue::connect(url).await {
                let mut c = q.connection();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}*", q.options().prefix))
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                for chunk in keys.chunks(500) {
                    let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
                }
            }
        }
        "amqp" | "amqps" => {
            if let Ok(q) = gpupool_amqp::AmqpQueue::connect(url).await {
                let _ = q.delete_queues().await;
            }
        }
        _ => {}
    }
}

/// The Redis floor: a bare stream with one consumer group, pushed to with
/// `XADD` and drained with `XREADGROUP COUNT 1` then `XACK` (loadgen's
/// floors and `redis_cpu` both measure it).
pub mod redis_floor {
    use redis::RedisResult;
    use redis::aio::MultiplexedConnection;

    /// The group every floor stream has.
    const GROUP: &str = "g";

    /// `XREADGROUP`'s entries of one stream: (entry id, fields).
    type StreamEntries = Vec<(String, std::collections::HashMap<String, String>)>;

    /// Creates `stream` with its consumer group, reading from the start.
    pub async fn create(c: &mut MultiplexedConnection, stream: &str) -> RedisResult<()> {
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query_async(c).await
    }

    /// Adds one entry holding `spec`, as a push.
    pub async fn push(c: &mut MultiplexedConnection, stream: &str, spec: &str) -> RedisResult<()> {
        let _: String = redis::cmd("XADD").arg(stream).arg("*").arg("spec").arg(spec).query_async(c).await?;
        Ok(())
    }

    /// Reads and acknowledges the stream's new entries one at a time, as
    /// the consumer `consumer`, until none is left.
    pub async fn drain(c: &mut MultiplexedConnection, stream: &str, consumer: &str) -> RedisResult<()> {
        loop {
            let v: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(stream)
                .arg(">")
                .query_async(c)
                .await?;
            let Ok(entries) = redis::from_redis_value::<Vec<(String, StreamEntries)>>(v) else { return Ok(()) };
            let Some(id) = entries.first().and_then(|(_, e)| e.first()).map(|(id, _)| id.clone()) else {
                return Ok(());
            };
            let _: i64 = redis::cmd("XACK").arg(stream).arg(GROUP).arg(&id).query_async(c).await?;
        }
    }
}

/// RabbitMQ pieces the ledger benches and the floor share: queues declared
/// by type, persistent publishes awaited until confirmed, a stream read
/// from its next event.
pub mod amqp {
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Consumer};

    /// Declares the durable queue `name` of type `kind` (`quorum`, `stream`).
    pub async fn declare(ch: &Channel, name: &str, kind: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        ch.queue_declare(name.into(), durable, args).await.map(|_| ())
    }

    /// Publishes `body` persistently to `queue` and waits for the broker's
    /// confirm (the channel is in confirm mode).
    pub async fn publish_confirmed(ch: &Channel, queue: &str, body: &[u8]) -> lapin::Result<()> {
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props).await?.await.map(|_| ())
    }

    /// Reads stream `stream` from the next event on, up to 1,000 unacknowledged
    /// (the backend's ledger reader does the same).
    pub async fn read_from_next(ch: &Channel, stream: &str) -> lapin::Result<Consumer> {
        ch.basic_qos(1000, BasicQosOptions::default()).await?;
        let mut from = FieldTable::default();
        from.insert("x-stream-offset".into(), AMQPValue::LongString("next".into()));
        ch.basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), from).await
    }
}
