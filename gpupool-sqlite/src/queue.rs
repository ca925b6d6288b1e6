//! [`SqliteQueue`]: the [`Queue`] on one SQLite file.
//!
//! Every change is one transaction. `reserve` runs in `BEGIN IMMEDIATE`, so
//! it holds the file's write lock from its first read: two processes can
//! never pick the same row, and no read snapshot goes stale under a write.
//! Before taking that lock, `reserve` asks a cheap read-only question (is
//! anything queued that fits, or has a lease expired?) so that idle workers
//! polling the file do not queue up on the write lock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use gpupool_core::rows::{self, ErrorRow, JobRow};
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, Error, FailOutcome, Failure, Heartbeat, JobId, JobRecord,
    JobSpec, JobState, Lease, ListFilter, Pushed, Queue, ReserveRequest, Result, RunInfo, Timestamp, WorkerInfo,
    WorkerRegistry,
};
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row, Sqlite, Transaction};
use tokio::sync::Notify;

use crate::error::{BACKEND, map};
use crate::options::SqliteOptions;

/// How often a waiting `reserve` looks at the file for jobs pushed by other
/// processes (pushes from this process wake it at once).
const POLL: Duration = Duration::from_millis(25);

/// How many unreadable jobs one reserve marks `failed` per queue before it
/// gives up for this call (each is looked at once; the next call goes on).
const UNREADABLE_PER_RESERVE: usize = 8;

/// The migrations, in order; `PRAGMA user_version` records the last applied.
const MIGRATIONS: [(i64, &str); 8] = [
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_workers.sql")),
    (3, include_str!("../migrations/0003_drop_lease_index.sql")),
    (4, include_str!("../migrations/0004_state_index_skips_queued.sql")),
    (5, include_str!("../migrations/0005_job_logs.sql")),
    (6, include_str!("../migrations/0006_artifacts.sql")),
    (7, include_str!("../migrations/0007_not_before.sql")),
    (8, include_str!("../migrations/0008_blobs.sql")),
];

