//! [`AmqpQueue`]: the [`Queue`] on RabbitMQ alone.
//!
//! One thing is declared, named under the prefix (default `gpupool.`):
//! `PREFIXledger`, a stream (`x-queue-type=stream`, with `x-max-age` and
//! `x-max-length-bytes` retention) holding every change to every job as a
//! JSON event. Each process loads the newest snapshot of the fold from
//! `PREFIXsnapshots` and consumes the ledger from the event after it,
//! folding it into the jobs' state (module `ledger`), which is what `jobs`,
//! `errors`, `get` and `list` read, what hands out jobs, and what decides
//! every race. The crate docs say who writes snapshots and what the fold
//! keeps.
//!
//! **A push** is one confirmed `Pushed` event; its offset is the job's id.
//!
//! **A reserve** publishes a `Want` (its queues, the GPUs it can give, a
//! fresh lease token). The fold leases it the best queued job that fits
//! (queue order, then priority, then the oldest), or keeps the want, and
//! hands it the first fitting job that is queued later. A want that may
//! wait lives 30 s in the fold and is renewed before then, and it outlives
//! the `reserve` call that made it: the worker's next call picks up a job
//! handed to it in between. So an idle worker writes one event every 25 s,
//! and a push reaches it in the one event that queues the job: the worker
//! learns of its lease when its own consumer applies `Pushed`. No two
//! workers ever contend for a job, and no delivery is held, so RabbitMQ's
//! `consumer_timeout` (30 min by default, not settable per queue on 3.10)
//! never fires on a training run. A worker with several free slots
//! (`reserve_many`) publishes, when its fold shows that many jobs queued,
//! one want per slot at once (wants that take only a job queued now), so
//! the batch costs one trip through the ledger.
//!
//! There is no work queue: a lease is one confirmed event, no job can be
//! left queued without a message, and the fold alone decides who holds a
//! job, so it can filter by GPU count and honour priorities.
//!
//! **A heartbeat** is a `Heartbeat` event: every process notes, by its own
//! clock, when it saw the lease renewed. **A dead worker's job**: any
//! reserving process that sees a lease unrenewed past its length publishes
//! `Reclaim` naming the lease token; the first such event in the stream
//! that comes after the lease's end in ledger order wins (records
//! `lease_lost`, requeues or fails the job): a Reclaim published before
//! the last renewal's time plus the lease is refused, so a process that
//! was paused or cut off, and reclaims from its older view, never ends a
//! lease that a later heartbeat renewed. (Upgrading across this rule:
//! stop every process first; a ledger written before it replays the same
//! unless its processes' clocks disagreed by more than 250 ms.)
//! **Complete,
//! fail, cancelled, release** are events fenced by the token. **Cancel** is
//! an event: a queued job ends at once, a running one is flagged and its
//! worker sees the flag in the verdict of its next heartbeat. **Retry** is
//! an event.
//!
//! A reconnect closes the old connection before it opens the new one, and
//! an old ledger consumer still delivering stops before it applies
//! anything to the new fold (each connection has a generation).
//!
//! Publishes are confirmed. An event is published again with the same nonce
//! after a lost connection, and the fold gives a repeated nonce its first
//! verdict, so a retried publish never applies twice.
//!
//! Known limits: a want's life is measured by the clocks in the events, so
//! the hosts' clocks should agree within a few seconds (NTP); a pusher
//! whose clock runs far ahead makes jobs wait for the next renewal. A
//! worker killed while idle leaves a want that may still be handed a job
//! for up to 30 s; that job runs again after its lease runs out, charged a
//! `lease_lost` attempt, as a job of any worker killed mid-run is. A worker
//! that stops withdraws its wants and gives back (uncharged) a job handed
//! to one of them as soon as it stops reserving (`stop_reserving`, before
//! its running jobs drain): a program of your own that calls `reserve`
//! with a wait and then stops reserving should call it too, with the
//! worker name of its requests.
//!
//! Upgrading from the version with work queues: stop every worker first.
//! The old events replay as before; the `PREFIXwork.QUEUE` queues are no
//! longer used and can be deleted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use gpupool_core::sync::lock;
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, Error, FailOutcome, Failure, Heartbeat, JobId, JobRecord,
    JobSpec, JobState, Lease, ListFilter, Pushed, Queue, ReserveRequest, Result, RunInfo, Timestamp, WorkerInfo,
    WorkerRegistry,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, oneshot};
use tracing::{debug, warn};

use crate::ledger::{Ask, Envelope, Event, LogIndex, Outcome, SNAPSHOT_VERSION, Snapshot, State};

mod blobs;
use crate::options::AmqpOptions;

const BACKEND: &str = "amqp";

/// How long an event may take to be published and applied, reconnecting
/// as needed, before the call reports `Unavailable`.
const EMIT_WITHIN: Duration = Duration::from_secs(60);

/// The longest pause between tries of an event while the broker cannot be
/// reached (see `emit`).
const EMIT_RETRY_MAX: Duration = Duration::from_secs(1);

/// A lease is reclaimed only this long after it ran out, so a heartbeat in
/// flight is not mistaken for a missing one.
const RECLAIM_GRACE: Duration = Duration::from_millis(250);

/// How long a want that may wait lives in the fold.
const WANT_FOR: Duration = Duration::from_secs(30);

/// A waiting want is replaced when less than this is left of its life.
const RENEW_BEFORE: Duration = Duration::from_secs(5);

/// Expired leases are looked for at most this often, and at least this
/// often while a reserve waits.
const REAP_EVERY: Duration = Duration::from_millis(100);
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// The ledger consumer acknowledges every this many deliveries at once
/// (its prefetch is far larger).
const ACK_EVERY: u64 = 64;

/// How long a connect waits for the newest snapshot to arrive, and then
/// for more of the stream's last chunk (a chunk's messages come at once).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);
const SNAPSHOT_GAP: Duration = Duration::from_millis(20);

/// The snapshot writer checks whether one is due this often while it holds
/// the writer's token, and gives the token back (to take it again, unless
/// it has lost the election) this often.
const SNAPSHOT_CHECK_EVERY: Duration = Duration::from_secs(1);
const WRITER_HOLDS_FOR: Duration = Duration::from_secs(10);

/// A process that has not seen the writer's token for this long puts one
/// in the election queue (it keeps at most one waiting).
const TOKEN_AFTER: Duration = Duration::from_secs(60);

/// After a snapshot could not be written, the writer waits this long
/// before it tries again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(60);

/// A snapshot bigger than this is not written (RabbitMQ refuses messages
/// over 128 MiB by default); the finished-job window keeps it far below.
const SNAPSHOT_MAX_BYTES: usize = 120 << 20;

/// One live connection with its publishing channel and ledger consumer.
struct Link {
    connection: Connection,
    publish: Channel,
    alive: Arc<AtomicBool>,
    /// This connection takes part in the snapshot writer's election.
    electing: AtomicBool,
}

impl Link {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && self.connection.status().connected()
    }
}

/// Ledger events that wait, while the outbox's message before them is on
/// its way, to go out together in the next (group commit): a worker whose
/// runs end together writes their ends in one message, not one each, and
/// an event published alone goes at once. The broker's work is by message,
/// so this is most of what a short job costs it. Only events that
/// [`Event::batches`]; a push is its own message.
///
/// A message of several events is a JSON array of their envelopes, which
/// a gpupool before this one does not read: every process of a pool must
/// be of this version or later (README, "Backends").
#[derive(Default)]
struct Outbox {
    /// Each event's envelope, and where its message's confirm goes.
    waiting: Vec<(Vec<u8>, oneshot::Sender<Result<()>>)>,
    /// A sender is running; it takes what waits.
    sending: bool,
    /// Messages sent, and the events they carried (tests).
    #[cfg(test)]
    sent: (usize, usize),
}

impl Outbox {
    /// At most this many events, and about this many bytes, a message.
    const MAX_EVENTS: usize = 256;
    const MAX_BYTES: usize = 1 << 20;

    /// The events for the next message, oldest first.
    fn take(&mut self) -> Vec<(Vec<u8>, oneshot::Sender<Result<()>>)> {
        let mut bytes = 0;
        let n = self
            .waiting
            .iter()
            .take(Self::MAX_EVENTS)
            .take_while(|(p, _)| {
                bytes += p.len();
                bytes <= Self::MAX_BYTES
            })
            .count()
            .max(1);
        self.waiting.drain(..n).collect()
    }

    /// One event's envelope as it is; several as a JSON array.
    fn message(group: &[(Vec<u8>, oneshot::Sender<Result<()>>)]) -> Vec<u8> {
        if let [(only, _)] = group {
            return only.clone();
        }
        let mut body = Vec::with_capacity(group.iter().map(|(p, _)| p.len() + 1).sum::<usize>() + 1);
        body.push(b'[');
        for (i, (p, _)) in group.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(p);
        }
        body.push(b']');
        body
    }
}

/// What a reserve asks for.
fn ask_of(req: &ReserveRequest) -> Ask {
    Ask {
        worker: req.worker.clone(),
        queues: req.queues.clone(),
        gpu_limit: req.gpu_limit(),
        gpu_host: req.gpu_host,
        lease_ms: ms(req.lease),
    }
}

/// A want of this handle's that waits in the fold.
#[derive(Debug)]
struct Standing {
    token: String,
    ask: Ask,
    /// When to replace it (before the fold lets it go).
    renew_at: Instant,
    /// A reserve call is waiting on it.
    busy: bool,
}

