//! [`gpupool_core::Blobs`] on RabbitMQ: one stream per blob,
//! `PREFIXblob.HASH`, holding it in pieces of
//! [`gpupool_core::BLOB_PIECE_BYTES`], each with its index and the count
//! in its headers. A stream keeps its pieces [`BLOB_MAX_AGE`]; a blob put
//! again (after a put cut short) holds some pieces twice, and a read keeps
//! the first of each: all pieces of one hash hold the same bytes.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures_util::StreamExt;
use gpupool_core::Result;
use gpupool_core::sync::lock;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::{AmqpQueue, LOG_READ_GAP, unavailable};

/// How long a blob's stream keeps it (a snapshot for a job that waits
/// longer than this is gone when the job runs, and the job fails saying so).
pub(crate) const BLOB_MAX_AGE: &str = "30D";

impl AmqpQueue {
    /// The stream that holds blob `hash`.
    fn blob_stream(&self, hash: &str) -> String {
        format!("{}blob.{hash}", self.inner.opts.prefix)
    }

    /// The streams of the blobs this handle stored or jobs name (tests
    /// delete them with the queue).
    pub(super) fn blob_streams(&self) -> Vec<String> {
        let named: Vec<String> = {
            let st = self.inner.state();
            st.jobs
                .values()
                .filter_map(|j| j.record.spec.snapshot.as_ref())
                .map(|s| self.blob_stream(&s.hash))
                .collect()
        };
        lock(&self.inner.blob_streams).iter().cloned().chain(named).collect()
    }
}

fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

#[async_trait]
impl gpupool_core::Blobs for AmqpQueue {
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        if self.get_blob(hash).await?.is_some() {
            return Ok(());
        }
        let link = self.link().await?;
        let stream = self.blob_stream(hash);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(BLOB_MAX_AGE.into()));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        if let Err(e) = link.publish.queue_declare(stream.as_str().into(), durable, args).await {
            self.drop_link(&link);
            return Err(unavailable(e));
        }
        lock(&self.inner.blob_streams).insert(stream.clone());
        let pieces = gpupool_core::blob_pieces(bytes);
        let count = i64::try_from(pieces.len()).unwrap_or(i64::MAX);
        let mut confirms = Vec::with_capacity(pieces.len());
        for (n, piece) in pieces.into_iter().enumerate() {
            let mut headers = FieldTable::default();
            headers.insert("piece".into(), AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)));
            headers.insert("pieces".into(), AMQPValue::LongLongInt(count));
            let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
            let sent = link
                .publish
                .basic_publish("".into(), stream.as_str().into(), BasicPublishOptions::default(), piece, props)
                .await;
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => {
                    self.drop_link(&link);
                    return Err(unavailable(e));
                }
            }
        }
        for confirm in confirms {
            match confirm.await {
                Ok(c) if c.is_ack() => {}
                Ok(_) => return Err(unavailable("the broker refused a piece of a snapshot")),
                Err(e) => {
                    self.drop_link(&link);
                    return Err(unavailable(e));
                }
            }
        }
        Ok(())
    }

    async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let link = self.link().await?;
        let ch = link.connection.create_channel().await.map_err(unavailable)?;
        ch.basic_qos(8, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let stream = self.blob_stream(hash);
        let mut consumer =
            match ch.basic_consume(stream.as_str().into(), "".into(), BasicConsumeOptions::default(), args).await {
                Ok(c) => c,
                Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404) => {
                    return Ok(None);
                }
                Err(e) => return Err(unavailable(e)),
            };
        let (mut pieces, mut count) = (BTreeMap::new(), None);
        while count.is_none_or(|n| pieces.len() < n) {
            let Ok(Some(delivery)) = tokio::time::timeout(LOG_READ_GAP, consumer.next()).await else { break };
            let delivery = delivery.map_err(unavailable)?;
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            let (Some(n), Some(of)) =
                (header_i64(&delivery.properties, "piece"), header_i64(&delivery.properties, "pieces"))
            else {
                continue;
            };
            count = usize::try_from(of).ok();
            pieces.entry(n).or_insert(delivery.data);
        }
        let _ = ch.close(200, "read".into()).await;
        match count {
            Some(n) if pieces.len() == n => Ok(Some(pieces.into_values().flatten().collect())),
            // Part of it only (a put cut short, or pieces past their age):
            // not there, so a put stores it again.
            Some(n) => {
                let have = pieces.len();
                tracing::warn!("snapshot {hash} has {have} of its {n} pieces in its stream; taking it as missing");
                Ok(None)
            }
            None => Ok(None),
        }
    }
}
