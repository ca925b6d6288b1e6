//! [`RedisQueue`]: the [`Queue`] on Redis Streams.
//!
//! Dispatch is a stream per queue with one consumer group, `gpupool`:
//! `XREADGROUP` reserves (with `BLOCK`, an idle worker costs nothing and
//! wakes the moment a job is pushed), the entry stays pending while the job
//! runs, `XCLAIM … JUSTID` on it is the heartbeat, and a pass over the
//! entries idle too long (`XPENDING … IDLE`) hands those of dead workers to
//! a live one. The job itself lives in a hash beside the stream; every
//! change that touches more than one key is one Lua script, so no crash or
//! race can leave the stream and the hash disagreeing. A first attempt's
//! lease is the one exception, by design: it is the delivery alone until
//! its holder's first call records it (`take` below).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, Error, FailOutcome, Failure, Heartbeat, JobId, JobRecord,
    JobSpec, Lease, ListFilter, Pushed, Queue, ReserveRequest, Result, RunInfo, Timestamp, WorkerInfo, WorkerRegistry,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{Script, Value};

use crate::error::{is_no_group, map};
use crate::options::RedisOptions;

const GROUP: &str = "gpupool";

/// Stream entries as `XREADGROUP` returns them: (entry id, fields).
type Entries = Vec<(String, HashMap<String, String>)>;

/// A delivered entry: (queue, entry id, fields).
type Delivery = (String, String, HashMap<String, String>);

/// The longest single blocking read; a waiting reserve also looks for
/// expired leases between reads.
const BLOCK_SLICE: Duration = Duration::from_secs(1);

/// A script: `prelude.lua`, the helper files it names, then its own body.
/// Every helper is a closure Redis makes again on each call, so the hot
/// scripts (push, reserve, complete) carry only the helpers they use.
macro_rules! script {
    ($file:literal $(, $part:literal)*) => {
        Script::new(concat!(
            include_str!("../lua/prelude.lua"),
            "\n",
            $(include_str!(concat!("../lua/", $part, ".lua")), "\n",)*
            include_str!(concat!("../lua/", $file))
        ))
    };
}

#[derive(Debug)]
struct Scripts {
    push: Script,
    claim: Script,
    reclaim: Script,
    view: Script,
    undeliver: Script,
    heartbeat: Script,
    started: Script,
    finish: Script,
    fail: Script,
    release: Script,
    defer: Script,
    promote: Script,
    cancel: Script,
    retry: Script,
    list: Script,
    worker: Script,
    workers: Script,
    park: Script,
    unpark: Script,
    trim: Script,
    ship: Script,
    read_log: Script,
    artifacts: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            push: script!("push.lua"),
            claim: script!("claim.lua", "lease"),
            reclaim: script!("reclaim.lua", "states", "jobs", "lease"),
            view: script!("view.lua", "states", "jobs"),
            undeliver: script!("undeliver.lua", "states", "jobs"),
            heartbeat: script!("heartbeat.lua", "states", "jobs"),
            started: script!("started.lua", "states", "jobs"),
            finish: script!("finish.lua", "states", "logappend"),
            fail: script!("fail.lua", "states", "jobs"),
            release: script!("release.lua", "states", "jobs"),
            defer: script!("defer.lua", "states", "jobs"),
            promote: script!("promote.lua", "states", "jobs"),
            cancel: script!("cancel.lua", "states", "jobs"),
            retry: script!("retry.lua", "states", "jobs"),
            list: script!("list.lua", "states", "jobs"),
            worker: script!("worker.lua"),
            workers: script!("workers.lua"),
            park: script!("park.lua", "states", "jobs"),
            unpark: script!("unpark.lua", "states", "jobs"),
            trim: script!("trim.lua", "states", "jobs"),
            ship: script!("ship.lua", "states", "jobs", "logappend"),
            read_log: script!("readlog.lua"),
            artifacts: script!("artifacts.lua"),
        }
    }
}