struct Inner {
    opts: AmqpOptions,
    /// This handle's name in the wants it publishes.
    owner: String,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    state: StdMutex<State>,
    waiters: StdMutex<HashMap<String, oneshot::Sender<Outcome>>>,
    /// Woken when the fold hands a job to one of this handle's wants.
    handed: Notify,
    standing: StdMutex<Vec<Standing>>,
    last_reap: StdMutex<Option<Instant>>,
    /// Set when a (re)connect started a replay that reads have not yet
    /// waited for.
    replaying: AtomicBool,
    /// Blob streams this handle declared.
    blob_streams: StdMutex<std::collections::HashSet<String>>,
    /// Counts this handle's connections: a ledger consumer applies events
    /// only while its connection is the newest, so an old consumer still
    /// delivering after a reconnect never writes into the new fold.
    generation: std::sync::atomic::AtomicU64,
    /// Where each lease this handle ships for puts its next piece.
    cursors: StdMutex<HashMap<String, Cursor>>,
    /// Ledger events waiting to go out together.
    outbox: StdMutex<Outbox>,
    /// This handle found no ledger when it opened: its first connection
    /// declares one, and writes the empty snapshot a new ledger starts from.
    fresh: AtomicBool,
    /// Where the ledger's events lost to retention were already reported.
    gap_reported: AtomicBool,
    /// When writing a snapshot last failed (the writer waits before trying
    /// again).
    snapshot_failed: StdMutex<Option<Instant>>,
    /// Tests hold it to stop the ledger consumer between deliveries.
    #[cfg(test)]
    gate: tokio::sync::Mutex<()>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn standing(&self) -> std::sync::MutexGuard<'_, Vec<Standing>> {
        lock(&self.standing)
    }
}

/// Marks a waiting want free for the next reserve when the call waiting on
/// it ends (returns, fails or is dropped).
struct Busy<'a> {
    inner: &'a Inner,
    token: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.inner.standing().iter_mut().find(|s| s.token == self.token) {
            s.busy = false;
        }
    }
}

