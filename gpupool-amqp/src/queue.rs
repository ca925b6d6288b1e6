//! [`AmqpQueue`]: the [`Queue`] on RabbitMQ alone.
//!
//! Two kinds of thing are declared, all names under the prefix (default
//! `gpupool.`):
//!
//! - `PREFIXledger`: a stream (`x-queue-type=stream`, with `x-max-age` and
//!   `x-max-length-bytes` retention) holding every change to every job as a
//!   JSON event. Each process consumes it from the first offset and folds it
//!   into the jobs' state (module `ledger`), which is what `jobs`, `errors`,
//!   `get` and `list` read, and what decides every race.
//! - `PREFIXwork.QUEUE`: a durable quorum queue per job queue, holding one
//!   persistent message per dispatch of a job (`{id, dispatch}`).
//!
//! **A lease** is a `Leased` event in the ledger, not an unacked delivery.
//! A worker takes a work message (`basic.get` in queue order, or a
//! consumer with prefetch 1 while it waits), publishes `Leased` with the
//! message's dispatch nonce, waits for its own consumer to apply it, and
//! acknowledges the message on the channel that delivered it, within
//! milliseconds. The first `Leased` for a dispatch wins; a redelivered
//! duplicate loses and is simply acknowledged. So no delivery is held for
//! the length of a run, and RabbitMQ's `consumer_timeout` (30 min by
//! default, not settable per queue on 3.10) never fires on a training run.
//!
//! **A push** publishes `Pushed` and, once the broker has confirmed it,
//! the work message (naming only the dispatch nonce, which the fold maps to
//! the job) while the pusher reads its id back from the ledger: the work
//! cannot overtake the event, since anything a worker publishes after
//! seeing it lands later in the stream. With an idempotency key the verdict
//! comes first, so a repeated push sends no work message.
//!
//! **A heartbeat** is a `Heartbeat` event: every process notes, by its own
//! clock, when it saw the lease renewed. **A dead worker's job**: any
//! reserving worker that sees a lease unrenewed past its length publishes
//! `Reclaim` naming the lease token; the first such event in the stream
//! wins (records `lease_lost`, requeues or fails the job) and its publisher
//! sends a new work message. **Complete, fail, cancelled, release** are
//! events fenced by the token. **Cancel** is an event: a queued job ends at
//! once (its work message, when it comes, loses), a running one is flagged
//! and its worker sees the flag in the verdict of its next heartbeat.
//! **Retry** is an event plus a new work message.
//!
//! Publishes are confirmed. An event is published again with the same nonce
//! after a lost connection, and the fold gives a repeated nonce its first
//! verdict, so a retried publish never applies twice.
//!
//! Known limit: a process that dies between an event that requeues a job
//! and the work message that follows it (two confirmed publishes,
//! milliseconds apart) leaves the job queued with no message; `gpupool
//! cancel` then `gpupool retry` sends it again.
//!
//! Upgrading: a worker older than id-less work messages cannot read one and
//! drops it, leaving that job queued with no message (recover it the same
//! way). Upgrade the workers before the machines that push.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, Error, FailOutcome, Failure, Heartbeat, JobId, JobRecord,
    JobSpec, Lease, ListFilter, Queue, ReserveRequest, Result, RunInfo, Timestamp, WorkerInfo,
};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::warn;

use crate::ledger::{Envelope, Event, Outcome, State};
use crate::options::AmqpOptions;

const BACKEND: &str = "amqp";

/// How long an event may take to be published and applied, reconnecting
/// as needed, before the call reports `Unavailable`.
const EMIT_WITHIN: Duration = Duration::from_secs(60);

/// A lease is reclaimed only this long after it ran out, so a heartbeat in
/// flight is not mistaken for a missing one.
const RECLAIM_GRACE: Duration = Duration::from_millis(250);

/// The longest single wait on consumers; a waiting reserve also looks for
/// expired leases between waits.
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// A work message: one dispatch of one job. A fresh push's names only its
/// dispatch (it is sent once the `Pushed` event is confirmed, before the
/// pusher has read the job's id back); the ledger finds the job by it.
#[derive(Debug, Serialize, Deserialize)]
struct Work {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    dispatch: String,
}

/// One live connection with its publishing channel and ledger consumer.
struct Link {
    connection: Connection,
    publish: Channel,
    alive: Arc<AtomicBool>,
}