/// A queue on Redis ≥ 6.2 (standalone, not Cluster).
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    opts: Arc<RedisOptions>,
    scripts: Arc<Scripts>,
    /// Connections for blocking reads, which must not hold up the shared one.
    blocking: Arc<StdMutex<Vec<MultiplexedConnection>>>,
    /// Streams whose consumer group exists.
    groups: Arc<StdMutex<HashSet<String>>>,
    /// This handle's part of its consumer names in the group (see
    /// [`RedisQueue::consumer`]).
    instance: String,
    /// Paces the reclaim pass.
    sweep: Arc<gpupool_core::Sweep>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue").field("opts", &self.opts).field("instance", &self.instance).finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisQueue {
    /// Connects to the Redis a `redis://` or `rediss://` URL names. Fails
    /// within the connect timeout with one line naming `host:port` and the
    /// cause.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(RedisOptions::from_url(url)?).await
    }

    /// Connects with parsed options.
    pub async fn open(opts: RedisOptions) -> Result<Self> {
        let fail = |cause: String| Error::Unavailable {
            backend: crate::error::BACKEND,
            source: format!("cannot connect to Redis at {}: {cause}", opts.endpoint).into(),
        };
        let client = redis::Client::open(opts.driver_url.as_str()).map_err(|e| {
            Error::Config(format!("`{}` is not a Redis URL: {}", opts.redacted_url, crate::error::plain(&e)))
        })?;
        // One direct connection first, so a refused AUTH or a bad database
        // number is reported as such, at once.
        let probe = tokio::time::timeout(opts.connect_timeout, async {
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await;
        match probe {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(fail(crate::error::plain(&e))),
            Err(_) => return Err(fail(format!("no answer within {} s", opts.connect_timeout.as_secs()))),
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| fail(crate::error::plain(&e)))?;
        let instance = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Ok(RedisQueue {
            client,
            conn,
            opts: Arc::new(opts),
            scripts: Arc::new(Scripts::new()),
            blocking: Arc::default(),
            groups: Arc::default(),
            instance,
            sweep: Arc::default(),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// A connection for plain commands (the shared, reconnecting one).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn p(&self) -> &str {
        &self.opts.prefix
    }

    fn stream(&self, queue: &str) -> String {
        format!("{}stream:{queue}", self.p())
    }

    /// The consumer a reserve reads as: `WORKER@INSTANCE/LEASE_MS`. The
    /// group's pending list then says, for an entry leased by a bare read
    /// and not yet recorded in its job's hash, who holds it and for how
    /// long (`adopt` in jobs.lua); the scripts parse the name from the right.
    fn consumer(&self, req: &ReserveRequest) -> String {
        format!("{}@{}/{}", req.worker, self.instance, ms(req.lease))
    }

    /// Creates the consumer group of a queue's stream if it is missing
    /// (from the start of the stream, so nothing pushed before is skipped).
    async fn ensure_group(&self, queue: &str) -> Result<()> {
        let stream = self.stream(queue);
        if gpupool_core::sync::lock(&self.groups).contains(&stream) {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(map(e)),
        }
        // Listing queued and running jobs reads the streams of the queues
        // named here; pushes add theirs too. A worker adds the queues it
        // serves, so queues pushed to by an older gpupool are listed.
        let _: i64 =
            redis::cmd("SADD").arg(format!("{}queues", self.p())).arg(queue).query_async(&mut c).await.map_err(map)?;
        gpupool_core::sync::lock(&self.groups).insert(stream);
        Ok(())
    }

    fn forget_groups(&self) {
        gpupool_core::sync::lock(&self.groups).clear();
    }

    /// Reclaims expired leases in one queue; returns a lease if one of them
    /// is ours to run now. The lease decides: every pending entry idle for
    /// a second or more is listed, page by page (`XPENDING … IDLE`, with an
    /// exclusive start), and one idle for at least its own lease (which its
    /// consumer's name carries; heartbeats reset the idle time) or for
    /// `reclaim_idle` goes to the script, which decides from the job's hash
    /// whether the lease has expired and only then takes it.
    async fn reclaim(&self, queue: &str, req: &ReserveRequest) -> Result<Option<Lease>> {
        const PAGE: usize = 100;
        let mut c = self.conn.clone();
        let stream = self.stream(queue);
        let floor = ms(self.opts.reclaim_idle).min(1000);
        let mut start = "-".to_owned();
        loop {
            let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(GROUP)
                .arg("IDLE")
                .arg(floor)
                .arg(&start)
                .arg("+")
                .arg(PAGE)
                .query_async(&mut c)
                .await
                .map_err(map)?;
            let full = rows.len() == PAGE;
            if let Some((last, ..)) = rows.last() {
                start = format!("({last}");
            }
            for (entry, consumer, idle, _) in rows {
                let lease_ms = consumer.rsplit_once('/').and_then(|(_, l)| l.parse::<u64>().ok());
                let due = ms(self.opts.reclaim_idle).min(lease_ms.unwrap_or(u64::MAX));
                if idle < due {
                    continue;
                }
                let token = new_token();
                let got: Value = self
                    .scripts
                    .reclaim
                    .arg(self.p())
                    .arg(queue)
                    .arg(&entry)
                    .arg(self.consumer(req))
                    .arg(&req.worker)
                    .arg(&token)
                    .arg(ms(req.lease))
                    .invoke_async(&mut c)
                    .await
                    .map_err(map)?;
                if let Some(lease) = self.usable(lease_from(got, token, &req.worker)?).await? {
                    return Ok(Some(lease));
                }
            }
            if !full {
                return Ok(None);
            }
        }
    }

    /// Deletes the entries of a queue's stream that the group is done with
    /// (completed jobs' entries are only acknowledged); returns how many.
    /// Reserves do this at most once a second.
    pub async fn trim(&self, queue: &str) -> Result<u64> {
        let v = self.script_status(&self.scripts.trim, &[queue.to_owned()]).await?;
        from_value(v)
    }

    /// Claims a delivered entry; `None` if it was stale.
    async fn claim(&self, queue: &str, entry: &str, job: &str, req: &ReserveRequest) -> Result<Option<Lease>> {
        let token = new_token();
        let mut c = self.conn.clone();
        let got: Value = self
            .scripts
            .claim
            .arg(self.p())
            .arg(queue)
            .arg(entry)
            .arg(job)
            .arg(self.consumer(req))
            .arg(&req.worker)
            .arg(&token)
            .arg(ms(req.lease))
            .invoke_async(&mut c)
            .await
            .map_err(map)?;
        self.usable(lease_from(got, token, &req.worker)?).await
    }

    /// A lease whose stored job reads and passes the checks of push, or
    /// `None` after failing one that does not (edited by hand, or written
    /// by a newer gpupool) as `invalid`, so that the reserve goes on to the
    /// jobs behind it.
    async fn usable(&self, leased: Option<Leased>) -> Result<Option<Lease>> {
        let (lease, message) = match leased {
            None => return Ok(None),
            Some(Leased::Ok(lease)) => match gpupool_core::rows::unfit(&lease.job.spec) {
                None => return Ok(Some(lease)),
                Some(why) => (lease, why),
            },
            Some(Leased::Unreadable(lease, why)) => (lease, gpupool_core::rows::unreadable(&why)),
        };
        tracing::warn!(job_id = %lease.id(), "{message}; failing it as invalid");
        match self.fail(&lease, Failure::new(gpupool_core::FailureKind::Invalid, message)).await {
            Ok(_) | Err(Error::LeaseLost { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `block` for new entries, on a connection of its own: one
    /// per stream at most, in queue order. (A read that does not wait is
    /// [`RedisQueue::read_now`].)
    async fn read_blocking(&self, req: &ReserveRequest, block: Duration) -> Result<Vec<Delivery>> {
        let queues = &req.queues;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(GROUP).arg(self.consumer(req)).arg("COUNT").arg(1).arg("BLOCK").arg(ms(block).max(1));
        cmd.arg("STREAMS");
        for q in queues {
            cmd.arg(self.stream(q));
        }
        for _ in queues {
            cmd.arg(">");
        }
        let mut conn = self.blocking_conn().await?;
        let reply: redis::RedisResult<Value> = cmd.query_async(&mut conn).await;
        if reply.is_ok() {
            gpupool_core::sync::lock(&self.blocking).push(conn);
        }
        match reply {
            Err(e) if is_no_group(&e) => {
                self.forget_groups();
                Ok(Vec::new())
            }
            other => self.deliveries(other.map_err(map)?, queues),
        }
    }

    /// The next new entry of one queue's stream, without waiting: a bare
    /// `XREADGROUP`, the same read the floor makes. `None` when there is
    /// none (or the group was deleted under us).
    async fn read_now(&self, queue: &str, req: &ReserveRequest) -> Result<Option<Delivery>> {
        Ok(self.read_new(queue, req, 1).await?.pop())
    }

    /// Up to `count` new entries of one queue's stream, in order, without
    /// waiting (empty when there are none, or the group was deleted under
    /// us).
    async fn read_new(&self, queue: &str, req: &ReserveRequest, count: usize) -> Result<Vec<Delivery>> {
        let reply: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(self.consumer(req))
            .arg("COUNT")
            .arg(count.max(1))
            .arg("STREAMS")
            .arg(self.stream(queue))
            .arg(">")
            .query_async(&mut self.conn.clone())
            .await;
        match reply {
            Err(e) if is_no_group(&e) => {
                self.forget_groups();
                Ok(Vec::new())
            }
            other => self.deliveries(other.map_err(map)?, std::slice::from_ref(&queue.to_owned())),
        }
    }

    /// The leases a batch on a host without GPUs takes after its first: the
    /// next new entries of each queue in order, read `room` at a time, each
    /// leased as a reserve leases it. A job that needs GPUs, which such a
    /// host cannot run, is parked for a host with enough, as the worker
    /// parks a job too big for it ([`Queue::park`]); the jobs after it keep
    /// their order. A fault ends the batch, not the reserve: the leases
    /// taken are returned.
    async fn take_more(&self, req: &ReserveRequest, batch: &mut gpupool_core::Batch) -> Vec<Lease> {
        let mut leases = Vec::new();
        for queue in &req.queues {
            while !batch.full() {
                let found = match self.read_new(queue, req, batch.room()).await {
                    Ok(found) if !found.is_empty() => found,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("Redis: reading more jobs for a batch failed ({e})");
                        return leases;
                    }
                };
                for delivery in found {
                    match self.take(delivery, req).await {
                        Ok(Some(lease)) if lease.job.spec.gpus_needed(false) == 0 && batch.admit(0) => {
                            leases.push(lease);
                        }
                        Ok(Some(lease)) => {
                            let need = lease.job.spec.gpus_needed(true);
                            tracing::warn!(job_id = %lease.id(), need, "job needs GPUs, which this host has none of; parking it for a host with enough");
                            if let Err(e) = self.park(&lease, need).await {
                                tracing::warn!(job_id = %lease.id(), "could not park a job that needs GPUs ({e}); it returns when its lease ends");
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("Redis: leasing a job for a batch failed ({e})"),
                    }
                }
            }
        }
        leases
    }

    /// The entries of an `XREADGROUP` reply, in the order of `queues`.
    fn deliveries(&self, reply: Value, queues: &[String]) -> Result<Vec<Delivery>> {
        // RESP2 answers an array of [name, entries]; RESP3 a map.
        let streams: Vec<(String, Entries)> = match reply {
            Value::Nil => Vec::new(),
            Value::Map(pairs) => {
                pairs.into_iter().map(|(k, v)| Ok((from_value(k)?, from_value(v)?))).collect::<Result<_>>()?
            }
            other => from_value(other)?,
        };
        let mut found = Vec::new();
        for (name, entries) in streams {
            let queue = queues.iter().find(|q| self.stream(q) == name).cloned().unwrap_or_default();
            for (entry, fields) in entries {
                found.push((queue.clone(), entry, fields));
            }
        }
        found.sort_by_key(|(q, _, _)| queues.iter().position(|x| x == q));
        Ok(found)
    }

    /// Leases the job of a delivered entry; `None` if the entry was stale.
    ///
    /// An entry `push.lua` wrote (`job` and `spec`, nothing else) is a
    /// first attempt: every path that cancels a queued job or replaces its
    /// entry deletes the old entry, so a new one is never stale. Its lease
    /// is built here, from the entry alone: the delivery itself, pending
    /// under this reserve's consumer name, is the lease, and the job's hash
    /// records it at the holder's first call (`adopt` in jobs.lua). The
    /// token `~ENTRY` names the entry. So a reserve costs the server one
    /// `XREADGROUP` and no script, which is what brings the drain to half
    /// the floor's rate (BENCHMARKS.md). Any other entry is leased by
    /// `claim.lua`, which reads the job's earlier attempts.
    ///
    /// The token is `~ENTRY~NONCE~CONSUMER`, the nonce new for each
    /// delivery. When Redis loses a delivery (a restart that rolled back the
    /// last second of its append-only file) and hands the entry out again,
    /// the two holders' tokens differ: only a holder the entry is pending
    /// under can record its token (`adopt`), the first of them to call if
    /// one consumer got it twice, and every call with the other token is
    /// refused as a lost lease.
    async fn take(&self, (queue, entry, fields): Delivery, req: &ReserveRequest) -> Result<Option<Lease>> {
        let job = fields.get("job").cloned().unwrap_or_default();
        let spec = match fields.get("spec") {
            Some(spec) if fields.len() == 2 && !job.is_empty() => spec,
            _ => return self.claim(&queue, &entry, &job, req).await,
        };
        let (spec, unreadable) = match JobSpec::from_stored_json(spec) {
            Ok(spec) => (spec, None),
            Err(e) => (placeholder_spec(), Some(e.to_string())),
        };
        // The entry id starts with the server's clock at the push.
        let created = entry.split('-').next().and_then(|t| t.parse().ok()).unwrap_or(0);
        let mut record = JobRecord::new(JobId::new(job), spec, Timestamp(created));
        record.state = gpupool_core::JobState::Running;
        record.attempt = 1;
        record.worker = Some(req.worker.clone());
        let started = Timestamp::now();
        record.started_at = Some(started);
        let token = format!("~{entry}~{}~{}", &new_token()[..12], self.consumer(req));
        let lease = Lease { job: record, token, expires_at: started.plus(req.lease) };
        self.usable(Some(match unreadable {
            None => Leased::Ok(lease),
            Some(why) => Leased::Unreadable(lease, why),
        }))
        .await
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection> {
        let pooled = gpupool_core::sync::lock(&self.blocking).pop();
        match pooled {
            Some(c) => Ok(c),
            // The driver's default response timeout (500 ms) is shorter
            // than a blocking read: without this, every wait that found
            // nothing ended in a "timed out" error and a back-off.
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.opts.connect_timeout))
                    .set_response_timeout(Some(BLOCK_SLICE + Duration::from_secs(10)));
                self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(map)
            }
        }
    }

    /// One pass: reclaim, then fresh entries, queue by queue.
    async fn try_reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        // Dead workers' entries are looked for at most once a second (the
        // entries must sit idle for `reclaim_idle` anyway), not on every
        // reserve of a busy worker.
        let sweep = self.sweep.due();
        if sweep {
            // Jobs held back whose time has come go in line.
            self.script_status(&self.scripts.promote, &[]).await?;
        }
        for queue in &req.queues {
            self.ensure_group(queue).await?;
            if sweep {
                self.trim(queue).await?;
                if let Some(lease) = self.reclaim(queue, req).await? {
                    return Ok(Some(lease));
                }
            }
            // A parked job this caller is big enough for goes back in line
            // (only GPU jobs are ever parked).
            if req.gpu_limit() > 0 {
                self.script_status(&self.scripts.unpark, &[queue.clone(), req.gpu_limit().to_string()]).await?;
            }
            // The next entry; a stale one (left by an older gpupool) is
            // skipped, a bounded number.
            for _ in 0..100 {
                let Some(delivery) = self.read_now(queue, req).await? else { break };
                if let Some(lease) = self.take(delivery, req).await? {
                    return Ok(Some(lease));
                }
            }
        }
        Ok(None)
    }

    async fn script_status(&self, script: &Script, args: &[String]) -> Result<Value> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.p());
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut self.conn.clone()).await.map_err(map)
    }

    fn lost(lease: &Lease) -> Error {
        Error::lease_lost(lease.id())
    }

    async fn fenced(&self, script: &Script, lease: &Lease, args: &[String]) -> Result<i64> {
        let mut all = vec![lease.id().to_string(), lease.token.clone()];
        all.extend_from_slice(args);
        let v = self.script_status(script, &all).await?;
        let n: i64 = from_value(v)?;
        if n < 0 { Err(Self::lost(lease)) } else { Ok(n) }
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<JobRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(format!("{}job:{id}", self.p()));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut self.conn.clone()).await.map_err(map)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut entries = Vec::with_capacity(ids.len());
        for (id, h) in ids.iter().zip(hashes).filter(|(_, h)| !h.is_empty()) {
            // A job that does not read is left out, so it hides no other
            // (`get` on it says why).
            match record(id, &h) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(job_id = %id, "job left out of the list: {e}");
                    continue;
                }
            }
            entries.push(h.get("entry").cloned().unwrap_or_default());
        }
        self.show_bare_leases(&mut out, &entries).await?;
        Ok(out)
    }

    /// Shows a queued job whose entry is pending, leased by a bare read and
    /// not yet recorded in its hash (`adopt` in jobs.lua), as what it is:
    /// running its first attempt since its delivery, on the worker its
    /// consumer's name gives. `entries` are the hashes' `entry` fields.
    async fn show_bare_leases(&self, records: &mut [JobRecord], entries: &[String]) -> Result<()> {
        let mut args = Vec::new();
        let mut which = Vec::new();
        for (i, (r, entry)) in records.iter().zip(entries).enumerate() {
            if r.state == gpupool_core::JobState::Queued && !entry.is_empty() {
                args.push(r.spec.queue.clone());
                args.push(entry.clone());
                which.push(i);
            }
        }
        if which.is_empty() {
            return Ok(());
        }
        let Value::Array(mut parts) = self.script_status(&self.scripts.view, &args).await? else {
            return Err(Error::backend("redis", "the view script answered no list"));
        };
        if parts.len() != which.len() + 1 {
            return Err(Error::backend("redis", "the view script answered a list of the wrong length"));
        }
        let now: i64 = from_value(parts.remove(0))?;
        for (i, row) in which.into_iter().zip(parts) {
            let Some((worker, idle)): Option<(Option<String>, i64)> = from_value(row)? else { continue };
            let r = &mut records[i];
            r.state = gpupool_core::JobState::Running;
            r.attempt += 1;
            r.worker = worker;
            r.started_at = Some(Timestamp(now - idle));
        }
        Ok(())
    }
}

