//! Benchmarks for gpupool: the pieces the measuring binaries share.

/// The JSON spec of the no-op job every floor stores, the same text
/// gpupool stores for it.
#[allow(clippy::expect_used)] // A fixed, valid spec always serializes.
pub fn spec_text() -> String {
    gpupool_core::JobSpec::new("main", "noop.py").arg("i", 1).to_json().expect("a fixed spec serializes")
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