/// Puts the file in WAL mode, once, before the pool opens; WAL is a property
/// of the file, so the pool's connections need not ask again.
///
/// Switching a new file to WAL takes its exclusive lock. When several
/// processes open a new file at once, SQLite can answer one of them BUSY at
/// once, without waiting out the busy timeout (waiting could deadlock), so
/// the switch is tried again here until the busy timeout has passed.
async fn set_wal(connect: &SqliteConnectOptions, busy_timeout: Duration) -> std::result::Result<(), sqlx::Error> {
    let deadline = std::time::Instant::now() + busy_timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match connect.clone().journal_mode(SqliteJournalMode::Wal).connect().await {
            Ok(conn) => return conn.close().await,
            Err(e) if crate::error::is_busy(&e) && std::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The columns [`record`] reads.
macro_rules! job_columns {
    () => {
        "id, state, attempt, attempt_limit, spec, commit_sha, worker, gpu_ids, exit_code, signal, output_tail, result, \
         artifacts, cancel_requested, created_at, started_at, finished_at, not_before"
    };
}

/// A queue in one SQLite file, shared by every worker process on the host.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    opts: SqliteOptions,
    pushed: Arc<Notify>,
    sweep: Arc<gpupool_core::Sweep>,
}

impl SqliteQueue {
    /// Opens (creating if missing) the queue at a `sqlite://` URL and brings
    /// its schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(SqliteOptions::from_url(url)?).await
    }

    /// Opens (creating if missing) the queue file and brings its schema up
    /// to date.
    pub async fn open(opts: SqliteOptions) -> Result<Self> {
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Config(format!("cannot create the folder `{}` for the queue file: {e}", dir.display()))
            })?;
        }
        let connect = SqliteConnectOptions::new()
            .filename(&opts.path)
            .create_if_missing(true)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true);
        let cannot_open = |e| Error::Config(format!("cannot open the queue file `{}`: {e}", opts.path.display()));
        set_wal(&connect, opts.busy_timeout).await.map_err(cannot_open)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections)
            .connect_with(connect)
            .await
            .map_err(cannot_open)?;
        let queue = SqliteQueue { pool, opts, pushed: Arc::new(Notify::new()), sweep: Arc::default() };
        queue.init().await?;
        Ok(queue)
    }

    /// The options this queue was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.opts
    }

    /// The underlying pool, for inspection with plain SQL.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(map)
    }

    /// A read-only look: is anything queued that could fit, and has any
    /// lease expired?
    async fn might_have_work(&self, req: &ReserveRequest, now: i64) -> Result<(bool, bool)> {
        let queues = serde_json::to_string(&req.queues).map_err(|e| Error::backend("sqlite", e))?;
        sqlx::query_as::<_, (bool, bool)>(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'queued' \
                 AND queue IN (SELECT value FROM json_each(?1)) AND COALESCE(gpus, ?2) <= ?3 \
                 AND (not_before IS NULL OR not_before <= ?4)), \
             EXISTS (SELECT 1 FROM jobs WHERE state = 'running' AND state <> 'queued' AND lease_expires_at < ?4)",
        )
        .bind(queues)
        .bind(i64::from(req.gpu_host))
        .bind(i64::from(req.gpu_limit()))
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(map)
    }

    async fn try_reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let now = Timestamp::now();
        // While reserves keep finding work, skip the lock-free look and
        // sweep expired leases at most once a second.
        let expired = if self.sweep.hot.load(std::sync::atomic::Ordering::Relaxed) {
            self.sweep.due()
        } else {
            let (queued, expired) = self.might_have_work(req, now.0).await?;
            if !queued && !expired {
                return Ok(None);
            }
            expired
        };
        let mut tx = self.begin_immediate().await?;
        if expired {
            expire_leases(&mut tx, now.0).await?;
        }
        for queue in &req.queues {
            for _ in 0..UNREADABLE_PER_RESERVE {
                let id: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM jobs WHERE queue = ?1 AND state = 'queued' AND COALESCE(gpus, ?2) <= ?3 \
                     AND (not_before IS NULL OR not_before <= ?4) ORDER BY priority DESC, id LIMIT 1",
                )
                .bind(queue)
                .bind(i64::from(req.gpu_host))
                .bind(i64::from(req.gpu_limit()))
                .bind(now.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map)?;
                let Some(id) = id else { break };
                let token = uuid::Uuid::new_v4().simple().to_string();
                let expires_at = now.plus(req.lease);
                let row = sqlx::query(concat!(
                    "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_token = ?1, \
                     lease_expires_at = ?2, worker = ?3, started_at = ?4, finished_at = NULL, exit_code = NULL, \
                     signal = NULL, gpu_ids = NULL WHERE id = ?5 RETURNING ",
                    job_columns!()
                ))
                .bind(&token)
                .bind(expires_at.0)
                .bind(&req.worker)
                .bind(now.0)
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(map)?;
                // A row that does not read (edited by hand, or written by a
                // newer gpupool), or fails the checks of push, ends `failed`,
                // kind `invalid`, and the reserve moves on: one bad row never
                // stalls the queue, and none gets past the checks.
                let mut job = match rows::runnable(record(&row)) {
                    Ok(job) => job,
                    Err(message) => {
                        let attempt: i64 = row.try_get("attempt").map_err(map)?;
                        fail_invalid(&mut tx, id, attempt, &message, now).await?;
                        continue;
                    }
                };
                if job.attempt > 1 {
                    job.errors = errors_of(&mut tx, id).await?;
                }
                tx.commit().await.map_err(map)?;
                self.sweep.hot.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok(Some(Lease { job, token, expires_at }));
            }
        }
        tx.commit().await.map_err(map)?;
        self.sweep.hot.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(None)
    }

    /// Runs a statement fenced by `lease` (`… WHERE id = ?n AND lease_token
    /// = ?n+1 AND state = 'running'`, those two parameters last and bound
    /// here): `LeaseLost` if it matched no row.
    async fn fenced(&self, query: Query<'_, Sqlite, SqliteArguments>, lease: &Lease) -> Result<()> {
        let done = query.bind(lease.id().as_i64()?).bind(&lease.token).execute(&self.pool).await.map_err(map)?;
        rows::fenced(done.rows_affected(), lease)
    }

    /// Reads one job's state, in a transaction.
    async fn state_of(tx: &mut Transaction<'static, Sqlite>, id: &JobId) -> Result<(i64, JobState)> {
        let n = id.as_i64()?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(n)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map)?;
        let state = state.ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        Ok((n, rows::state_column(BACKEND, &state)?))
    }
}