/// Decodes a reply.
fn from_value<T: redis::FromRedisValue>(v: Value) -> Result<T> {
    redis::from_redis_value(v).map_err(|e| map(e.into()))
}

fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A lease as the backend handed it: its stored job reads, or does not
/// (with why), and must be failed as `invalid`.
enum Leased {
    Ok(Lease),
    Unreadable(Lease, String),
}

/// What stands in for a stored job that does not read, in the lease that
/// fails it (never run: [`RedisQueue::usable`] fails it first).
fn placeholder_spec() -> JobSpec {
    JobSpec::new("-", "-")
}

/// The reply of `start_lease` (prelude.lua), or nil: {id, spec, created,
/// cancel, commit, output_tail, result, attempt, started, expires, errors}.
fn lease_from(v: Value, token: String, worker: &str) -> Result<Option<Leased>> {
    if matches!(v, Value::Nil) {
        return Ok(None);
    }
    let mut parts: Vec<Value> = from_value(v)?;
    // A first attempt's reply ends before its (empty) errors.
    if parts.len() == 10 {
        parts.push(Value::Array(Vec::new()));
    }
    let [id, spec, created, cancel, commit, tail, result, attempt, started, expires, errors]: [Value; 11] =
        parts.try_into().map_err(|p: Vec<Value>| {
            Error::backend("redis", format!("a lease reply has {} parts, not 10 or 11", p.len()))
        })?;
    let text = |v: Value| -> Result<Option<String>> { from_value::<Option<String>>(v) };
    let id: String = from_value(id)?;
    let (spec, unreadable) = match JobSpec::from_stored_json(&text(spec)?.unwrap_or_default()) {
        Ok(spec) => (spec, None),
        Err(e) => (placeholder_spec(), Some(e.to_string())),
    };
    let created = text(created)?.and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut job = JobRecord::new(JobId::new(id), spec, Timestamp(created));
    job.state = gpupool_core::JobState::Running;
    job.cancel_requested = text(cancel)?.is_some_and(|c| c == "1");
    job.commit = text(commit)?.filter(|c| !c.is_empty());
    job.output_tail = text(tail)?;
    job.result = text(result)?.filter(|r| !r.is_empty()).and_then(|r| serde_json::from_str(&r).ok());
    job.attempt = from_value(attempt)?;
    job.worker = Some(worker.to_owned());
    job.started_at = Some(Timestamp(from_value(started)?));
    let expires: i64 = from_value(expires)?;
    let errors: Vec<String> = from_value(errors)?;
    job.errors = errors.iter().map(|e| parse_error(e)).collect::<Result<_>>()?;
    let lease = Lease { job, token, expires_at: Timestamp(expires) };
    Ok(Some(match unreadable {
        None => Leased::Ok(lease),
        Some(why) => Leased::Unreadable(lease, why),
    }))
}