/// A queue on RabbitMQ ≥ 3.10 (streams).
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
        let owner = nonce();
        let q = AmqpQueue {
            inner: Arc::new(Inner {
                opts,
                state: StdMutex::new(State::new(&owner)),
                owner,
                link: tokio::sync::Mutex::new(None),
                waiters: StdMutex::default(),
                handed: Notify::new(),
                standing: StdMutex::default(),
                last_reap: StdMutex::default(),
                replaying: AtomicBool::new(false),
                blob_streams: StdMutex::default(),
                cursors: StdMutex::default(),
                outbox: StdMutex::default(),
                generation: std::sync::atomic::AtomicU64::new(0),
                fresh: AtomicBool::new(false),
                gap_reported: AtomicBool::new(false),
                snapshot_failed: StdMutex::default(),
                #[cfg(test)]
                gate: tokio::sync::Mutex::const_new(()),
            }),
        };
        // A ledger that is there is followed at once; one that is not is
        // declared by `init` or the first call that needs it, so that
        // opening a mistyped prefix or vhost creates nothing.
        if q.ledger_declared().await? {
            q.link().await?;
            q.caught_up().await?;
        } else {
            q.inner.fresh.store(true, Ordering::Relaxed);
        }
        Ok(q)
    }

    /// A new connection to the broker, within the connect timeout; an error
    /// names the endpoint (never the password).
    async fn connect_broker(&self) -> Result<Connection> {
        let opts = &self.inner.opts;
        let fail = |cause: String| unavailable(format!("cannot connect to RabbitMQ at {}: {cause}", opts.endpoint));
        let props = ConnectionProperties::default().with_connection_name(gpupool_core::default_worker_name().into());
        match tokio::time::timeout(opts.connect_timeout, Connection::connect(&opts.driver_url, props)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!("no answer within {} s", opts.connect_timeout.as_secs()))),
        }
    }

    /// Whether the ledger is there: a passive declare on a connection of
    /// its own, which declares nothing (the broker answers 404 for a
    /// ledger that is not there).
    async fn ledger_declared(&self) -> Result<bool> {
        let connection = self.connect_broker().await?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        let passive = QueueDeclareOptions { passive: true, durable: true, ..QueueDeclareOptions::default() };
        let declared = channel.queue_declare(self.ledger_name().as_str().into(), passive, FieldTable::default()).await;
        let _ = connection.close(0, "".into()).await;
        match declared {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The options in use.
    pub fn options(&self) -> &AmqpOptions {
        &self.inner.opts
    }

    fn ledger_name(&self) -> String {
        format!("{}ledger", self.inner.opts.prefix)
    }

    /// The stream of snapshots of the fold.
    fn snapshots_name(&self) -> String {
        format!("{}snapshots", self.inner.opts.prefix)
    }

    /// The queue whose single active consumer writes the snapshots.
    fn writer_name(&self) -> String {
        format!("{}snapshot.writer", self.inner.opts.prefix)
    }

    /// Names of everything this queue declared: the ledger, the snapshot
    /// stream, the snapshot writer's election queue and the log stream.
    pub fn declared_queues(&self) -> Vec<String> {
        vec![self.ledger_name(), self.snapshots_name(), self.writer_name(), self.logs_name()]
    }

    /// The arguments of the ledger and snapshot streams: a stream with the
    /// URL's retention.
    fn stream_args(&self) -> FieldTable {
        let opts = &self.inner.opts;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert("x-max-age".into(), AMQPValue::LongString(opts.ledger_max_age.as_str().into()));
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(opts.ledger_max_bytes));
        if let Some(n) = opts.ledger_segment_bytes {
            args.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(n));
        }
        args
    }

    /// The stream that holds every job's shipped log.
    fn logs_name(&self) -> String {
        format!("{}logs", self.inner.opts.prefix)
    }

    /// Deletes the ledger and the log stream: every job under this prefix
    /// (tests clean up with it).
    pub async fn delete_queues(&self) -> Result<()> {
        let _ = self.sync().await;
        let link = self.link().await?;
        let ch = link.connection.create_channel().await.map_err(unavailable)?;
        for name in self.declared_queues().into_iter().chain(self.blob_streams()) {
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
        // The old connection goes first, with its consumer (briefly: a
        // broken one may not answer).
        if let Some(old) = slot.take() {
            old.alive.store(false, Ordering::Relaxed);
            let _ =
                tokio::time::timeout(Duration::from_secs(1), old.connection.close(200, "reconnecting".into())).await;
        }
        let connection = self.connect_broker().await?;
        let publish = connection.create_channel().await.map_err(unavailable)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        self.declare_streams(&connection, &publish).await?;
        // Start from the newest snapshot (a new ledger's first: the empty
        // fold), then follow the ledger from the event after it.
        let snapshot = self.starting_snapshot(&connection).await?;
        let start = snapshot.as_ref().map_or(0, |s| s.covers + 1);
        let consumer = self.ledger_consumer(&connection, snapshot.is_some().then_some(start)).await?;
        let generation = self.install_fold(snapshot);
        self.inner.replaying.store(true, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(follow_ledger(Arc::clone(&self.inner), consumer, generation, start, Arc::clone(&alive)));
        let link = Arc::new(Link { connection, publish, alive, electing: AtomicBool::new(false) });
        *slot = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Declares the ledger and the snapshot stream. Snapshots are kept as
    /// long as the ledger, in at least 256 MiB: the newest is in the
    /// stream's last segment, which retention never drops.
    async fn declare_streams(&self, connection: &Connection, publish: &Channel) -> Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let ledger = self.ledger_name();
        publish.queue_declare(ledger.as_str().into(), durable, self.stream_args()).await.map_err(unavailable)?;
        let mut args = self.stream_args();
        let bytes = self.inner.opts.ledger_max_bytes.max(256 << 20);
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes));
        let snapshots = self.snapshots_name();
        publish.queue_declare(snapshots.as_str().into(), durable, args).await.map_err(unavailable)?;
        self.declare_logs(connection).await
    }

    /// Declares the log stream with the URL's retention, on a channel of its
    /// own: a stream another process declared with other retention is used
    /// as it is (the broker refuses the declare, and closes that channel).
    async fn declare_logs(&self, connection: &Connection) -> Result<()> {
        let opts = &self.inner.opts;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", opts.log_max_age.as_secs().max(1)).into()),
        );
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(opts.log_max_bytes));
        args.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(LOG_SEGMENT_BYTES));
        let ch = connection.create_channel().await.map_err(unavailable)?;
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        match ch.queue_declare(self.logs_name().as_str().into(), durable, args).await {
            Ok(_) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 406) => {
                debug!("RabbitMQ: the log stream is there with other retention; using it as it is");
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The snapshot a new connection starts from: the newest in the
    /// stream. A handle that found no ledger when it opened uses one
    /// another process wrote since, or else writes the empty one a new
    /// ledger starts from (and starts from the ledger's first event).
    async fn starting_snapshot(&self, connection: &Connection) -> Result<Option<Snapshot>> {
        if !self.inner.fresh.swap(false, Ordering::Relaxed) {
            return self.latest_snapshot(connection, SNAPSHOT_WAIT).await;
        }
        let found = self.latest_snapshot(connection, SNAPSHOT_GAP * 10).await?;
        if found.is_none() {
            let empty = State::new(&self.inner.owner).snapshot();
            self.publish_snapshot(connection, &empty).await?;
        }
        Ok(found)
    }

    /// A consumer of the ledger from offset `from`, or from its first event.
    async fn ledger_consumer(&self, connection: &Connection, from: Option<i64>) -> Result<lapin::Consumer> {
        let ch = connection.create_channel().await.map_err(unavailable)?;
        ch.basic_qos(1000, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut args = FieldTable::default();
        let offset = from.map_or_else(|| AMQPValue::LongString("first".into()), AMQPValue::LongLongInt);
        args.insert("x-stream-offset".into(), offset);
        ch.basic_consume(self.ledger_name().as_str().into(), "".into(), BasicConsumeOptions::default(), args)
            .await
            .map_err(unavailable)
    }

    /// Puts in place the fold a new connection starts from (the snapshot's,
    /// or an empty one) and returns the connection's generation.
    fn install_fold(&self, snapshot: Option<Snapshot>) -> u64 {
        // Copied first: `standing` is never locked inside `state`.
        let standing: Vec<String> = self.inner.standing().iter().map(|s| s.token.clone()).collect();
        let mut st = self.inner.state();
        *st = match snapshot {
            Some(snap) => State::from_snapshot(snap, &self.inner.owner, Instant::now(), now_ms()),
            None => State::new(&self.inner.owner),
        };
        // Jobs handed to this handle's waiting wants before the snapshot.
        for token in standing {
            if let Some(job) = st.jobs.values().find(|j| j.held(&token)) {
                let id = job.record.id.to_string();
                st.handed.insert(token, id);
            }
        }
        self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The newest snapshot in the snapshot stream (its last chunk), if any
    /// can be read. One that cannot (a newer format) is skipped: the ledger
    /// is then replayed from its start.
    /// `wait`: how long to wait for the first snapshot (a big one takes a
    /// while to arrive; an empty stream sends nothing).
    async fn latest_snapshot(&self, connection: &Connection, wait: Duration) -> Result<Option<Snapshot>> {
        let ch = connection.create_channel().await.map_err(unavailable)?;
        ch.basic_qos(4, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut from = FieldTable::default();
        from.insert("x-stream-offset".into(), AMQPValue::LongString("last".into()));
        let mut consumer = ch
            .basic_consume(self.snapshots_name().as_str().into(), "".into(), BasicConsumeOptions::default(), from)
            .await
            .map_err(unavailable)?;
        let mut best: Option<Snapshot> = None;
        let mut wait = wait;
        while let Ok(Some(delivery)) = tokio::time::timeout(wait, consumer.next()).await {
            let delivery = delivery.map_err(unavailable)?;
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            match serde_json::from_slice::<Snapshot>(&delivery.data) {
                Ok(snap) if snap.v > SNAPSHOT_VERSION => {
                    warn!("a snapshot of the ledger is of a newer gpupool (format {}); not used", snap.v);
                }
                Ok(snap) => {
                    if best.as_ref().is_none_or(|b| snap.covers > b.covers) {
                        best = Some(snap);
                    }
                }
                Err(e) => warn!("a snapshot of the ledger is not readable ({e}); not used"),
            }
            wait = SNAPSHOT_GAP;
        }
        let _ = ch.close(200, "read".into()).await;
        Ok(best)
    }

    /// Stores a snapshot in the snapshot stream (confirmed); returns its size.
    async fn publish_snapshot(&self, connection: &Connection, snap: &Snapshot) -> Result<u64> {
        let bytes = serde_json::to_vec(snap).map_err(|e| Error::backend(BACKEND, e))?;
        if bytes.len() > SNAPSHOT_MAX_BYTES {
            return Err(Error::backend(
                BACKEND,
                format!("a snapshot of {} MiB is over the most a message may be; not written", bytes.len() >> 20),
            ));
        }
        let ch = connection.create_channel().await.map_err(unavailable)?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let name = self.snapshots_name();
        let sent = ch.basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), &bytes, props);
        let confirm = sent.await.map_err(unavailable)?.await.map_err(unavailable)?;
        let _ = ch.close(200, "snapshot".into()).await;
        if !confirm.is_ack() {
            return Err(unavailable("the broker refused a snapshot"));
        }
        Ok(bytes.len() as u64)
    }

    /// Whether a snapshot is due: the ledger grew by as much as the last
    /// snapshot's size (at least 1 MiB, at most a quarter of
    /// `ledger_max_bytes`) since it, or a quarter of `ledger_max_age`
    /// passed with events since it; at once when the ledger names none.
    /// So a reconnect reads at most about twice a snapshot's size, and a
    /// snapshot is always well within the ledger's retention.
    fn snapshot_due(&self) -> bool {
        let opts = &self.inner.opts;
        let st = self.inner.state();
        if st.gapped {
            return false;
        }
        let Some(last) = st.last_snapshot else { return st.applied >= 0 };
        if st.since_snapshot == 0 {
            return false; // nothing since the newest snapshot was named
        }
        let cap = u64::try_from(opts.ledger_max_bytes / 4).unwrap_or(0).max(64 << 10);
        let grown = st.since_snapshot >= last.bytes.max(1 << 20).min(cap);
        let quarter = crate::options::age(&opts.ledger_max_age).unwrap_or(Duration::from_secs(86_400)) / 4;
        let aged = now_ms().saturating_sub(last.at) >= i64::try_from(quarter.as_millis()).unwrap_or(i64::MAX);
        grown || aged
    }

    /// Writes a snapshot of this process's fold and names it in the ledger;
    /// returns the last offset it holds. Every process that reserves takes
    /// part in an election for this (see the crate docs); calling it
    /// by hand is harmless, as any process's snapshot is the same.
    pub async fn write_snapshot(&self) -> Result<i64> {
        let link = self.link().await?;
        let snap = self.inner.state().snapshot();
        let covers = snap.covers;
        let bytes = self.publish_snapshot(&link.connection, &snap).await?;
        drop(snap);
        self.emit(Event::Snapshot { covers, bytes }).await?;
        Ok(covers)
    }

    /// The last ledger offset of the newest snapshot the ledger names (none
    /// yet: `None`).
    pub async fn last_snapshot(&self) -> Result<Option<i64>> {
        self.sync().await?;
        Ok(self.inner.state().last_snapshot.map(|s| s.covers))
    }

    /// Joins the election of the snapshot writer, once per connection: a
    /// classic queue with a single active consumer (RabbitMQ picks it, and
    /// picks another when it goes) holding one token message. The active
    /// consumer gets the token, writes snapshots while it holds it, and
    /// gives it back every [`WRITER_HOLDS_FOR`] (so no delivery is held
    /// long enough for `consumer_timeout`); the broker hands it to the same
    /// consumer again. Two writers at once (a moment of failover) are
    /// harmless: every fold's snapshot at an offset is the same.
    async fn elect(&self) -> Result<()> {
        let link = self.link().await?;
        if link.electing.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let joined = async {
            let ch = link.connection.create_channel().await.map_err(unavailable)?;
            let mut args = FieldTable::default();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            args.insert("x-max-length".into(), AMQPValue::LongInt(1));
            let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
            let name = self.writer_name();
            let declared = ch.queue_declare(name.as_str().into(), durable, args).await.map_err(unavailable)?;
            ch.basic_qos(1, BasicQosOptions::default()).await.map_err(unavailable)?;
            let consumer = ch
                .basic_consume(name.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(unavailable)?;
            if declared.message_count() == 0 {
                put_token(&ch, &name).await;
            }
            Ok::<_, Error>((ch, consumer, name))
        };
        match joined.await {
            Ok((ch, consumer, name)) => {
                let weak = Arc::downgrade(&self.inner);
                let alive = Arc::clone(&link.alive);
                let link = Arc::downgrade(&link);
                tokio::spawn(async move {
                    serve_as_writer(weak, ch, consumer, name, alive).await;
                    // Ended with the connection, or its consumer was
                    // cancelled: the next reserve joins again.
                    if let Some(link) = link.upgrade() {
                        link.electing.store(false, Ordering::Relaxed);
                    }
                });
                Ok(())
            }
            Err(e) => {
                link.electing.store(false, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn drop_link(&self, link: &Link) {
        link.alive.store(false, Ordering::Relaxed);
    }

    /// Publishes an event to the ledger and waits for its verdict, which
    /// comes when this process's consumer applies it. A stream delivers only
    /// what it has stored, so the verdict needs no confirm first: whichever
    /// comes first of the verdict and the confirm is waited for, and a
    /// refused publish fails at once. An event that `batches` goes through
    /// the outbox ([`Outbox`]).
    async fn publish_event(&self, nonce: &str, payload: &[u8], batches: bool) -> Result<Outcome> {
        let link = self.link().await?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters).insert(nonce.to_owned(), tx);
        let confirmed: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> = if batches {
            let grouped = self.send_grouped(payload);
            Box::pin(async move { grouped.await.unwrap_or_else(|_| Err(unavailable("the ledger's outbox stopped"))) })
        } else {
            Box::pin(self.send_message(&link, payload).await?)
        };
        let verdict = tokio::time::timeout(Duration::from_secs(10), rx);
        tokio::pin!(verdict);
        let refused = tokio::select! {
            v = &mut verdict => return self.verdict(&link, v),
            c = confirmed => c.err(),
        };
        if let Some(e) = refused {
            self.drop_link(&link);
            return Err(e);
        }
        let v = verdict.await;
        self.verdict(&link, v)
    }

    /// Publishes one ledger message. `Ok` once it is sent; the returned
    /// future is its confirm.
    async fn send_message(&self, link: &Link, body: &[u8]) -> Result<impl std::future::Future<Output = Result<()>>> {
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let ledger = self.ledger_name();
        let sent = link
            .publish
            .basic_publish("".into(), ledger.as_str().into(), BasicPublishOptions::default(), body, props)
            .await;
        let confirm = sent.map_err(|e| {
            self.drop_link(link);
            unavailable(e)
        })?;
        Ok(async move {
            match confirm.await {
                Ok(c) if c.is_ack() => Ok(()),
                Ok(_) => Err(unavailable("the broker refused a ledger event")),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    /// Puts an event in the outbox; the receiver gets whether the message
    /// that carried it was confirmed. Starts the outbox's sender when none
    /// runs.
    fn send_grouped(&self, payload: &[u8]) -> oneshot::Receiver<Result<()>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut outbox = lock(&self.inner.outbox);
            outbox.waiting.push((payload.to_vec(), tx));
            !std::mem::replace(&mut outbox.sending, true)
        };
        if start {
            let queue = self.clone();
            tokio::spawn(async move { queue.send_outbox().await });
        }
        rx
    }

    /// The outbox's sender: sends what waits as one message, waits for its
    /// confirm, and again, until nothing waits.
    async fn send_outbox(self) {
        /// Lets the next event start a sender when this one is dropped
        /// (its runtime shutting down) before it emptied the outbox.
        struct Stopped<'a>(&'a Inner, bool);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    lock(&self.0.outbox).sending = false;
                }
            }
        }
        let mut stopped = Stopped(&self.inner, false);
        loop {
            let group = {
                let mut outbox = lock(&self.inner.outbox);
                // Events whose caller is gone (it gave up, or was dropped)
                // are not sent: a want no call waits on would hold a job.
                outbox.waiting.retain(|(_, tx)| !tx.is_closed());
                if outbox.waiting.is_empty() {
                    outbox.sending = false;
                    stopped.1 = true;
                    return;
                }
                let group = outbox.take();
                #[cfg(test)]
                {
                    outbox.sent.0 += 1;
                    outbox.sent.1 += group.len();
                }
                group
            };
            let body = Outbox::message(&group);
            // A confirm that does not come (a half-open connection, a
            // broker blocking publishers) would hold every event behind
            // it: after the time a verdict is waited for, the link goes
            // and the events are published again on a new one.
            let sent = match self.link().await {
                Ok(link) => {
                    let confirmed = async { self.send_message(&link, &body).await?.await };
                    match tokio::time::timeout(Duration::from_secs(10), confirmed).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            self.drop_link(&link);
                            Err(e)
                        }
                        Err(_) => {
                            self.drop_link(&link);
                            Err(unavailable("the broker did not confirm a ledger message within 10 s"))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            // Each waiter gets the same error, as the broker said it.
            let sent = sent.map_err(|e| match e {
                Error::Unavailable { source, .. } => source.to_string(),
                e => e.to_string(),
            });
            for (_, tx) in group {
                let _ = tx.send(sent.clone().map_err(unavailable));
            }
        }
    }

    /// The verdict of a published event, or `Unavailable` (dropping the
    /// link) when it did not come within 10 s.
    fn verdict(
        &self,
        link: &Link,
        waited: std::result::Result<
            std::result::Result<Outcome, oneshot::error::RecvError>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<Outcome> {
        match waited {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                self.drop_link(link);
                Err(unavailable("the ledger did not show the event within 10 s"))
            }
        }
    }

    /// Publishes an event and waits for its verdict, reconnecting and
    /// publishing again (same nonce) on trouble, for up to [`EMIT_WITHIN`].
    async fn emit(&self, event: Event) -> Result<Outcome> {
        let batches = event.batches();
        let env = Envelope { nonce: nonce(), at: now_ms(), event };
        let payload = serde_json::to_vec(&env).map_err(|e| Error::backend(BACKEND, e))?;
        let deadline = Instant::now() + EMIT_WITHIN;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.publish_event(&env.nonce, &payload, batches).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if Instant::now() + pause >= deadline => return Err(e),
                Err(e) => {
                    warn!("RabbitMQ: {e}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    // At most a second apart: a heartbeat waiting here
                    // must get through as soon as the broker is back, or
                    // an outage shorter than the lease costs the lease.
                    pause = (pause * 2).min(EMIT_RETRY_MAX);
                }
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

    /// The lease on a job the fold gave to `token`, if it still holds it.
    fn lease_for(&self, id: &str, token: String, lease: Duration) -> Option<Lease> {
        let st = self.inner.state();
        let job = st.jobs.get(id).filter(|j| j.token.as_deref() == Some(token.as_str()))?;
        let mut record = job.record.clone();
        record.errors = st.errors_of(id);
        Some(Lease { job: record, token, expires_at: Timestamp::now().plus(lease) })
    }

    /// Reclaims leases this process sees expired (at most every
    /// [`REAP_EVERY`]).
    async fn reap(&self) -> Result<()> {
        self.caught_up().await?;
        let now = Instant::now();
        {
            let mut last = lock(&self.inner.last_reap);
            if last.is_some_and(|t| now.saturating_duration_since(t) < REAP_EVERY) {
                return Ok(());
            }
            *last = Some(now);
        }
        let expired: Vec<(String, String)> = self
            .inner
            .state()
            .jobs
            .values()
            .filter(|j| j.expired(now, RECLAIM_GRACE))
            .filter_map(|j| Some((j.record.id.to_string(), j.token.clone()?)))
            .collect();
        for (id, token) in expired {
            self.emit(Event::Reclaim { id, token, dispatch: None }).await?;
        }
        Ok(())
    }

    /// A job the fold handed to one of this handle's waiting wants that no
    /// reserve call is waiting on (`token: None`), or to the want `token`.
    fn take_handed(&self, token: Option<&str>, lease: Duration) -> Option<Lease> {
        let (token, id) = {
            let mut standing = self.inner.standing();
            let mut st = self.inner.state();
            let i = standing.iter().position(|s| match token {
                Some(t) => s.token == t,
                None => !s.busy && st.handed.contains_key(&s.token),
            })?;
            let id = st.handed.remove(&standing[i].token)?;
            let s = standing.swap_remove(i);
            // Notes replayed after a reconnect, for wants long consumed.
            let live: Vec<&str> = standing.iter().map(|s| s.token.as_str()).collect();
            st.handed.retain(|t, _| live.contains(&t.as_str()));
            (s.token, id)
        };
        self.lease_for(&id, token, lease)
    }

    /// Withdraws a want; a job handed to it before the withdrawal came is
    /// returned.
    async fn withdraw(&self, token: String, lease: Duration) -> Result<Option<Lease>> {
        self.inner.standing().retain(|s| s.token != token);
        match self.emit(Event::Withdraw { token: token.clone() }).await? {
            Outcome::Leased(id) => Ok(self.lease_for(&id, token, lease)),
            _ => Ok(None),
        }
    }

    /// Publishes a want; `wait`: it may wait in the fold (and is kept as
    /// this handle's, busy), else it takes only a job queued now.
    async fn want(&self, req: &ReserveRequest, ask: &Ask, wait: bool) -> Result<(String, Option<Lease>)> {
        let token = nonce();
        let event = Event::Want {
            token: token.clone(),
            owner: self.inner.owner.clone(),
            ask: ask.clone(),
            wait_ms: if wait { ms(WANT_FOR) } else { 0 },
        };
        if wait {
            // Noted before it is published: the fold may hand it a job at once.
            let renew_at = Instant::now() + WANT_FOR - RENEW_BEFORE;
            self.inner.standing().push(Standing { token: token.clone(), ask: ask.clone(), renew_at, busy: true });
        }
        match self.emit(event).await {
            Ok(Outcome::Leased(id)) => {
                self.inner.standing().retain(|s| s.token != token);
                Ok((token.clone(), self.lease_for(&id, token, req.lease)))
            }
            Ok(_) => Ok((token, None)),
            Err(e) => {
                // It may have reached the ledger, and a job may be leased to
                // it: keep it, free and due for renewal, so that the next
                // reserve withdraws it (getting that job) and publishes a
                // new one. A want that did not wait is kept the same way.
                let mut standing = self.inner.standing();
                match standing.iter_mut().find(|s| s.token == token) {
                    Some(s) => {
                        s.busy = false;
                        s.renew_at = Instant::now();
                    }
                    None => standing.push(Standing {
                        token: token.clone(),
                        ask: ask.clone(),
                        renew_at: Instant::now(),
                        busy: false,
                    }),
                }
                Err(e)
            }
        }
    }

    /// What every reserve does first: reclaim the leases this process sees
    /// expired, and join the snapshot writer's election.
    async fn prelude(&self) -> Result<()> {
        self.reap().await?;
        if let Err(e) = self.elect().await {
            warn!("RabbitMQ: cannot join the snapshot writer's election ({e}); trying again at the next reserve");
        }
        Ok(())
    }

    /// The jobs this handle's fold shows queued next that `batch` admits,
    /// one want each that takes only a job queued now, published at once;
    /// what they were handed, in the order the fold hands jobs out. A job
    /// the batch refuses after all (another worker took the one expected)
    /// goes back, uncharged.
    async fn take_batch(&self, req: &ReserveRequest, ask: &Ask, batch: &mut gpupool_core::Batch) -> Vec<Lease> {
        let n = self.inner.state().batch_fits(ask, *batch);
        let now = ReserveRequest { wait: Duration::ZERO, ..req.clone() };
        let mut taken = Vec::new();
        for got in futures_util::future::join_all((0..n).map(|_| self.take_now(&now, ask))).await {
            match got {
                Ok(lease) => taken.extend(lease),
                // What was taken is returned; the next reserve tries again.
                Err(e) => warn!("RabbitMQ: a want of a batch failed ({e})"),
            }
        }
        // In the order the fold hands jobs out (`State::pick`).
        let queue_at = |l: &Lease| ask.queues.iter().position(|q| *q == l.job.spec.queue);
        taken.sort_by_key(|l| (queue_at(l), crate::ledger::rank_of(l.job.spec.priority, l.id().as_str())));
        let mut leases = Vec::new();
        for lease in taken {
            if batch.admit(lease.job.spec.gpus_needed(req.gpu_host)) {
                leases.push(lease);
            } else if let Err(e) = self.release(&lease).await {
                warn!(job_id = %lease.id(), "could not give back a job the batch had no room for ({e}); it returns when its lease ends");
            }
        }
        leases
    }

    /// A job queued now, for a want that does not wait, checked.
    async fn take_now(&self, req: &ReserveRequest, ask: &Ask) -> Result<Option<Lease>> {
        match self.want(req, ask, false).await?.1 {
            Some(lease) => self.checked(lease).await,
            None => Ok(None),
        }
    }

    /// The lease, if its job passes the checks of push
    /// ([`gpupool_core::rows::unfit`]); else the job ends `failed`, kind
    /// `invalid`, and `None`.
    async fn checked(&self, lease: Lease) -> Result<Option<Lease>> {
        let Some(why) = gpupool_core::rows::unfit(&lease.job.spec) else { return Ok(Some(lease)) };
        warn!(job_id = %lease.id(), "{why}; failing it as invalid");
        match self.fail(&lease, Failure::new(gpupool_core::FailureKind::Invalid, why)).await {
            Ok(_) | Err(Error::LeaseLost { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn fenced(lease: &Lease, outcome: Outcome) -> Result<Outcome> {
        match outcome {
            Outcome::Rejected => Err(Error::lease_lost(lease.id())),
            other => Ok(other),
        }
    }
}

impl AmqpQueue {
    /// One reserve: the lease of the job the fold hands this handle, unchecked.
    async fn reserve_next(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        self.prelude().await?;
        let ask = ask_of(req);
        // A job handed to a want of this handle's while no call waited on it.
        if let Some(lease) = self.take_handed(None, req.lease) {
            return Ok(Some(lease));
        }
        // Free wants made for something else, or due for renewal, are
        // withdrawn.
        let now = Instant::now();
        let others: Vec<String> = self
            .inner
            .standing()
            .iter()
            .filter(|s| !s.busy && (s.ask != ask || s.renew_at <= now))
            .map(|s| s.token.clone())
            .collect();
        for token in others {
            if let Some(lease) = self.withdraw(token, req.lease).await? {
                return Ok(Some(lease));
            }
        }
        if req.wait.is_zero() {
            return Ok(self.want(req, &ask, false).await?.1);
        }
        let deadline = Instant::now() + req.wait;
        let free = self.inner.standing().iter_mut().find(|s| !s.busy && s.ask == ask && s.renew_at > now).map(|s| {
            s.busy = true;
            s.token.clone()
        });
        let token = match free {
            Some(token) => token,
            None => match self.want(req, &ask, true).await? {
                (_, Some(lease)) => return Ok(Some(lease)),
                (token, None) => token,
            },
        };
        let mut busy = Busy { inner: &self.inner, token };
        let mut ticked: Option<i64> = None;
        loop {
            let notified = self.inner.handed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.take_handed(Some(&busy.token), req.lease) {
                return Ok(Some(lease));
            }
            let now = Instant::now();
            let renew_at = self.inner.standing().iter().find(|s| s.token == busy.token).map_or(now, |s| s.renew_at);
            if now >= renew_at {
                // Its life in the fold is nearly over: a new want replaces it.
                if let Some(lease) = self.withdraw(busy.token.clone(), req.lease).await? {
                    return Ok(Some(lease));
                }
                match self.want(req, &ask, true).await? {
                    (_, Some(lease)) => return Ok(Some(lease)),
                    (token, None) => busy.token = token,
                }
                continue;
            }
            if now >= deadline {
                return Ok(None);
            }
            // A job held back whose time has come is put in line by the
            // first event after that time; with nothing else happening,
            // this waiting want's owner makes one (once per due time).
            let due = self.inner.state().next_due();
            let wall = Timestamp::now().0;
            if let Some(at) = due.filter(|at| *at <= wall && ticked != Some(*at)) {
                ticked = Some(at);
                self.sync().await?;
                continue;
            }
            let until_due = due.map_or(WAIT_SLICE, |at| Duration::from_millis(u64::try_from(at - wall).unwrap_or(0)));
            let nap = (deadline - now).min(renew_at - now).min(WAIT_SLICE).min(until_due);
            let _ = tokio::time::timeout(nap, notified).await;
            self.reap().await?;
        }
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn init(&self) -> Result<()> {
        self.link().await.map(|_| ())
    }

    async fn exists(&self) -> Result<bool> {
        if self.inner.link.lock().await.as_ref().is_some_and(|l| l.is_alive()) {
            return Ok(true); // the link declared the ledger
        }
        self.ledger_declared().await
    }

    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        spec.validate()?;
        let key = spec.idempotency_key.clone().unwrap_or_default();
        match self.emit(Event::Pushed { spec: Box::new(spec), dispatch: None }).await? {
            Outcome::Pushed(id) => Ok(Pushed::New(JobId::new(id))),
            Outcome::Existing(id) => Ok(Pushed::Existing(JobId::new(id))),
            Outcome::Conflict(id) => Err(Error::IdempotencyConflict { key, id }),
            other => Err(Error::backend(BACKEND, format!("push: unexpected verdict {other:?}"))),
        }
    }

    /// A job that fails the checks of push ([`gpupool_core::rows::unfit`])
    /// ends `failed`, kind `invalid`, and the reserve goes on.
    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        loop {
            let Some(lease) = self.reserve_next(req).await? else { return Ok(None) };
            if let Some(lease) = self.checked(lease).await? {
                return Ok(Some(lease));
            }
        }
    }

    /// A batch in one trip through the ledger, not one a job: when this
    /// handle has no want standing and its fold shows jobs queued that fit,
    /// one want for each job the batch admits (by that fold), each taking
    /// only a job queued now, all published at once. Otherwise, or when
    /// other workers took those jobs first, the first lease is the one
    /// [`reserve`](Queue::reserve) gives (waiting as it waits), and the
    /// rest are taken the same way after it. A job handed that the batch
    /// does not admit after all goes back, uncharged.
    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        let ask = ask_of(req);
        let mut batch = gpupool_core::Batch::new(req, max);
        self.prelude().await?;
        let mut leases =
            if self.inner.standing().is_empty() { self.take_batch(req, &ask, &mut batch).await } else { Vec::new() };
        if leases.is_empty() {
            let Some(first) = self.reserve(req).await? else { return Ok(Vec::new()) };
            batch.admit(first.job.spec.gpus_needed(req.gpu_host));
            leases.push(first);
            leases.extend(self.take_batch(req, &ask, &mut batch).await);
        }
        Ok(leases)
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

    /// The run's facts and its last output, when the completion carries
    /// them, come in the `Completed` event (with a mark of the output, which
    /// goes to the log stream right after it): a short run costs two ledger
    /// events, its want and its end.
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> {
        let id = lease.id().as_str();
        let (piece, log_end) = if done.log.is_empty() {
            (None, self.log_end(lease))
        } else {
            let start = match self.log_end(lease) {
                Some(end) => end,
                None => {
                    let index = self.inner.state().jobs.get(id).map(|j| j.log.clone()).unwrap_or_default();
                    self.end_of(id, &index).await?
                }
            };
            (Some((start, now_ms())), Some(start + done.log.len() as u64))
        };
        let event = Event::Completed {
            id: id.to_owned(),
            token: lease.token.clone(),
            output_tail: done.output_tail,
            result: done.result,
            log_end,
            mark: piece,
            run: done.run.map(|r| (r.commit, r.gpu_ids)),
        };
        match self.end_lease(lease, event).await {
            Ok(_) => {}
            // An earlier try of this end was applied, its answer lost: the
            // job ended with this piece last.
            Err(Error::LeaseLost { .. }) if piece.is_some_and(|(start, _)| self.ended_with(id, start, log_end)) => {}
            Err(e) => return Err(e),
        }
        // After the end: a holder that dies between the two leaves no
        // piece past the log's known end (only the piece missing).
        if let Some((start, at)) = piece
            && let Err(e) = self.publish_piece(id, start, at, &done.log).await
        {
            warn!("RabbitMQ: job {id} ended, but its last output did not reach the log stream ({e})");
        }
        Ok(())
    }

    fn completes_with_run(&self) -> bool {
        true
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
            dispatch: None,
            log_end: self.log_end(lease),
        };
        match self.end_lease(lease, event).await? {
            Outcome::Requeued => Ok(FailOutcome::Requeued),
            _ => Ok(FailOutcome::Failed),
        }
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        let event = Event::Cancelled {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            output_tail,
            log_end: self.log_end(lease),
        };
        self.end_lease(lease, event).await.map(|_| ())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let event = Event::Released {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            dispatch: None,
            log_end: self.log_end(lease),
        };
        self.end_lease(lease, event).await.map(|_| ())
    }

    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        // On the clock of the events (this process's, as the event's own
        // time is), which promotions compare with.
        let until = Timestamp::now().plus(pause).0;
        let event = Event::Deferred {
            id: lease.id().to_string(),
            token: lease.token.clone(),
            until,
            log_end: self.log_end(lease),
        };
        self.end_lease(lease, event).await.map(|_| ())
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        match self.emit(Event::Cancel { id: id.to_string() }).await? {
            Outcome::Missing => Err(Error::NotFound { id: id.to_string() }),
            Outcome::Cancelled => Ok(CancelOutcome::Cancelled),
            Outcome::Requested => Ok(CancelOutcome::Requested),
            Outcome::State(s) => Ok(CancelOutcome::AlreadyEnded(s)),
            other => Err(Error::backend(BACKEND, format!("cancel: unexpected verdict {other:?}"))),
        }
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        match self.emit(Event::Retry { id: id.to_string(), dispatch: None }).await? {
            Outcome::Missing => Err(Error::NotFound { id: id.to_string() }),
            Outcome::Requeued => Ok(()),
            Outcome::State(state) => Err(Error::not_retryable(id, state)),
            other => Err(Error::backend(BACKEND, format!("retry: unexpected verdict {other:?}"))),
        }
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        let event = Event::Artifacts { id: id.to_string(), artifacts: Box::new(artifacts.clone()) };
        match self.emit(event).await? {
            Outcome::Missing => Err(Error::NotFound { id: id.to_string() }),
            _ => Ok(()),
        }
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        self.sync().await?;
        let st = self.inner.state();
        let job = st.jobs.get(id.as_str()).ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        let mut record = job.record.clone();
        record.errors = st.errors_of(id.as_str());
        Ok(record)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        self.sync().await?;
        let st = self.inner.state();
        Ok(st
            .order
            .iter()
            .rev()
            .filter_map(|id| st.jobs.get(&id.to_string()))
            .filter(|j| filter.state.is_none_or(|s| j.record.state == s))
            .filter(|j| filter.queue.as_ref().is_none_or(|q| &j.record.spec.queue == q))
            .skip(usize::try_from(filter.offset).unwrap_or(usize::MAX))
            .take(filter.limit as usize)
            .map(|j| j.record.clone())
            .collect())
    }

    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()> {
        let event = Event::Parked { id: lease.id().to_string(), token: lease.token.clone(), gpus };
        self.end_lease(lease, event).await.map(|_| ())
    }

    /// Withdraws the worker's waiting wants, and gives back (charging no
    /// attempt) a job handed to one of them that no reserve returned.
    async fn stop_reserving(&self, name: &str) -> Result<()> {
        let mine: Vec<(String, u64)> = self
            .inner
            .standing()
            .iter()
            .filter(|s| s.ask.worker == name)
            .map(|s| (s.token.clone(), s.ask.lease_ms))
            .collect();
        for (token, lease_ms) in mine {
            if let Some(lease) = self.withdraw(token, Duration::from_millis(lease_ms)).await? {
                self.release(&lease).await?;
            }
        }
        Ok(())
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        self.sync().await?;
        let st = self.inner.state();
        Ok(match job {
            Some(id) => st.errors_of(id.as_str()).into_iter().rev().take(limit as usize).collect(),
            None => st.recent_errors(limit as usize),
        })
    }

    fn worker_registry(&self) -> Option<&dyn WorkerRegistry> {
        Some(self)
    }

    fn run_logs(&self) -> Option<&dyn gpupool_core::RunLogs> {
        Some(self)
    }

    fn blobs(&self) -> Option<&dyn gpupool_core::Blobs> {
        Some(self)
    }
}

/// Pieces of a log read per call: about a megabyte at the worker's batching.
const LOG_PAGE_BYTES: u64 = 1 << 20;

/// How long a log read waits for the stream's next message before it
/// returns what it has: a quiet stream whose last message is before the
/// read's end (a piece that never reached it, or an end marker gone
/// missing).
const LOG_READ_GAP: Duration = Duration::from_secs(2);

/// How far apart the hosts' clocks and the broker's may be: a read starts
/// this much before the mark it seeks (the stream seeks by the broker's
/// clock, marks are the holders'), and a finished log's read stops at a
/// message sent this much after its end.
const CLOCK_SLACK_MS: i64 = 10_000;

/// The log stream's segment size: retention drops whole segments.
const LOG_SEGMENT_BYTES: i64 = 64 << 20;

/// A holder marks where its pieces are, and sends its latest results, at
/// most this often (and after each mebibyte of text): about as often as it
/// heartbeats, so shipping adds about as little to the ledger.
const MARK_EVERY: Duration = Duration::from_secs(10);
const MARK_BYTES: u64 = 1 << 20;

/// Where a lease holder's next piece goes in its job's log.
#[derive(Debug)]
pub(crate) struct Cursor {
    /// The next piece's byte offset in the job's log.
    end: u64,
    /// When this holder last wrote a `Shipped` event.
    last_event: Option<Instant>,
    /// Bytes shipped since its last mark.
    since_mark: u64,
    /// Results reported since its last event, not yet sent.
    pending: Option<serde_json::Value>,
}

/// Running jobs' output on RabbitMQ. The text goes to one stream for the
/// whole pool, `PREFIXlogs`: one message per piece, with its job, its byte
/// offset in the job's log and when it was sent in headers. One stream, not
/// one a job: a stream holds files open on the broker for as long as it
/// exists, and a stream a run exhausted a broker's file limit after a few
/// hundred short runs. Now and then (every 10 s or MiB) the holder writes a
/// small `Shipped` event to the ledger before a piece: when that piece was
/// sent, so that a reader seeks the stream near what it wants (streams
/// seek by time), and its latest results, so that `gpupool jobs` shows
/// them on any host. The lease's end says where the log ends, so a reader
/// of a finished job's log stops there, and the next attempt appends after
/// it; after a lost lease, the next holder reads the stream from the last
/// mark to find the end.
///
/// A read of a running job's log publishes an end marker to the stream and
/// reads up to it, so it sees every piece shipped before it. A read skips
/// other jobs' pieces: a read starts at most 10 s (or a MiB) of this job's
/// output, and 10 s of the clocks' slack, before what it wants, and never
/// reads past 10 s after the log's last piece could have been sent (its
/// end, the reclaim of a holder that died, or now). A read from the start
/// of a log whose attempts are hours apart reads the pool's output between
/// them.
///
/// A holder checks its lease against this process's view of the ledger
/// before each piece, and each event is fenced in the fold; a holder whose
/// lease was reclaimed a moment ago (its process has not yet applied the
/// reclaim) may add a line or two after the next holder's. A piece sent
/// again after its confirm was lost is read once. Reads apply the 16 MiB
/// cap from the log's end. The stream keeps pieces `log_max_age` (default
/// 7 days) after they were sent, and at most `log_max_bytes` (default
/// 8 GiB) for the whole pool; RabbitMQ drops whole 64 MiB segments.
#[async_trait]
impl gpupool_core::RunLogs for AmqpQueue {
    async fn ship(&self, lease: &Lease, progress: &gpupool_core::Progress) -> Result<()> {
        let id = lease.id().as_str();
        let index = self.inner.state().jobs.get(id).filter(|j| j.held(&lease.token)).map(|j| j.log.clone());
        let Some(index) = index else {
            lock(&self.inner.cursors).remove(&lease.token);
            return Err(Error::lease_lost(lease.id()));
        };
        let known = lock(&self.inner.cursors).contains_key(&lease.token);
        if !known {
            let end = self.end_of(id, &index).await?;
            let cursor = Cursor { end, last_event: None, since_mark: 0, pending: None };
            let mut cursors = lock(&self.inner.cursors);
            // Cursors of leases this process no longer holds go.
            let st = self.inner.state();
            cursors.retain(|token, _| st.jobs.values().any(|j| j.held(token)));
            cursors.insert(lease.token.clone(), cursor);
        }
        let sent_at = now_ms();
        // The mark goes to the ledger before its piece to the stream: a
        // holder that dies between the two leaves a log that is known to
        // be open.
        let (start, event) = {
            let mut cursors = lock(&self.inner.cursors);
            let Some(c) = cursors.get_mut(&lease.token) else { return Ok(()) };
            let piece = !progress.log.is_empty();
            if progress.result.is_some() {
                c.pending.clone_from(&progress.result);
            }
            let due = c.last_event.is_none_or(|t| t.elapsed() >= MARK_EVERY);
            let send_mark = piece && (due || c.since_mark + progress.log.len() as u64 >= MARK_BYTES);
            let event = (send_mark || (due && c.pending.is_some())).then(|| Event::Shipped {
                id: id.to_owned(),
                token: lease.token.clone(),
                mark: send_mark.then_some((c.end, sent_at)),
                result: c.pending.clone(),
            });
            // The piece's bytes are this call's from now on: an end while
            // it is on its way goes after them.
            let start = c.end;
            c.end += progress.log.len() as u64;
            c.since_mark += progress.log.len() as u64;
            (start, event.map(|e| (e, send_mark)))
        };
        let len = progress.log.len() as u64;
        let sent = async {
            if let Some((event, send_mark)) = event {
                if let Err(e) = Self::fenced(lease, self.emit(event).await?) {
                    lock(&self.inner.cursors).remove(&lease.token);
                    return Err(e);
                }
                if let Some(c) = lock(&self.inner.cursors).get_mut(&lease.token) {
                    c.last_event = Some(Instant::now());
                    c.pending = None;
                    if send_mark {
                        c.since_mark = len;
                    }
                }
            }
            if len > 0 {
                self.publish_piece(id, start, sent_at, &progress.log).await?;
            }
            Ok(())
        };
        let sent = sent.await;
        if sent.is_err()
            && let Some(c) = lock(&self.inner.cursors).get_mut(&lease.token)
            && c.end == start + len
        {
            // Shipped again from the same byte (nothing reserved since): a
            // piece that did reach the stream is read once.
            c.end = start;
            c.since_mark = c.since_mark.saturating_sub(len);
        }
        sent
    }

    async fn read_log(&self, id: &JobId, from: u64) -> Result<gpupool_core::LogPage> {
        self.sync().await?;
        let index = {
            let st = self.inner.state();
            let job = st.jobs.get(id.as_str()).ok_or_else(|| Error::NotFound { id: id.to_string() })?;
            job.log.clone()
        };
        let nothing = gpupool_core::LogPage { text: String::new(), next: from, dropped: 0 };
        if index.dropped || !index.marked() {
            return Ok(nothing);
        }
        let id = id.as_str();
        // No piece of it was sent after this.
        let bound = read_bound(&index);
        // An open log (a running job's): its end, read from its last mark up
        // to an end marker, with the pieces on the way.
        let (end, tail, marker) = if index.open {
            let (end, tail, marker) = self.scan_tail(id, &index, from, bound).await?;
            (end, tail, Some(marker))
        } else {
            (index.end, Vec::new(), None)
        };
        if from >= end {
            return Ok(nothing);
        }
        let want = from.max(end.saturating_sub(gpupool_core::LOG_CAP_BYTES));
        let pieces = match index.last() {
            Some((last, _)) if index.open && want >= last => tail,
            _ => {
                let stop = Stop { marker: marker.as_deref(), not_after: bound };
                let (mut scan, mut pieces) = (Page::new(from, end), Vec::new());
                self.scan_log(id, index.seek(want), &stop, |start, text| {
                    if scan.take(start, text.len() as u64).is_some() {
                        pieces.push((start, text.to_vec()));
                    }
                    !scan.done()
                })
                .await?;
                pieces
            }
        };
        Ok(Page::new(from, end).finish(pieces))
    }
}

/// One page of a log of `end` bytes from byte `from` on: each piece once,
/// up to about [`LOG_PAGE_BYTES`]; pieces that start more than the cap
/// before the end are dropped whole (the newest never).
struct Page {
    from: u64,
    end: u64,
    threshold: u64,
    read_to: u64,
    bytes: u64,
}

impl Page {
    fn new(from: u64, end: u64) -> Self {
        let threshold = end.saturating_sub(gpupool_core::LOG_CAP_BYTES);
        Page { from, end, threshold, read_to: 0, bytes: 0 }
    }

    /// Whether the page takes a piece of `len` bytes at byte `start` (not
    /// one sent twice or already read, before the page or past the end):
    /// how many of its first bytes it already has (a piece sent again after
    /// a lost confirm, with newer output added).
    fn take(&mut self, start: u64, len: u64) -> Option<u64> {
        let after = start + len;
        let wanted = after > self.read_to
            && after > self.from
            && start < self.end
            && (start >= self.threshold || after >= self.end);
        if !wanted {
            return None;
        }
        let skip = self.read_to.saturating_sub(start);
        self.read_to = after;
        self.bytes += len - skip;
        Some(skip)
    }

    /// Whether the page is full or read to the log's end.
    fn done(&self) -> bool {
        self.read_to >= self.end || self.bytes >= LOG_PAGE_BYTES
    }

    /// The page out of the pieces read, in the stream's order.
    fn finish(mut self, pieces: Vec<(u64, Vec<u8>)>) -> gpupool_core::LogPage {
        let mut rows = Vec::new();
        for (start, text) in pieces {
            if self.done() {
                break;
            }
            if let Some(skip) = self.take(start, text.len() as u64) {
                let text = text.get(usize::try_from(skip).unwrap_or(usize::MAX)..).unwrap_or_default();
                let len = i64::try_from(text.len()).unwrap_or(i64::MAX);
                let start = i64::try_from(start + skip).unwrap_or(i64::MAX);
                rows.push((start, len, String::from_utf8_lossy(text).into_owned()));
            }
        }
        gpupool_core::rows::log_page(self.from, &rows)
    }
}

/// What ends a read of the log stream besides its reader.
#[derive(Debug)]
struct Stop<'a> {
    /// The reader's end marker: everything shipped before it is read.
    marker: Option<&'a str>,
    /// A message sent after this (ms since the epoch) ends the read.
    not_after: i64,
}

/// When a read of a log may stop: a message sent this long after the log's
/// last piece could have been (its end, or now while a holder ships).
fn read_bound(index: &LogIndex) -> i64 {
    index.sent_by().unwrap_or_else(now_ms).saturating_add(CLOCK_SLACK_MS)
}

/// A log stream message's headers: its job, its byte offset in the job's
/// log, when it was sent, and a reader's end marker's nonce.
#[derive(Debug, Default)]
struct PieceHeaders {
    job: Option<String>,
    start: u64,
    at: i64,
    marker: Option<String>,
}

impl PieceHeaders {
    fn of(props: &BasicProperties) -> Self {
        let mut h = PieceHeaders::default();
        let Some(headers) = props.headers().as_ref() else { return h };
        for (key, value) in headers.inner() {
            match (key.as_str(), value) {
                ("job", AMQPValue::LongString(v)) => h.job = Some(v.to_string()),
                ("start", AMQPValue::LongLongInt(n)) => h.start = u64::try_from(*n).unwrap_or(0),
                ("at", AMQPValue::LongLongInt(n)) => h.at = *n,
                ("marker", AMQPValue::LongString(v)) => h.marker = Some(v.to_string()),
                _ => {}
            }
        }
        h
    }
}

impl AmqpQueue {
    /// Reads the log stream from about `since` (ms since the epoch, less
    /// the clocks' slack), handing each piece of job `id` to `each` (its
    /// byte offset and text) until `each` says stop, `stop` does, or no
    /// message comes for [`LOG_READ_GAP`].
    async fn scan_log(
        &self,
        id: &str,
        since: i64,
        stop: &Stop<'_>,
        mut each: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<()> {
        let seconds = since.saturating_sub(CLOCK_SLACK_MS).max(0) / 1000;
        let offset = AMQPValue::Timestamp(u64::try_from(seconds).unwrap_or(0));
        let link = self.link().await?;
        let ch = link.connection.create_channel().await.map_err(unavailable)?;
        ch.basic_qos(512, BasicQosOptions::default()).await.map_err(unavailable)?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), offset);
        let stream = self.logs_name();
        let consumed = ch.basic_consume(stream.as_str().into(), "".into(), BasicConsumeOptions::default(), args).await;
        let mut consumer = match consumed {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404) => return Ok(()),
            Err(e) => return Err(unavailable(e)),
        };
        while let Ok(Some(delivery)) = tokio::time::timeout(LOG_READ_GAP, consumer.next()).await {
            let delivery = delivery.map_err(unavailable)?;
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            let h = PieceHeaders::of(&delivery.properties);
            if h.marker.is_some() && h.marker.as_deref() == stop.marker {
                break;
            }
            if h.at > stop.not_after {
                break;
            }
            if h.job.as_deref() == Some(id) && !each(h.start, &delivery.data) {
                break;
            }
        }
        let _ = ch.close(200, "read".into()).await;
        Ok(())
    }

    /// Where job `id`'s log ends, where its next piece goes: the fold's end
    /// of a settled log; an open one's read from its last mark up to an end
    /// marker this publishes.
    async fn end_of(&self, id: &str, index: &LogIndex) -> Result<u64> {
        if !index.open {
            return Ok(index.end);
        }
        Ok(self.scan_tail(id, index, u64::MAX, read_bound(index)).await?.0)
    }

    /// Reads job `id`'s open log from its last mark up to an end marker this
    /// publishes, or a message sent after `not_after`: its end, the pieces
    /// on the way that end after `from`, and the marker's nonce.
    async fn scan_tail(
        &self,
        id: &str,
        index: &LogIndex,
        from: u64,
        not_after: i64,
    ) -> Result<(u64, Vec<(u64, Vec<u8>)>, String)> {
        let marker = nonce();
        let mut headers = FieldTable::default();
        headers.insert("marker".into(), AMQPValue::LongString(marker.as_str().into()));
        headers.insert("at".into(), AMQPValue::LongLongInt(now_ms()));
        self.publish_log_message(headers, b"").await?;
        let (mut end, mut pieces) = (index.end, Vec::new());
        let since = index.last().map_or(0, |(_, at)| at);
        let stop = Stop { marker: Some(&marker), not_after };
        self.scan_log(id, since, &stop, |start, text| {
            let after = start + text.len() as u64;
            end = end.max(after);
            if after > from {
                pieces.push((start, text.to_vec()));
            }
            true
        })
        .await?;
        Ok((end, pieces, marker))
    }

    /// Publishes one piece of job `id`'s log at byte `start`, sent at `at`.
    async fn publish_piece(&self, id: &str, start: u64, at: i64, text: &str) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert("job".into(), AMQPValue::LongString(id.into()));
        headers.insert("start".into(), AMQPValue::LongLongInt(i64::try_from(start).unwrap_or(i64::MAX)));
        headers.insert("at".into(), AMQPValue::LongLongInt(at));
        self.publish_log_message(headers, text.as_bytes()).await
    }

    /// Publishes a message to the log stream, confirmed.
    async fn publish_log_message(&self, headers: FieldTable, body: &[u8]) -> Result<()> {
        let link = self.link().await?;
        let stream = self.logs_name();
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        let sent = link
            .publish
            .basic_publish("".into(), stream.as_str().into(), BasicPublishOptions::default(), body, props)
            .await;
        match sent {
            Ok(confirm) => match confirm.await {
                Ok(c) if c.is_ack() => Ok(()),
                Ok(_) => Err(unavailable("the broker refused a log piece")),
                Err(e) => {
                    self.drop_link(&link);
                    Err(unavailable(e))
                }
            },
            Err(e) => {
                self.drop_link(&link);
                Err(unavailable(e))
            }
        }
    }

    /// Where the log of the lease this handle ships for ends, for the
    /// lease's end event (None when it shipped nothing).
    fn log_end(&self, lease: &Lease) -> Option<u64> {
        lock(&self.inner.cursors).get(&lease.token).map(|c| c.end)
    }

    /// Publishes a lease's end event; once the ledger has answered (the end
    /// taken or refused) the lease's cursor goes. A publish that failed
    /// keeps it, for the end sent again.
    async fn end_lease(&self, lease: &Lease, event: Event) -> Result<Outcome> {
        let outcome = self.emit(event).await?;
        lock(&self.inner.cursors).remove(&lease.token);
        Self::fenced(lease, outcome)
    }

    /// Whether job `id` ended succeeded with its log ending at `end` and its
    /// last mark at byte `start`: what a `Completed` with that piece left.
    fn ended_with(&self, id: &str, start: u64, end: Option<u64>) -> bool {
        let st = self.inner.state();
        st.jobs.get(id).is_some_and(|j| {
            j.record.state == JobState::Succeeded
                && !j.log.open
                && Some(j.log.end) == end
                && j.log.last().map(|(s, _)| s) == Some(start)
        })
    }
}

/// The ledger consumer of connection `generation`, which started at
/// offset `start`: folds each event into the handle's fold and answers its
/// publisher, until the connection ends or a newer one folds the ledger.
/// Deliveries before `start` are held by the snapshot (a stream starts at
/// the chunk that holds the offset asked for): acknowledged, not applied.
async fn follow_ledger(
    inner: Arc<Inner>,
    mut consumer: lapin::Consumer,
    generation: u64,
    start: i64,
    alive: Arc<AtomicBool>,
) {
    let mut count = 0u64;
    while let Some(Ok(delivery)) = consumer.next().await {
        #[cfg(test)]
        drop(inner.gate.lock().await);
        let offset = offset_of(&delivery.properties).unwrap_or(-1);
        let held = (0..start).contains(&offset);
        let gap = (count == 0 && offset > start).then_some(start);
        if !held && !fold_event(&inner, generation, offset, gap, &delivery.data) {
            break; // a newer connection folds the ledger now
        }
        count += 1;
        if count.is_multiple_of(ACK_EVERY)
            && !matches!(delivery.acker.ack(BasicAckOptions { multiple: true }).await, Ok(true))
        {
            break;
        }
    }
    alive.store(false, Ordering::Relaxed);
}

/// Folds the event (or the events, of a message that holds several) at
/// `offset` under one lock of the fold, then wakes whoever waits on them.
/// `gap`: it is the first this connection got, and the events from this
/// offset up to it are gone. `false`: a newer connection folds the ledger
/// now, and nothing was applied.
fn fold_event(inner: &Inner, generation: u64, offset: i64, gap: Option<i64>, data: &[u8]) -> bool {
    let read = Envelope::read_all(data);
    let (outcomes, handed) = {
        let mut st = inner.state();
        if inner.generation.load(Ordering::SeqCst) != generation {
            return false;
        }
        if let Some(start) = gap {
            st.gapped = true;
            if !inner.gap_reported.swap(true, Ordering::Relaxed) {
                warn!(
                    "the ledger's events {start} to {} are gone (its retention cut them before a snapshot held \
                     them): jobs they changed may be out of date, and this process writes no snapshot; keep \
                     ledger_max_bytes and ledger_max_age well above what the pool writes between snapshots",
                    offset - 1
                );
            }
        }
        st.grew(data.len());
        let envs = match read {
            Ok((envs, 0)) => envs,
            Ok((envs, skipped)) => {
                warn!("{skipped} ledger event(s) of the message at offset {offset} are not readable; skipped");
                envs
            }
            Err(e) => {
                warn!("ledger event at offset {offset} is not readable ({e}); skipped");
                return true;
            }
        };
        let before = st.handed.len();
        let now = Instant::now();
        let wall = now_ms();
        let outcomes: Vec<(String, Outcome)> = envs
            .into_iter()
            .map(|env| {
                let nonce = env.nonce.clone();
                (nonce, st.apply(offset, env, now, wall))
            })
            .collect();
        (outcomes, st.handed.len() > before)
    };
    if handed {
        inner.handed.notify_waiters();
    }
    let mut waiters = lock(&inner.waiters);
    for (nonce, outcome) in outcomes {
        if let Some(tx) = waiters.remove(&nonce) {
            let _ = tx.send(outcome);
        }
    }
    true
}

/// Puts the writer's token in the election queue (which keeps one waiting
/// at most: `x-max-length` 1 drops the older).
async fn put_token(ch: &Channel, queue: &str) {
    let props = BasicProperties::default().with_delivery_mode(2);
    let sent = ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b"writer", props).await;
    if let Err(e) = sent {
        warn!("RabbitMQ: cannot put the snapshot writer's token in {queue} ({e})");
    }
}

/// The election's consumer (see [`AmqpQueue::elect`]): while it holds the
/// token, this process writes the snapshots that are due. Ends with its
/// connection or its handle.
async fn serve_as_writer(
    inner: Weak<Inner>,
    ch: Channel,
    mut consumer: lapin::Consumer,
    queue: String,
    alive: Arc<AtomicBool>,
) {
    loop {
        let delivery = match tokio::time::timeout(TOKEN_AFTER, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(_) => break,
            Err(_) => {
                // Another process holds the token, or it was lost (a
                // queue deleted by hand): one is put in for the election.
                if !alive.load(Ordering::Relaxed) || inner.strong_count() == 0 {
                    break;
                }
                put_token(&ch, &queue).await;
                continue;
            }
        };
        let until = Instant::now() + WRITER_HOLDS_FOR;
        while Instant::now() < until && alive.load(Ordering::Relaxed) {
            let Some(inner) = inner.upgrade() else { break };
            let q = AmqpQueue { inner };
            let failed_lately = lock(&q.inner.snapshot_failed).is_some_and(|t| t.elapsed() < SNAPSHOT_RETRY);
            if !failed_lately && q.snapshot_due() {
                match q.write_snapshot().await {
                    Ok(_) => *lock(&q.inner.snapshot_failed) = None,
                    Err(e) => {
                        tracing::error!(
                            "RabbitMQ: writing a snapshot of the ledger failed ({e}); trying again in {} s",
                            SNAPSHOT_RETRY.as_secs()
                        );
                        *lock(&q.inner.snapshot_failed) = Some(Instant::now());
                    }
                }
            }
            drop(q);
            tokio::time::sleep(SNAPSHOT_CHECK_EVERY).await;
        }
        let requeue = BasicNackOptions { requeue: true, multiple: false };
        if delivery.acker.nack(requeue).await.is_err() || !alive.load(Ordering::Relaxed) || inner.strong_count() == 0 {
            break;
        }
    }
    let _ = ch.close(200, "not electing".into()).await;
}

#[async_trait]
impl WorkerRegistry for AmqpQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        self.emit(Event::Worker { info: Box::new(info.clone()) }).await.map(|_| ())
    }

    /// Also withdraws the worker's waiting wants, as
    /// [`Queue::stop_reserving`] does.
    async fn unregister_worker(&self, name: &str) -> Result<()> {
        self.stop_reserving(name).await?;
        self.emit(Event::WorkerGone { name: name.to_owned() }).await.map(|_| ())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.sync().await?;
        let now = Timestamp::now();
        let st = self.inner.state();
        // Dropped from the state at the next registration; not shown now.
        Ok(st
            .workers
            .values()
            .filter(|w| !w.gone_at(now))
            .map(|w| WorkerInfo { lost: w.lost_at(now), ..w.clone() })
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

impl gpupool_core::Connect for AmqpQueue {
    const SCHEMES: &'static [&'static str] = &crate::SCHEMES;

    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send {
        AmqpQueue::connect(url)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use gpupool_core::ListFilter;

    #[test]
    fn a_log_page_has_each_byte_once_and_drops_whole_pieces_past_the_cap() {
        let piece = |start: u64, text: &str| (start, text.as_bytes().to_vec());
        // A piece sent again after a lost confirm, with newer output added:
        // only its new bytes.
        let got = Page::new(0, 10).finish(vec![piece(0, "abc"), piece(0, "abcdef"), piece(6, "ghij")]);
        assert_eq!((got.text.as_str(), got.next, got.dropped), ("abcdefghij", 10, 0));
        // From the middle of a piece; a piece past the end is not the log's.
        let got = Page::new(4, 10).finish(vec![piece(0, "abcdef"), piece(6, "ghij"), piece(10, "k")]);
        assert_eq!((got.text.as_str(), got.next), ("efghij", 10));
        // Past the cap the older whole pieces go, never the newest.
        let end = gpupool_core::LOG_CAP_BYTES + 10;
        let newest = "y".repeat(usize::try_from(end - 20).unwrap());
        let got = Page::new(0, end).finish(vec![piece(0, &"x".repeat(20)), piece(20, &newest)]);
        assert_eq!((got.dropped, got.text.len() as u64, got.next), (20, end - 20, end));
        let got = Page::new(0, 30).finish(vec![piece(0, &"x".repeat(30))]);
        assert_eq!(got.text.len(), 30, "the newest piece is kept whole");
    }

    /// The test broker's URL with a prefix of its own (`gpt.TAG.…`), or
    /// `None` when no broker is set for the tests.
    fn test_url(tag: &str) -> Option<String> {
        let base = gpupool_core::conformance::service_url("GPUPOOL_TEST_AMQP_URL", "RabbitMQ test", || None)?;
        let prefix = format!("gpt.{tag}.{}.", gpupool_core::conformance::unique_suffix());
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(format!("{base}{sep}prefix={prefix}&ledger_max_age=1D"))
    }

    /// Ends published at the same moment go to the broker as one message
    /// (a JSON array): another process's fold, and a fold that replays the
    /// ledger, apply every one of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ends_published_together_share_a_message_and_every_fold_applies_each() {
        let Some(url) = test_url("group") else { return };
        let (pool, watcher) = (AmqpQueue::connect(&url).await.unwrap(), AmqpQueue::connect(&url).await.unwrap());
        for n in 0..40 {
            pool.push(JobSpec::new("main", "t.py").arg("n", n)).await.unwrap();
        }
        let mut now = ReserveRequest::new("default");
        now.wait = Duration::ZERO;
        let mut leases = Vec::new();
        while leases.len() < 40 {
            let batch = pool.reserve_many(&now, 40 - leases.len()).await.unwrap();
            assert!(!batch.is_empty(), "40 jobs are queued");
            leases.extend(batch);
        }
        let before = lock(&pool.inner.outbox).sent;
        let ends = leases.iter().enumerate().map(|(n, lease)| {
            let done = Completion { output_tail: format!("run {n}"), ..Completion::default() };
            pool.complete(lease, done)
        });
        for ended in futures_util::future::join_all(ends).await {
            ended.unwrap();
        }
        let after = lock(&pool.inner.outbox).sent;
        let (messages, events) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(events, 40);
        assert!(messages < events, "40 ends at once went in {messages} messages");

        let fresh = AmqpQueue::connect(&url).await.unwrap();
        let all = ListFilter { limit: 1000, ..ListFilter::default() };
        for q in [&watcher, &fresh] {
            let jobs = q.list(&all).await.unwrap();
            assert_eq!(jobs.len(), 40);
            for job in jobs {
                assert_eq!(job.state, gpupool_core::JobState::Succeeded, "{job:?}");
                let n = job.spec.args.get("n").and_then(serde_json::Value::as_i64).unwrap();
                assert_eq!(job.output_tail.as_deref(), Some(format!("run {n}").as_str()));
            }
        }
        pool.delete_queues().await.unwrap();
    }

    /// A reconnect while the old ledger consumer is far behind (its fold
    /// busy, a backlog of deliveries in hand): the old consumer applies
    /// nothing to the new fold, so every event is folded once, in order,
    /// and the handle ends up agreeing with a fresh one (issue 18, RabbitMQ
    /// item 4).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reconnect_while_the_old_consumer_lags_folds_every_event_once() {
        let Some(url) = test_url("slow") else { return };
        let watcher = AmqpQueue::connect(&url).await.unwrap();
        let pool = AmqpQueue::connect(&url).await.unwrap();
        watcher.sync().await.unwrap();

        // The watcher's consumer is held while 300 jobs are pushed and run:
        // it takes a backlog of deliveries and waits.
        let gate = watcher.inner.gate.lock().await;
        let mut now = ReserveRequest::new("default");
        now.wait = Duration::ZERO;
        for n in 0..300 {
            let mut spec = JobSpec::new("main", "t.py").arg("n", n);
            spec.max_attempts = Some(3);
            pool.push(spec).await.unwrap();
            let lease = pool.reserve(&now).await.unwrap().expect("the job just pushed");
            if n % 3 == 0 {
                pool.fail(&lease, Failure::new(gpupool_core::FailureKind::Exit, "exit 1")).await.unwrap();
                let again = pool.reserve(&now).await.unwrap().expect("the retry");
                pool.complete(&again, Completion::default()).await.unwrap();
            } else {
                pool.complete(&lease, Completion::default()).await.unwrap();
            }
        }
        // The link drops and the handle reconnects while the old consumer
        // still has its backlog; then the fold is let go.
        let link = watcher.link().await.unwrap();
        watcher.drop_link(&link);
        let reconnect = {
            let watcher = watcher.clone();
            tokio::spawn(async move { watcher.link().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(gate);
        reconnect.await.unwrap().unwrap();

        let fresh = AmqpQueue::connect(&url).await.unwrap();
        let all = ListFilter { limit: 1000, ..ListFilter::default() };
        let seen = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| (j.id, j.state, j.attempt)).collect::<Vec<_>>();
        let (mine, theirs) = (seen(watcher.list(&all).await.unwrap()), seen(fresh.list(&all).await.unwrap()));
        assert_eq!(mine.len(), 300);
        assert!(mine.iter().all(|(_, state, _)| *state == gpupool_core::JobState::Succeeded), "{mine:?}");
        assert_eq!(mine, theirs);
        assert_eq!(watcher.errors(None, 1000).await.unwrap().len(), 100);
        watcher.delete_queues().await.unwrap();
    }
}