/// Ends every expired lease in one statement pair: a `lease_lost` record,
/// then `cancelled` if a cancel was asked for, `queued` if attempts are
/// left, else `failed`. This is [`rows::ExpiredLease`] written set-based;
/// a test below holds the two to the same result.
async fn expire_leases(tx: &mut Transaction<'static, Sqlite>, now: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_errors (job_id, attempt, kind, message, output_tail, at) \
         SELECT id, attempt, 'lease_lost', \
                'lease expired: worker ' || COALESCE(worker, 'unknown') || ' stopped heartbeating', '', ?1 \
         FROM jobs WHERE state = 'running' AND state <> 'queued' AND lease_expires_at < ?1",
    )
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(map)?;
    sqlx::query(
        "UPDATE jobs SET \
             state = CASE WHEN cancel_requested THEN 'cancelled' \
                          WHEN attempt < attempt_limit THEN 'queued' ELSE 'failed' END, \
             finished_at = CASE WHEN cancel_requested OR attempt >= attempt_limit THEN ?1 END, \
             lease_token = NULL, lease_expires_at = NULL \
         WHERE state = 'running' AND state <> 'queued' AND lease_expires_at < ?1",
    )
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(map)?;
    Ok(())
}

async fn errors_of(tx: &mut Transaction<'static, Sqlite>, id: i64) -> Result<Vec<AttemptError>> {
    let rows = sqlx::query(
        "SELECT job_id, attempt, kind, exit_code, signal, message, output_tail, at \
         FROM job_errors WHERE job_id = ?1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await
    .map_err(map)?;
    rows.iter().map(attempt_error).collect()
}

fn get<'r, T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>>(row: &'r SqliteRow, col: &str) -> Result<T> {
    row.try_get(col).map_err(map)
}

/// A row of `job_columns!()` as a record (without its errors).
fn record(row: &SqliteRow) -> Result<JobRecord> {
    JobRow {
        id: get(row, "id")?,
        state: get(row, "state")?,
        attempt: get(row, "attempt")?,
        attempt_limit: Some(get(row, "attempt_limit")?),
        spec: get(row, "spec")?,
        commit: get(row, "commit_sha")?,
        worker: get(row, "worker")?,
        gpu_ids: get(row, "gpu_ids")?,
        exit_code: get(row, "exit_code")?,
        signal: get(row, "signal")?,
        output_tail: get(row, "output_tail")?,
        result: get(row, "result")?,
        artifacts: get(row, "artifacts")?,
        cancel_requested: get(row, "cancel_requested")?,
        created_at: get(row, "created_at")?,
        started_at: get(row, "started_at")?,
        finished_at: get(row, "finished_at")?,
        not_before: get(row, "not_before")?,
    }
    .into_record(BACKEND)
}

/// Ends a job whose row does not read or fails the checks of push
/// ([`rows::unfit`]): `failed`, with an `invalid` attempt saying why, so the
/// reserve can go on to the jobs behind it.
async fn fail_invalid(
    tx: &mut Transaction<'static, Sqlite>,
    id: i64,
    attempt: i64,
    message: &str,
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO job_errors (job_id, attempt, kind, exit_code, signal, message, output_tail, at) \
         VALUES (?1, ?2, 'invalid', NULL, NULL, ?3, '', ?4)",
    )
    .bind(id)
    .bind(attempt)
    .bind(message)
    .bind(now.0)
    .execute(&mut **tx)
    .await
    .map_err(map)?;
    sqlx::query(
        "UPDATE jobs SET state = 'failed', finished_at = ?1, lease_token = NULL, lease_expires_at = NULL WHERE id = ?2",
    )
    .bind(now.0)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(map)?;
    tracing::warn!(job_id = id, "{message}; marked failed");
    Ok(())
}