fn parse_error(text: &str) -> Result<AttemptError> {
    serde_json::from_str(text).map_err(|e| Error::backend("redis", format!("error record: {e}")))
}

fn num<T: std::str::FromStr>(h: &HashMap<String, String>, k: &str) -> Option<T> {
    h.get(k).filter(|v| !v.is_empty()).and_then(|v| v.parse().ok())
}

fn record(id: &str, h: &HashMap<String, String>) -> Result<JobRecord> {
    let spec = JobSpec::from_stored_json(h.get("spec").map_or("", String::as_str))?;
    let mut r = JobRecord::new(JobId::new(id), spec, Timestamp(num(h, "created").unwrap_or(0)));
    let state = h.get("state").map_or("", String::as_str);
    r.state = state.parse().map_err(|_| Error::backend("redis", format!("job {id} has unknown state `{state}`")))?;
    r.attempt = num(h, "attempt").unwrap_or(0);
    if let Some(limit) = num(h, "attempt_limit") {
        r.attempt_limit = limit;
    }
    r.commit = h.get("commit").filter(|v| !v.is_empty()).cloned();
    r.worker = h.get("worker").filter(|v| !v.is_empty()).cloned();
    r.gpu_ids = h.get("gpu_ids").filter(|v| !v.is_empty()).and_then(|v| serde_json::from_str(v).ok());
    r.exit_code = num(h, "exit_code");
    r.signal = num(h, "signal");
    r.output_tail = h.get("output_tail").cloned();
    r.result = h.get("result").filter(|v| !v.is_empty()).and_then(|v| serde_json::from_str(v).ok());
    r.artifacts = h.get("artifacts").filter(|v| !v.is_empty()).and_then(|v| serde_json::from_str(v).ok());
    r.cancel_requested = h.get("cancel").is_some_and(|v| v == "1");
    r.started_at = num(h, "started").map(Timestamp);
    r.finished_at = num(h, "finished").map(Timestamp);
    r.not_before = num(h, "not_before").map(Timestamp);
    Ok(r)
}