impl Link {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && self.connection.status().connected()
    }
}

struct Inner {
    opts: AmqpOptions,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    state: StdMutex<State>,
    waiters: StdMutex<HashMap<String, oneshot::Sender<Outcome>>>,
    declared: StdMutex<HashSet<String>>,
    /// Set when a (re)connect started a replay that reads have not yet
    /// waited for.
    replaying: AtomicBool,
}

/// A queue on RabbitMQ ≥ 3.10 (streams and quorum queues).
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpQueue").field("opts", &self.inner.opts).finish_non_exhaustive()
    }
}

fn unavailable(message: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: BACKEND, source: gpupool_core::redact::redact_url(&message.to_string()).into() }
}

fn now_ms() -> i64 {
    Timestamp::now().0
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn offset_of(props: &BasicProperties) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

impl AmqpQueue {
    /// Connects to the RabbitMQ an `amqp://` or `amqps://` URL names,
    /// declares the ledger and replays it. Fails within the connect timeout
    /// with one line naming `host:port` and the cause.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(AmqpOptions::from_url(url)?).await
    }

    /// Connects with parsed options.
    pub async fn open(opts: AmqpOptions) -> Result<Self> {
        let q = AmqpQueue {
            inner: Arc::new(Inner {
                opts,
                link: tokio::sync::Mutex::new(None),
                state: StdMutex::default(),
                waiters: StdMutex::default(),
                declared: StdMutex::default(),
                replaying: AtomicBool::new(false),
            }),
        };
        q.link().await?;
        q.caught_up().await?;
        Ok(q)
    }

    /// The options in use.
    pub fn options(&self) -> &AmqpOptions {
        &self.inner.opts
    }

    fn ledger_name(&self) -> String {
        format!("{}ledger", self.inner.opts.prefix)
    }

    fn work_name(&self, queue: &str) -> String {
        format!("{}work.{queue}", self.inner.opts.prefix)
    }

    /// Names of everything this queue declared (tests delete them).
    pub fn declared_queues(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.inner.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
        v.push(self.ledger_name());
        v
    }

    /// Deletes the ledger and the work queue of every job queue the ledger
    /// or this handle knows: everything under this prefix (tests clean up
    /// with it).
    pub async fn delete_queues(&self) -> Result<()> {
        self.sync().await?;
        let mut names: HashSet<String> = self.declared_queues().into_iter().collect();
        {
            let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            names.extend(st.jobs.values().map(|j| self.work_name(&j.record.spec.queue)));
        }
        let link = self.link().await?;
        let ch = link.connection.create_channel().await.map_err(unavailable)?;
        for name in names {
            let _ = ch.queue_delete(name.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        }
        let _ = ch.close(200, "bye".into()).await;
        Ok(())
    }

    /// The live link, connecting (and replaying the ledger) if needed.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.inner.link.lock().await;
        if let Some(link) = slot.as_ref().filter(|l| l.is_alive()) {
            return Ok(Arc::clone(link));
        }
        let opts = &self.inner.opts;
        let fail = |cause: String| unavailable(format!("cannot connect to RabbitMQ at {}: {cause}", opts.endpoint));
        let props = ConnectionProperties::default().with_connection_name(gpupool_core::default_worker_name().into());
        let connection =
            match tokio::time::timeout(opts.connect_timeout, Connection::connect(&opts.driver_url, props)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(fail(e.to_string())),
                Err(_) => return Err(fail(format!("no answer within {} s", opts.connect_timeout.as_secs()))),
            };
        let publish = connection.create_channel().await.map_err(unavailable)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(opts.ledger_max_age.as_str().into()));
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(opts.ledger_max_bytes));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        publish.queue_declare(self.ledger_name().as_str().into(), durable, args).await.map_err(unavailable)?;

        // Replay the whole ledger into a fresh state, then follow it.
        let ledger_ch = connection.create_channel().await.map_err(unavailable)?;
        ledger_ch.basic_qos(1000, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut from = FieldTable::default();
        from.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let mut consumer = ledger_ch
            .basic_consume(self.ledger_name().as_str().into(), "".into(), BasicConsumeOptions::default(), from)
            .await
            .map_err(unavailable)?;
        *self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = State::default();
        self.inner.replaying.store(true, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        let (inner, still) = (Arc::clone(&self.inner), Arc::clone(&alive));
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { break };
                let offset = offset_of(&delivery.properties).unwrap_or(-1);
                match serde_json::from_slice::<Envelope>(&delivery.data) {
                    Ok(env) => {
                        let nonce = env.nonce.clone();
                        let outcome = inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(
                            offset,
                            env,
                            Instant::now(),
                            now_ms(),
                        );
                        let waiter =
                            inner.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&nonce);
                        if let Some(tx) = waiter {
                            let _ = tx.send(outcome);
                        }
                    }
                    Err(e) => warn!("ledger event at offset {offset} is not readable ({e}); skipped"),
                }
                if !matches!(delivery.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
                    break;
                }
            }
            still.store(false, Ordering::Relaxed);
        });
        let link = Arc::new(Link { connection, publish, alive });
        *slot = Some(Arc::clone(&link));
        Ok(link)
    }

    fn drop_link(&self, link: &Link) {
        link.alive.store(false, Ordering::Relaxed);
    }

    async fn declare_work(&self, link: &Link, queue: &str) -> Result<()> {
        let name = self.work_name(queue);
        if self.inner.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&name) {
            return Ok(());
        }
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        link.publish.queue_declare(name.as_str().into(), durable, args).await.map_err(unavailable)?;
        self.inner.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name);
        Ok(())
    }

    /// Publishes persistently to a queue through the default exchange and
    /// waits for the broker's confirm.
    async fn publish(link: &Link, queue: &str, payload: &[u8]) -> Result<()> {
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let confirm = link
            .publish
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), payload, props)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        if confirm.is_ack() { Ok(()) } else { Err(unavailable(format!("the broker refused a message for {queue}"))) }
    }

    /// Publishes an event and waits for its verdict, reconnecting and
    /// publishing again (same nonce) on trouble, for up to [`EMIT_WITHIN`].
    async fn emit(&self, event: Event) -> Result<Outcome> {
        self.emit_envelope(Envelope { nonce: nonce(), at: now_ms(), event }).await
    }

    /// Publishes an event to the ledger and waits for the broker's confirm;
    /// the receiver gets its verdict when this process's consumer applies it.
    async fn publish_event(&self, nonce: &str, payload: &[u8]) -> Result<(Arc<Link>, oneshot::Receiver<Outcome>)> {
        let link = self.link().await?;
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(nonce.to_owned(), tx);
        if let Err(e) = Self::publish(&link, &self.ledger_name(), payload).await {
            self.drop_link(&link);
            return Err(e);
        }
        Ok((link, rx))
    }

    /// Waits for the verdict of a published event.
    async fn verdict(&self, link: &Link, rx: oneshot::Receiver<Outcome>) -> Result<Outcome> {
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                self.drop_link(link);
                Err(unavailable("the ledger did not show the event within 10 s"))
            }
        }
    }

    /// A push without an idempotency key: once the ledger has confirmed the
    /// `Pushed` event, the work message (naming only the dispatch) goes out
    /// while this process reads its id back. Every `Leased` a worker
    /// publishes after seeing that message lands after `Pushed` in the
    /// ledger, which is what lets the fold find the job by its dispatch. On
    /// any trouble it falls back to the sequential path with the same nonce.
    async fn push_fast(&self, spec: JobSpec) -> Result<JobId> {
        let queue = spec.queue.clone();
        let dispatch = nonce();
        let event = Event::Pushed { spec: Box::new(spec), dispatch: dispatch.clone() };
        let env = Envelope { nonce: nonce(), at: now_ms(), event };
        let payload = serde_json::to_vec(&env).map_err(|e| Error::backend(BACKEND, e))?;
        let outcome = match self.publish_event(&env.nonce, &payload).await {
            Ok((link, rx)) => {
                let (sent, outcome) =
                    tokio::join!(self.dispatch(&queue, None, dispatch.clone()), self.verdict(&link, rx));
                sent?;
                match outcome {
                    Ok(o) => o,
                    Err(_) => self.emit_envelope(env).await?,
                }
            }
            Err(_) => {
                // Not confirmed: publish again (same nonce) the slow way,
                // then send the work message.
                let outcome = self.emit_envelope(env.clone()).await?;
                if let Outcome::Pushed(_) = outcome {
                    self.dispatch(&queue, None, dispatch.clone()).await?;
                }
                outcome
            }
        };
        match outcome {
            Outcome::Pushed(id) | Outcome::Existing(id) => Ok(JobId::new(id)),
            other => Err(Error::backend(BACKEND, format!("push: unexpected verdict {other:?}"))),
        }
    }

    /// [`Self::emit`] of an envelope already built (a repeat keeps its
    /// nonce, so the fold gives it the first verdict).
    async fn emit_envelope(&self, env: Envelope) -> Result<Outcome> {
        let payload = serde_json::to_vec(&env).map_err(|e| Error::backend(BACKEND, e))?;
        let deadline = Instant::now() + EMIT_WITHIN;
        let mut pause = Duration::from_millis(100);
        loop {
            let attempt = async {
                let (link, rx) = self.publish_event(&env.nonce, &payload).await?;
                self.verdict(&link, rx).await
            };
            match attempt.await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if Instant::now() + pause >= deadline => return Err(e),
                Err(e) => {
                    warn!("RabbitMQ: {e}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Sends a work message for one dispatch of a job.
    async fn dispatch(&self, queue: &str, id: Option<&str>, dispatch: String) -> Result<()> {
        let payload = serde_json::to_vec(&Work { id: id.map(str::to_owned), dispatch })
            .map_err(|e| Error::backend(BACKEND, e))?;
        let deadline = Instant::now() + EMIT_WITHIN;
        loop {
            let attempt = async {
                let link = self.link().await?;
                self.declare_work(&link, queue).await?;
                let r = Self::publish(&link, &self.work_name(queue), &payload).await;
                if r.is_err() {
                    self.drop_link(&link);
                }
                r
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn sync(&self) -> Result<()> {
        self.emit(Event::Sync).await.map(|_| ())
    }

    /// Waits for the replay a (re)connect started, so that decisions made
    /// from the local state (which leases expired) see the whole ledger.
    async fn caught_up(&self) -> Result<()> {
        if self.inner.replaying.load(Ordering::Relaxed) {
            self.sync().await?;
            self.inner.replaying.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lease_for(&self, id: &str, token: String, lease: Duration) -> Result<Lease> {
        let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let job = st.jobs.get(id).ok_or_else(|| Error::backend(BACKEND, format!("leased job {id} vanished")))?;
        let mut record = job.record.clone();
        record.errors = st.errors_of(id);
        Ok(Lease { job: record, token, expires_at: Timestamp::now().plus(lease) })
    }

    /// Reclaims leases this process sees expired.
    async fn reap(&self) -> Result<()> {
        self.caught_up().await?;
        let now = Instant::now();
        let expired: Vec<(String, String, String)> = {
            let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.jobs
                .values()
                .filter(|j| j.expired(now, RECLAIM_GRACE))
                .filter_map(|j| Some((j.record.id.to_string(), j.token.clone()?, j.record.spec.queue.clone())))
                .collect()
        };
        for (id, token, queue) in expired {
            let dispatch = nonce();
            if let Outcome::Requeued(d) = self.emit(Event::Reclaim { id: id.clone(), token, dispatch }).await? {
                self.dispatch(&queue, Some(&id), d).await?;
            }
        }
        Ok(())
    }

    /// Sends parked jobs of the caller's queues that it is big enough for
    /// back into their queues.
    async fn unpark(&self, req: &ReserveRequest) -> Result<()> {
        let fits: Vec<(String, String)> = {
            let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.jobs
                .values()
                .filter(|j| j.parked.is_some_and(|g| g <= req.gpu_limit()) && req.queues.contains(&j.record.spec.queue))
                .map(|j| (j.record.id.to_string(), j.record.spec.queue.clone()))
                .collect()
        };
        for (id, queue) in fits {
            if let Outcome::Requeued(d) = self.emit(Event::Unpark { id: id.clone(), dispatch: nonce() }).await? {
                self.dispatch(&queue, Some(&id), d).await?;
            }
        }
        Ok(())
    }

    /// Leases the job a work message names, if its dispatch is current.
    async fn lease_work(&self, data: &[u8], req: &ReserveRequest) -> Result<Option<Lease>> {
        let Ok(work) = serde_json::from_slice::<Work>(data) else {
            warn!("a work message is not readable; dropped");
            return Ok(None);
        };
        let token = nonce();
        let event = Event::Leased {
            id: work.id,
            dispatch: work.dispatch,
            token: token.clone(),
            worker: req.worker.clone(),
            lease_ms: ms(req.lease),
        };
        match self.emit(event).await? {
            Outcome::Leased(id) => Ok(Some(self.lease_for(&id, token, req.lease)?)),
            _ => Ok(None),
        }
    }

    /// One pass: `basic.get` on each queue in order; with `wait`, then
    /// consumers on all of them until one delivers or the wait is over.
    async fn take(&self, req: &ReserveRequest, wait: Option<Duration>) -> Result<Option<Lease>> {
        let link = self.link().await?;
        for q in &req.queues {
            self.declare_work(&link, q).await?;
        }
        let ch = link.connection.create_channel().await.map_err(|e| {
            self.drop_link(&link);
            unavailable(e)
        })?;
        let result = self.take_on(&ch, req, wait).await;
        // Closing the channel puts back anything delivered and not acked.
        // The lease is won and its message acknowledged by now, so the
        // close need not hold up the caller.
        tokio::spawn(async move {
            let _ = ch.close(200, "done".into()).await;
        });
        result
    }

    async fn take_on(&self, ch: &Channel, req: &ReserveRequest, wait: Option<Duration>) -> Result<Option<Lease>> {
        let Some(wait) = wait else {
            for q in &req.queues {
                // Stale messages (cancelled jobs, duplicates) are acked and skipped.
                for _ in 0..100 {
                    let got = ch
                        .basic_get(self.work_name(q).as_str().into(), BasicGetOptions::default())
                        .await
                        .map_err(unavailable)?;
                    let Some(msg) = got else { break };
                    let lease = self.lease_work(&msg.delivery.data, req).await?;
                    if !matches!(msg.delivery.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
                        warn!("a work message could not be acknowledged; its redelivery will be skipped");
                    }
                    if lease.is_some() {
                        return Ok(lease);
                    }
                }
            }
            return Ok(None);
        };
        ch.basic_qos(1, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut consumers = Vec::new();
        for q in &req.queues {
            let c = ch
                .basic_consume(
                    self.work_name(q).as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            consumers.push(c);
        }
        let tags: Vec<String> = consumers.iter().map(|c| c.tag().to_string()).collect();
        let mut all = futures_util::stream::select_all(consumers);
        let first = tokio::time::timeout(wait, all.next()).await;
        for tag in &tags {
            let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        let delivery = match first {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(unavailable(e)),
            Ok(None) | Err(_) => return Ok(None),
        };
        let lease = self.lease_work(&delivery.data, req).await?;
        if !matches!(delivery.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
            warn!("a work message could not be acknowledged; its redelivery will be skipped");
        }
        Ok(lease)
    }

    fn fenced(lease: &Lease, outcome: Outcome) -> Result<Outcome> {
        match outcome {
            Outcome::Rejected => Err(Error::LeaseLost { id: lease.id().to_string() }),
            other => Ok(other),
        }
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_blocking_reserve(true).with_multi_process(true).with_workers(true)
    }

    async fn init(&self) -> Result<()> {
        self.link().await.map(|_| ())
    }

    async fn push(&self, spec: JobSpec) -> Result<JobId> {
        spec.validate()?;
        if spec.idempotency_key.is_none() {
            return self.push_fast(spec).await;
        }
        // With a key, the verdict (a new job or the existing one) decides
        // whether a work message goes out at all.
        let queue = spec.queue.clone();
        let dispatch = nonce();
        match self.emit(Event::Pushed { spec: Box::new(spec), dispatch: dispatch.clone() }).await? {
            Outcome::Pushed(id) => {
                self.dispatch(&queue, Some(&id), dispatch).await?;
                Ok(JobId::new(id))
            }
            Outcome::Existing(id) => Ok(JobId::new(id)),
            other => Err(Error::backend(BACKEND, format!("push: unexpected verdict {other:?}"))),
        }
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            self.reap().await?;
            self.unpark(req).await?;
            if let Some(lease) = self.take(req, None).await? {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if let Some(lease) = self.take(req, Some((deadline - now).min(WAIT_SLICE))).await? {
                return Ok(Some(lease));
            }
        }
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        let event = Event::Heartbeat { id: lease.id().to_string(), token: lease.token.clone(), lease_ms: ms(extend) };
        match Self::fenced(lease, self.emit(event).await?)? {
            Outcome::Beat { cancel: true } => Ok(Heartbeat::CancelRequested),
            _ => Ok(Heartbeat::Extended),
        }
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        let event = Event::Started {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            commit: info.commit.clone(),
            gpu_ids: info.gpu_ids.clone(),
        };
        Self::fenced(lease, self.emit(event).await?).map(|_| ())
    }

    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> {
        let event = Event::Completed {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            output_tail: done.output_tail,
            result: done.result,
        };
        Self::fenced(lease, self.emit(event).await?).map(|_| ())
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let event = Event::Failed {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            kind: failure.kind,
            exit_code: failure.exit_code,
            signal: failure.signal,
            message: failure.message,
            output_tail: failure.output_tail,
            dispatch: nonce(),
        };
        match Self::fenced(lease, self.emit(event).await?)? {
            Outcome::Requeued(d) => {
                self.dispatch(&lease.job.spec.queue, Some(lease.id().as_str()), d).await?;
                Ok(FailOutcome::Requeued)
            }
            _ => Ok(FailOutcome::Failed),
        }
    }

    async fn cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        let event = Event::Cancelled { id: lease.id().to_string(), token: lease.token.clone(), output_tail };
        Self::fenced(lease, self.emit(event).await?).map(|_| ())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let event = Event::Released { id: lease.id().to_string(), token: lease.token.clone(), dispatch: nonce() };
        if let Outcome::Requeued(d) = Self::fenced(lease, self.emit(event).await?)? {
            self.dispatch(&lease.job.spec.queue, Some(lease.id().as_str()), d).await?;
        }
        Ok(())
    }

    async fn cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        match self.emit(Event::Cancel { id: id.to_string() }).await? {
            Outcome::Missing => Err(Error::NotFound { id: id.to_string() }),
            Outcome::Cancelled => Ok(CancelOutcome::Cancelled),
            Outcome::Requested => Ok(CancelOutcome::Requested),
            Outcome::State(s) => Ok(CancelOutcome::AlreadyEnded(s)),
            other => Err(Error::backend(BACKEND, format!("cancel: unexpected verdict {other:?}"))),
        }
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        match self.emit(Event::Retry { id: id.to_string(), dispatch: nonce() }).await? {
            Outcome::Missing => Err(Error::NotFound { id: id.to_string() }),
            Outcome::Requeued(d) => {
                let queue = self.get(id).await?.spec.queue;
                self.dispatch(&queue, Some(id.as_str()), d).await
            }
            Outcome::State(state) => Err(Error::not_retryable(id, state)),
            other => Err(Error::backend(BACKEND, format!("retry: unexpected verdict {other:?}"))),
        }
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        self.sync().await?;
        let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let job = st.jobs.get(id.as_str()).ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        let mut record = job.record.clone();
        record.errors = st.errors_of(id.as_str());
        Ok(record)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        self.sync().await?;
        let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(st
            .order
            .iter()
            .rev()
            .filter_map(|id| st.jobs.get(id))
            .filter(|j| filter.state.is_none_or(|s| j.record.state == s))
            .filter(|j| filter.queue.as_ref().is_none_or(|q| &j.record.spec.queue == q))
            .skip(usize::try_from(filter.offset).unwrap_or(usize::MAX))
            .take(filter.limit as usize)
            .map(|j| j.record.clone())
            .collect())
    }

    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()> {
        let event = Event::Parked { id: lease.id().to_string(), token: lease.token.clone(), gpus };
        Self::fenced(lease, self.emit(event).await?).map(|_| ())
    }

    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        self.emit(Event::Worker { info: Box::new(info.clone()) }).await.map(|_| ())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        self.emit(Event::WorkerGone { name: name.to_owned() }).await.map(|_| ())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.sync().await?;
        let now = Timestamp::now();
        let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(st.workers.values().map(|w| WorkerInfo { lost: w.lost_at(now), ..w.clone() }).collect())
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        self.sync().await?;
        let st = self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(st
            .errors
            .iter()
            .rev()
            .filter(|e| job.is_none_or(|j| &e.job_id == j))
            .take(limit as usize)
            .cloned()
            .collect())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(slot) = self.link.try_lock()
            && let Some(link) = slot.as_ref()
        {
            link.alive.store(false, Ordering::Relaxed);
        }
    }
}