/// A row of `job_errors`.
fn attempt_error(row: &SqliteRow) -> Result<AttemptError> {
    ErrorRow {
        job_id: get(row, "job_id")?,
        attempt: get(row, "attempt")?,
        kind: get(row, "kind")?,
        exit_code: get(row, "exit_code")?,
        signal: get(row, "signal")?,
        message: get(row, "message")?,
        output_tail: get(row, "output_tail")?,
        at: get(row, "at")?,
    }
    .into_error(BACKEND)
}

/// Pieces of a log read per call: about a megabyte at the worker's batching.
const LOG_PIECES_PER_READ: i64 = 256;

#[async_trait]
impl gpupool_core::RunLogs for SqliteQueue {
    async fn ship(&self, lease: &Lease, progress: &gpupool_core::Progress) -> Result<()> {
        let n = lease.id().as_i64()?;
        let mut tx = self.pool.begin().await.map_err(map)?;
        let result = progress.result.as_ref().map(ToString::to_string);
        let held = sqlx::query(
            "UPDATE jobs SET result = COALESCE(?1, result) WHERE id = ?2 AND lease_token = ?3 AND state = 'running'",
        )
        .bind(result)
        .bind(n)
        .bind(&lease.token)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        rows::fenced(held.rows_affected(), lease)?;
        if !progress.log.is_empty() {
            let end: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(start + len), 0) FROM job_logs WHERE job_id = ?1")
                .bind(n)
                .fetch_one(&mut *tx)
                .await
                .map_err(map)?;
            let len = i64::try_from(progress.log.len()).unwrap_or(i64::MAX);
            sqlx::query("INSERT INTO job_logs (job_id, start, len, text) VALUES (?1, ?2, ?3, ?4)")
                .bind(n)
                .bind(end)
                .bind(len)
                .bind(&progress.log)
                .execute(&mut *tx)
                .await
                .map_err(map)?;
            // Whole pieces that start before the last 16 MiB go (never the
            // one just shipped, so the offsets go on from it).
            let cap = i64::try_from(gpupool_core::LOG_CAP_BYTES).unwrap_or(i64::MAX);
            sqlx::query("DELETE FROM job_logs WHERE job_id = ?1 AND start < ?2 AND start < ?3")
                .bind(n)
                .bind(end + len - cap)
                .bind(end)
                .execute(&mut *tx)
                .await
                .map_err(map)?;
        }
        tx.commit().await.map_err(map)
    }

    async fn read_log(&self, id: &JobId, from: u64) -> Result<gpupool_core::LogPage> {
        let n = id.as_i64()?;
        let from_i = i64::try_from(from).unwrap_or(i64::MAX);
        let pieces = sqlx::query(
            "SELECT start, len, text FROM job_logs WHERE job_id = ?1 AND start + len > ?2 ORDER BY start LIMIT ?3",
        )
        .bind(n)
        .bind(from_i)
        .bind(LOG_PIECES_PER_READ)
        .fetch_all(&self.pool)
        .await
        .map_err(map)?;
        if pieces.is_empty() {
            let known: Option<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE id = ?1")
                .bind(n)
                .fetch_optional(&self.pool)
                .await
                .map_err(map)?;
            known.ok_or_else(|| Error::NotFound { id: id.to_string() })?;
            let end: Option<i64> = sqlx::query_scalar("SELECT MAX(start + len) FROM job_logs WHERE job_id = ?1")
                .bind(n)
                .fetch_one(&self.pool)
                .await
                .map_err(map)?;
            let end = end.and_then(|e| u64::try_from(e).ok()).unwrap_or(0);
            return Ok(gpupool_core::LogPage { text: String::new(), next: from.min(end), dropped: 0 });
        }
        let pieces: Vec<(i64, i64, String)> =
            pieces.iter().map(|r| (r.get("start"), r.get("len"), r.get("text"))).collect();
        Ok(gpupool_core::rows::log_page(from, &pieces))
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn init(&self) -> Result<()> {
        let mut tx = self.begin_immediate().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *tx).await.map_err(map)?;
        let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if version > latest {
            return Err(Error::Config(format!(
                "the queue file `{}` has schema version {version}, newer than this gpupool knows ({latest}); \
                 upgrade gpupool",
                self.opts.path.display()
            )));
        }
        for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > version) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(map)?;
            // A constant from this file, never user input.
            let set = sqlx::AssertSqlSafe(format!("PRAGMA user_version = {v}"));
            sqlx::query(set).execute(&mut *tx).await.map_err(map)?;
        }
        tx.commit().await.map_err(map)
    }

    async fn exists(&self) -> Result<bool> {
        // Opening the file made and migrated it (as `sqlite3 FILE` would);
        // the CLI looks for the file before it opens it.
        let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&self.pool).await.map_err(map)?;
        Ok(version >= 1)
    }

    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        let text = spec.validated_json()?;
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO jobs (queue, state, priority, gpus, spec, idempotency_key, max_attempts, attempt_limit, \
             created_at, not_before) VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        )
        .bind(&spec.queue)
        .bind(spec.priority)
        .bind(spec.gpus.map(i64::from))
        .bind(text)
        .bind(&spec.idempotency_key)
        .bind(i64::from(spec.attempts()))
        .bind(Timestamp::now().0)
        .bind(spec.not_before.map(|t| t.0))
        .fetch_optional(&self.pool)
        .await
        .map_err(map)?;
        if let Some(id) = id {
            self.pushed.notify_waiters();
            return Ok(Pushed::New(JobId::from(id)));
        }
        let (id, stored): (i64, String) = sqlx::query_as("SELECT id, spec FROM jobs WHERE idempotency_key = ?1")
            .bind(&spec.idempotency_key)
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        rows::same_job(JobId::from(id), &JobSpec::from_stored_json(&stored)?, &spec)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let notified = self.pushed.notified();
            if let Some(lease) = self.try_reserve(req).await? {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let _ = tokio::time::timeout((deadline - now).min(POLL), notified).await;
        }
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ?1 WHERE id = ?2 AND lease_token = ?3 AND state = 'running' \
             RETURNING cancel_requested",
        )
        .bind(Timestamp::now().plus(extend).0)
        .bind(lease.id().as_i64()?)
        .bind(&lease.token)
        .fetch_optional(&self.pool)
        .await
        .map_err(map)?;
        match cancel {
            Some(true) => Ok(Heartbeat::CancelRequested),
            Some(false) => Ok(Heartbeat::Extended),
            None => Err(Error::lease_lost(lease.id())),
        }
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        let gpu_ids = serde_json::to_string(&info.gpu_ids).map_err(|e| Error::backend("sqlite", e))?;
        let update = sqlx::query(
            "UPDATE jobs SET commit_sha = ?1, gpu_ids = ?2 WHERE id = ?3 AND lease_token = ?4 AND state = 'running'",
        )
        .bind(&info.commit)
        .bind(gpu_ids);
        self.fenced(update, lease).await
    }

    async fn complete(&self, lease: &Lease, mut done: Completion) -> Result<()> {
        done.record_first(self, lease).await?;
        let result = done.result.map(|v| v.to_string());
        let update = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', exit_code = 0, output_tail = ?1, result = ?2, finished_at = ?3, \
             lease_token = NULL, lease_expires_at = NULL WHERE id = ?4 AND lease_token = ?5 AND state = 'running'",
        )
        .bind(done.output_tail)
        .bind(result)
        .bind(Timestamp::now().0);
        self.fenced(update, lease).await
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let id = lease.id().as_i64()?;
        let now = Timestamp::now().0;
        let mut tx = self.begin_immediate().await?;
        let held: Option<(i64, i64)> = sqlx::query_as(
            "SELECT attempt, attempt_limit FROM jobs WHERE id = ?1 AND lease_token = ?2 AND state = 'running'",
        )
        .bind(id)
        .bind(&lease.token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map)?;
        let (attempt, limit) = held.ok_or_else(|| Error::lease_lost(lease.id()))?;
        let attempt_n = rows::u32_column(BACKEND, "attempt", attempt)?;
        let requeue = failure.requeues(&lease.job.spec, attempt_n, rows::u32_column(BACKEND, "attempt_limit", limit)?);
        let not_before = if requeue { failure.retry_at(&lease.job.spec, attempt_n, Timestamp(now)) } else { None };
        sqlx::query(
            "INSERT INTO job_errors (job_id, attempt, kind, exit_code, signal, message, output_tail, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(id)
        .bind(attempt)
        .bind(failure.kind.as_str())
        .bind(failure.exit_code)
        .bind(failure.signal)
        .bind(&failure.message)
        .bind(&failure.output_tail)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        let state = if requeue { JobState::Queued } else { JobState::Failed };
        sqlx::query(
            "UPDATE jobs SET state = ?1, exit_code = ?2, signal = ?3, output_tail = ?4, finished_at = ?5, \
             lease_token = NULL, lease_expires_at = NULL, not_before = ?7 WHERE id = ?6",
        )
        .bind(state.as_str())
        .bind(failure.exit_code)
        .bind(failure.signal)
        .bind(&failure.output_tail)
        .bind(if requeue { None } else { Some(now) })
        .bind(id)
        .bind(not_before.map(|t| t.0))
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        if requeue {
            self.pushed.notify_waiters();
            Ok(FailOutcome::Requeued)
        } else {
            Ok(FailOutcome::Failed)
        }
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        let update = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', output_tail = ?1, finished_at = ?2, lease_token = NULL, \
             lease_expires_at = NULL WHERE id = ?3 AND lease_token = ?4 AND state = 'running'",
        )
        .bind(output_tail)
        .bind(Timestamp::now().0);
        self.fenced(update, lease).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let update = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempt = attempt - 1, lease_token = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_token = ?2 AND state = 'running'",
        );
        self.fenced(update, lease).await?;
        self.pushed.notify_waiters();
        Ok(())
    }

    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        let until = Timestamp::now().plus(pause);
        let update = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempt = attempt - 1, lease_token = NULL, lease_expires_at = NULL, \
             not_before = ?1 WHERE id = ?2 AND lease_token = ?3 AND state = 'running'",
        )
        .bind(until.0);
        self.fenced(update, lease).await
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let mut tx = self.begin_immediate().await?;
        let (n, state) = Self::state_of(&mut tx, id).await?;
        let outcome = match state {
            JobState::Queued => {
                sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = ?1 WHERE id = ?2")
                    .bind(Timestamp::now().0)
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .map_err(map)?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1")
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .map_err(map)?;
                CancelOutcome::Requested
            }
            ended => CancelOutcome::AlreadyEnded(ended),
        };
        tx.commit().await.map_err(map)?;
        Ok(outcome)
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let mut tx = self.begin_immediate().await?;
        let (n, state) = Self::state_of(&mut tx, id).await?;
        if !matches!(state, JobState::Failed | JobState::Cancelled) {
            return Err(Error::not_retryable(id, state));
        }
        sqlx::query(
            "UPDATE jobs SET state = 'queued', cancel_requested = 0, finished_at = NULL, not_before = NULL, \
             attempt_limit = attempt + max_attempts WHERE id = ?1",
        )
        .bind(n)
        .execute(&mut *tx)
        .await
        .map_err(map)?;
        tx.commit().await.map_err(map)?;
        self.pushed.notify_waiters();
        Ok(())
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        let n = id.as_i64()?;
        let text = serde_json::to_string(artifacts).map_err(|e| Error::backend(BACKEND, e))?;
        // Artifacts::replaces, in SQL: a stored value that does not read is
        // replaced too.
        let done = sqlx::query(
            "UPDATE jobs SET artifacts = ?2 WHERE id = ?1 AND (artifacts IS NULL \
             OR CASE WHEN json_valid(artifacts) THEN json_extract(artifacts, '$.attempt') ELSE 0 END <= ?3)",
        )
        .bind(n)
        .bind(text)
        .bind(i64::from(artifacts.attempt))
        .execute(&self.pool)
        .await
        .map_err(map)?;
        if done.rows_affected() == 0 {
            let known: Option<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE id = ?1")
                .bind(n)
                .fetch_optional(&self.pool)
                .await
                .map_err(map)?;
            if known.is_none() {
                return Err(Error::NotFound { id: id.to_string() });
            }
        }
        Ok(())
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        let n = id.as_i64()?;
        let mut tx = self.pool.begin().await.map_err(map)?;
        let row = sqlx::query(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?1"))
            .bind(n)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map)?
            .ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        let mut r = record(&row)?;
        r.errors = errors_of(&mut tx, n).await?;
        tx.commit().await.map_err(map)?;
        Ok(r)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        // One static statement per filter shape, so each can use its index.
        // `jobs_state` holds no queued jobs (a push writes one index fewer),
        // so its statements say `state <> 'queued'` to let SQLite use it.
        // Queued jobs are found through `jobs_reserve` (queue, state, …):
        // their ids first, sorted from that index alone, then the page's
        // rows; without a queue, each queue in turn (read off the same
        // index, one seek per queue name). A page of queued jobs costs a
        // sort of the queued ids, never a scan of the history.
        let queued = filter.state == Some(JobState::Queued);
        let sql = match (filter.state.is_some(), queued, filter.queue.is_some()) {
            (false, _, false) => concat!("SELECT ", job_columns!(), " FROM jobs ORDER BY id DESC LIMIT ?3 OFFSET ?4"),
            (true, false, false) => concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE state = ?1 AND state <> 'queued' AND ?2 IS NULL ORDER BY id DESC LIMIT ?3 OFFSET ?4"
            ),
            (true, true, false) => concat!(
                "WITH RECURSIVE queues (name) AS (SELECT MIN(queue) FROM jobs UNION ALL \
                 SELECT (SELECT MIN(queue) FROM jobs WHERE queue > queues.name) FROM queues WHERE name IS NOT NULL) \
                 SELECT ",
                job_columns!(),
                " FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue IN (SELECT name FROM queues) AND state = ?1 \
                 AND ?2 IS NULL ORDER BY id DESC LIMIT ?3 OFFSET ?4) ORDER BY id DESC"
            ),
            (false, _, true) => concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE ?1 IS NULL AND queue = ?2 ORDER BY id DESC LIMIT ?3 OFFSET ?4"
            ),
            (true, false, true) => concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE state = ?1 AND state <> 'queued' AND queue = ?2 ORDER BY id DESC LIMIT ?3 OFFSET ?4"
            ),
            (true, true, true) => concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue = ?2 AND state = ?1 \
                 ORDER BY id DESC LIMIT ?3 OFFSET ?4) ORDER BY id DESC"
            ),
        };
        let rows = sqlx::query(sql)
            .bind(filter.state.map(JobState::as_str))
            .bind(&filter.queue)
            .bind(i64::from(filter.limit))
            .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        // A row that does not read is left out, with a log line, so one bad
        // row does not hide every other job; `get` on it says why.
        Ok(rows
            .iter()
            .filter_map(|row| {
                record(row).map_err(|e| tracing::warn!("a job in the list does not read ({e}); left out")).ok()
            })
            .collect())
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        let rows = match job {
            Some(id) => sqlx::query(
                "SELECT job_id, attempt, kind, exit_code, signal, message, output_tail, at \
                 FROM job_errors WHERE job_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .bind(id.as_i64()?),
            None => sqlx::query(
                "SELECT job_id, attempt, kind, exit_code, signal, message, output_tail, at \
                 FROM job_errors ORDER BY id DESC LIMIT ?2",
            )
            .bind(None::<i64>),
        }
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map)?;
        rows.iter().map(attempt_error).collect()
    }

    async fn park(&self, lease: &Lease, _gpus: u32) -> Result<()> {
        // Reserve filters by GPUs: a smaller worker is never offered the job.
        self.release(lease).await
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

/// Pieces of [`gpupool_core::BLOB_PIECE_BYTES`], written in one
/// transaction, so a reader sees all of a blob or none.
#[async_trait]
impl gpupool_core::Blobs for SqliteQueue {
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        let mut tx = self.begin_immediate().await?;
        let pieces = gpupool_core::blob_pieces(bytes);
        for (n, piece) in pieces.into_iter().enumerate() {
            sqlx::query("INSERT OR IGNORE INTO blobs (hash, piece, data) VALUES (?1, ?2, ?3)")
                .bind(hash)
                .bind(i64::try_from(n).unwrap_or(i64::MAX))
                .bind(piece)
                .execute(&mut *tx)
                .await
                .map_err(map)?;
        }
        tx.commit().await.map_err(map)
    }

    async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let pieces: Vec<Vec<u8>> = sqlx::query_scalar("SELECT data FROM blobs WHERE hash = ?1 ORDER BY piece")
            .bind(hash)
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        Ok((!pieces.is_empty()).then(|| pieces.concat()))
    }
}