#[async_trait]
impl gpupool_core::RunLogs for RedisQueue {
    async fn ship(&self, lease: &Lease, progress: &gpupool_core::Progress) -> Result<()> {
        let result = progress.result.as_ref().map(ToString::to_string).unwrap_or_default();
        let cap = gpupool_core::LOG_CAP_BYTES.to_string();
        self.fenced(&self.scripts.ship, lease, &[result, progress.log.clone(), cap]).await.map(|_| ())
    }

    async fn read_log(&self, id: &JobId, from: u64) -> Result<gpupool_core::LogPage> {
        id.as_i64()?;
        let v = self.script_status(&self.scripts.read_log, &[id.to_string(), from.to_string(), "256".into()]).await?;
        if let Value::Int(-1) = v {
            return Err(Error::NotFound { id: id.to_string() });
        }
        let flat: Vec<String> = from_value(v)?;
        let pieces: Vec<(i64, i64, String)> = flat
            .chunks_exact(3)
            .map(|c| (c[0].parse().unwrap_or(0), c[1].parse().unwrap_or(0), c[2].clone()))
            .collect();
        if pieces.is_empty() {
            return Ok(gpupool_core::LogPage { text: String::new(), next: from, dropped: 0 });
        }
        Ok(gpupool_core::rows::log_page(from, &pieces))
    }
}

#[async_trait]
impl Queue for RedisQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_delays(true)
    }

    async fn init(&self) -> Result<()> {
        // Streams and groups are made on first use; nothing else to create.
        // A round trip checks that the server answers and is ≥ 6.2.
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn.clone()).await.map_err(map)?;
        let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("0").trim().to_owned();
        let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
        if parts.as_slice() < [6, 2].as_slice() {
            return Err(Error::Config(format!(
                "Redis {version} lacks `XPENDING … IDLE`; gpupool needs Redis 6.2 or newer"
            )));
        }
        // The mark `exists` looks for: this prefix is a queue.
        let _: () = redis::cmd("SET")
            .arg(format!("{}schema", self.p()))
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map)?;
        Ok(())
    }

    async fn exists(&self) -> Result<bool> {
        // The mark `init` sets, or the id sequence of a queue that an older
        // gpupool (which set no mark) pushed to.
        let found: i64 = redis::cmd("EXISTS")
            .arg(format!("{}schema", self.p()))
            .arg(format!("{}seq", self.p()))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map)?;
        Ok(found > 0)
    }

    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        spec.validate()?;
        self.ensure_group(&spec.queue).await?;
        let v = self
            .script_status(
                &self.scripts.push,
                &[
                    spec.to_json()?,
                    spec.queue.clone(),
                    spec.attempts().to_string(),
                    spec.idempotency_key.clone().unwrap_or_default(),
                    spec.not_before.map(|t| t.0.to_string()).unwrap_or_default(),
                ],
            )
            .await?;
        if let Value::Array(_) = v {
            let (id, stored): (String, String) = from_value(v)?;
            return gpupool_core::rows::same_job(JobId::new(id), &JobSpec::from_stored_json(&stored)?, &spec);
        }
        let id: String = from_value(v)?;
        Ok(Pushed::New(JobId::new(id)))
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            if let Some(lease) = self.try_reserve(req).await? {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Wait for a push on any of the queues.
            let found = self.read_blocking(req, (deadline - now).min(BLOCK_SLICE)).await?;
            let mut leased = None;
            for delivery in found {
                if leased.is_none() {
                    leased = self.take(delivery, req).await?;
                } else {
                    // One job per reserve: the rest go back to their queues.
                    let (queue, entry, fields) = delivery;
                    let job = fields.get("job").cloned().unwrap_or_default();
                    self.script_status(&self.scripts.undeliver, &[queue, entry, job]).await?;
                }
            }
            if leased.is_some() {
                return Ok(leased);
            }
        }
    }

    /// The first lease as [`reserve`](Queue::reserve) gives it; then, on a
    /// host without GPUs, the next new entries in one `XREADGROUP … COUNT`
    /// for the slots left (each leased as a reserve leases it), so that a
    /// worker's free slots start together, not one reserve after another.
    /// A job read there that needs GPUs is parked (see `take_more`).
    /// A host with GPUs gets one job a call: an entry read is delivered,
    /// and one that does not fit the GPUs left could only go back to the
    /// end of its queue, behind jobs pushed after it.
    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        let Some(first) = self.reserve(req).await? else { return Ok(Vec::new()) };
        let mut batch = gpupool_core::Batch::new(req, max);
        batch.admit(first.job.spec.gpus_needed(req.gpu_host));
        // A first job that needs GPUs on a host without any: the worker
        // parks it, and no batch is read behind it.
        let runs_here = first.job.spec.gpus_needed(false) == 0;
        let mut leases = vec![first];
        if !req.gpu_host && runs_here && !batch.full() {
            leases.extend(self.take_more(req, &mut batch).await);
        }
        Ok(leases)
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        let n = self.fenced(&self.scripts.heartbeat, lease, &[ms(extend).to_string()]).await?;
        Ok(if n == 1 { Heartbeat::CancelRequested } else { Heartbeat::Extended })
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        let gpu_ids = serde_json::to_string(&info.gpu_ids).map_err(|e| Error::backend("redis", e))?;
        self.fenced(&self.scripts.started, lease, &[info.commit.clone().unwrap_or_default(), gpu_ids]).await.map(|_| ())
    }

    /// The run's facts and its last output, when the completion carries
    /// them, go in the same script as the end (`finish.lua`).
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> {
        let result = done.result.map(|v| v.to_string()).unwrap_or_default();
        let mut args = vec!["succeeded".into(), done.output_tail, result, "0".into()];
        if done.run.is_some() || !done.log.is_empty() {
            let (commit, gpu_ids) = match done.run {
                Some(run) => (
                    run.commit.unwrap_or_default(),
                    serde_json::to_string(&run.gpu_ids).map_err(|e| Error::backend("redis", e))?,
                ),
                None => (String::new(), String::new()),
            };
            args.extend([commit, gpu_ids, done.log, gpupool_core::LOG_CAP_BYTES.to_string()]);
        }
        self.fenced(&self.scripts.finish, lease, &args).await.map(|_| ())
    }

    fn completes_with_run(&self) -> bool {
        true
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let backoff = lease.job.spec.retry_delay(failure.kind, lease.attempt());
        let n = self
            .fenced(
                &self.scripts.fail,
                lease,
                &[
                    failure.kind.as_str().to_owned(),
                    if lease.job.spec.retries(failure.kind) { "1" } else { "0" }.to_owned(),
                    failure.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    failure.signal.map(|s| s.to_string()).unwrap_or_default(),
                    failure.message,
                    failure.output_tail,
                    backoff.map(|d| ms(d).to_string()).unwrap_or_default(),
                ],
            )
            .await?;
        Ok(if n == 1 { FailOutcome::Requeued } else { FailOutcome::Failed })
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        self.fenced(&self.scripts.finish, lease, &["cancelled".into(), output_tail, String::new(), String::new()])
            .await
            .map(|_| ())
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.fenced(&self.scripts.release, lease, &[]).await.map(|_| ())
    }

    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        self.fenced(&self.scripts.defer, lease, &[ms(pause).to_string()]).await.map(|_| ())
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let v = self.script_status(&self.scripts.cancel, &[id.to_string()]).await?;
        let s: String = from_value(v)?;
        match s.as_str() {
            "missing" => Err(Error::NotFound { id: id.to_string() }),
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "requested" => Ok(CancelOutcome::Requested),
            other => {
                let state = other.strip_prefix("ended:").unwrap_or(other);
                Ok(CancelOutcome::AlreadyEnded(
                    state.parse().map_err(|_| Error::backend("redis", format!("unknown state `{state}`")))?,
                ))
            }
        }
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let v = self.script_status(&self.scripts.retry, &[id.to_string()]).await?;
        let s: String = from_value(v)?;
        match s.as_str() {
            "missing" => Err(Error::NotFound { id: id.to_string() }),
            "ok" => Ok(()),
            other => Err(Error::not_retryable(
                id,
                other.parse().map_err(|_| Error::backend("redis", format!("unknown state `{other}`")))?,
            )),
        }
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        id.as_i64()?;
        let text = serde_json::to_string(artifacts).map_err(|e| Error::backend("redis", e))?;
        let args = [id.to_string(), artifacts.attempt.to_string(), text];
        match self.script_status(&self.scripts.artifacts, &args).await? {
            Value::Int(-1) => Err(Error::NotFound { id: id.to_string() }),
            _ => Ok(()),
        }
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        let mut c = self.conn.clone();
        let (h, errors): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(format!("{}job:{id}", self.p()))
            .lrange(format!("{}errors:{id}", self.p()), 0, -1)
            .query_async(&mut c)
            .await
            .map_err(map)?;
        if h.is_empty() {
            return Err(Error::NotFound { id: id.to_string() });
        }
        let mut r = [record(id.as_str(), &h)?];
        self.show_bare_leases(&mut r, &[h.get("entry").cloned().unwrap_or_default()]).await?;
        let [mut r] = r;
        r.errors = errors.iter().map(|e| parse_error(e)).collect::<Result<_>>()?;
        Ok(r)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        let state = filter.state.map(|s| s.to_string()).unwrap_or_default();
        let queue = filter.queue.clone().unwrap_or_default();
        let v = self
            .script_status(&self.scripts.list, &[state, queue, filter.offset.to_string(), filter.limit.to_string()])
            .await?;
        let ids: Vec<String> = from_value(v)?;
        self.records(&ids).await
    }

    async fn park(&self, lease: &Lease, gpus: u32) -> Result<()> {
        self.fenced(&self.scripts.park, lease, &[gpus.to_string()]).await.map(|_| ())
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        let mut c = self.conn.clone();
        let texts: Vec<String> = match job {
            Some(id) => {
                let mut all: Vec<String> = redis::cmd("LRANGE")
                    .arg(format!("{}errors:{id}", self.p()))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
                    .map_err(map)?;
                all.reverse();
                all.truncate(limit as usize);
                all
            }
            None => redis::cmd("LRANGE")
                .arg(format!("{}errors", self.p()))
                .arg(0)
                .arg(i64::from(limit) - 1)
                .query_async(&mut c)
                .await
                .map_err(map)?,
        };
        texts.iter().map(|t| parse_error(t)).collect()
    }

    async fn stop_reserving(&self, _worker: &str) -> Result<()> {
        // Reserve keeps nothing between calls.
        Ok(())
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

/// One string key per blob, `PREFIXblob:HASH` (a Redis string holds up to
/// 512 MB, binary-safe), set only if absent.
#[async_trait]
impl gpupool_core::Blobs for RedisQueue {
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        let key = format!("{}blob:{hash}", self.p());
        let _: Value =
            redis::cmd("SET").arg(key).arg(bytes).arg("NX").query_async(&mut self.conn.clone()).await.map_err(map)?;
        Ok(())
    }

    async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let key = format!("{}blob:{hash}", self.p());
        redis::cmd("GET").arg(key).query_async(&mut self.conn.clone()).await.map_err(map)
    }
}