#[async_trait]
impl WorkerRegistry for SqliteQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let text = serde_json::to_string(info).map_err(|e| Error::backend("sqlite", e))?;
        sqlx::query(
            "INSERT INTO workers (name, info, seen_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET info = excluded.info, seen_at = excluded.seen_at",
        )
        .bind(&info.name)
        .bind(text)
        .bind(Timestamp::now().0)
        .execute(&self.pool)
        .await
        .map_err(map)?;
        Ok(())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE name = ?1").bind(name).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let stored: Vec<(String, i64)> = sqlx::query_as("SELECT info, seen_at FROM workers ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        let now = Timestamp::now();
        let all = stored
            .into_iter()
            .map(|(text, seen)| rows::worker_info(BACKEND, &text, Timestamp(seen), now))
            .collect::<Result<Vec<_>>>()?;
        let (shown, gone) = rows::split_gone(all, now);
        for w in gone {
            sqlx::query("DELETE FROM workers WHERE name = ?1 AND seen_at = ?2")
                .bind(&w.name)
                .bind(w.seen_at.0)
                .execute(&self.pool)
                .await
                .map_err(map)?;
        }
        Ok(shown)
    }
}

impl gpupool_core::Connect for SqliteQueue {
    const SCHEMES: &'static [&'static str] = &crate::SCHEMES;

    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send {
        SqliteQueue::connect(url)
    }
}