#[async_trait]
impl WorkerRegistry for RedisQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let text = serde_json::to_string(info).map_err(|e| Error::backend("redis", e))?;
        self.script_status(&self.scripts.worker, &[info.name.clone(), text, String::new()]).await.map(|_| ())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        self.script_status(&self.scripts.worker, &[name.to_owned(), String::new(), String::new()]).await.map(|_| ())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let v = self.script_status(&self.scripts.workers, &[]).await?;
        let Value::Array(mut items) = v else { return Ok(Vec::new()) };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let now = Timestamp(from_value(items.remove(0))?);
        let all = items
            .into_iter()
            .map(|item| {
                let (_name, info, seen): (String, String, i64) = from_value(item)?;
                gpupool_core::rows::worker_info("redis", &info, Timestamp(seen), now)
            })
            .collect::<Result<Vec<_>>>()?;
        let (shown, gone) = gpupool_core::rows::split_gone(all, now);
        for w in gone {
            let only = w.seen_at.0.to_string();
            self.script_status(&self.scripts.worker, &[w.name, String::new(), only]).await?;
        }
        Ok(shown)
    }
}

impl gpupool_core::Connect for RedisQueue {
    const SCHEMES: &'static [&'static str] = &crate::SCHEMES;

    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send {
        RedisQueue::connect(url)
    }
}