#[cfg(test)]
mod tests {
    use gpupool_core::rows::ExpiredLease;

    use super::*;

    /// `expire_leases` writes what [`ExpiredLease`] says, for each branch of
    /// the rule: (worker, cancel requested, attempt, attempt limit).
    #[tokio::test]
    async fn expired_leases_end_as_the_core_rule_says() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::connect(&format!("sqlite://{}/q.db", dir.path().display())).await.unwrap();
        let cases =
            [(Some("gpu1:7"), false, 1, 3), (None, false, 3, 3), (Some("gpu2:8"), true, 1, 3), (None, true, 3, 3)];
        let mut ids = Vec::new();
        for (worker, cancel, attempt, limit) in cases {
            let id = q.push(JobSpec::new("main", "train.py")).await.unwrap();
            sqlx::query(
                "UPDATE jobs SET state = 'running', worker = ?1, cancel_requested = ?2, attempt = ?3, \
                 attempt_limit = ?4, lease_token = 'held', lease_expires_at = 0 WHERE id = ?5",
            )
            .bind(worker)
            .bind(cancel)
            .bind(attempt)
            .bind(limit)
            .bind(id.as_i64().unwrap())
            .execute(q.pool())
            .await
            .unwrap();
            ids.push(id);
        }
        let mut tx = q.begin_immediate().await.unwrap();
        expire_leases(&mut tx, Timestamp::now().0).await.unwrap();
        tx.commit().await.unwrap();
        for ((worker, cancel, attempt, limit), id) in cases.into_iter().zip(&ids) {
            let want = ExpiredLease::new(worker, cancel, attempt, limit);
            let rec = q.get(id).await.unwrap();
            let at = rec.errors.first().map_or(Timestamp(0), |e| e.at);
            let lost = rows::failed_attempt(&want.failure, id.clone(), attempt, at);
            assert_eq!((rec.state, rec.errors), (want.state, vec![lost]), "{worker:?} {cancel} {attempt}/{limit}");
        }
    }
}
