//! [`MysqlQueue`]: the [`Queue`] on MySQL 8 or MariaDB ≥ 10.6.
//!
//! `reserve` is one short transaction: `SELECT … FOR UPDATE SKIP LOCKED` of
//! the best row, then an `UPDATE` of that same row with a fresh lease token
//! and `attempt + 1`, then `COMMIT`. No row lock is held while a job runs.
//! Heartbeat, complete, fail, cancelled and release are all `… WHERE id = ?
//! AND lease_token = ? AND state = 'running'`: zero rows means the lease was
//! lost. Every time is the database's clock (`UTC_TIMESTAMP(6)`), never a
//! host's. A deadlock or lock-wait timeout makes the transaction run again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use gpupool_core::rows::{self, ErrorRow, JobRow};
use gpupool_core::{
    AttemptError, Batch, CancelOutcome, Capabilities, Completion, Error, FailOutcome, Failure, FailureKind, Heartbeat,
    JobId, JobRecord, JobSpec, JobState, Lease, ListFilter, Pushed, Queue, ReserveRequest, Result, RunInfo, Timestamp,
    WorkerInfo, WorkerRegistry,
};
use sqlx::mysql::{MySql, MySqlArguments, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, Row, Transaction};

use crate::error::{BACKEND, is_duplicate, is_lock_conflict, map};
use crate::options::MysqlOptions;

mod ends;

/// Fastest and slowest poll of a waiting `reserve`. An idle worker settles
/// at the slowest: two cheap indexed reads a second.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);

/// Transactions retried on deadlock or lock-wait timeout.
const LOCK_RETRIES: u32 = 5;

/// The migrations, in order. `{prefix}` becomes the table prefix; statements
/// are separated by a blank line after `;`.
const MIGRATIONS: [(i64, &str); 6] = [
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_workers.sql")),
    // Running jobs' shipped output (gpupool_core::RunLogs), one row per piece.
    (3, include_str!("../migrations/0003_job_logs.sql")),
    // Where a job's last run left its files (gpupool_core::Artifacts, JSON).
    (4, include_str!("../migrations/0004_artifacts.sql")),
    // A queued job's earliest start (not_before, a retry's backoff, the
    // wait of `after`); NULL: at once.
    (5, include_str!("../migrations/0005_not_before.sql")),
    // Snapshots of uncommitted code (gpupool_core::Blobs), in pieces.
    (6, include_str!("../migrations/0006_blobs.sql")),
];

/// Pieces of a log read per call: about a megabyte at the worker's batching.
const LOG_PIECES_PER_READ: i64 = 256;

/// Milliseconds since the epoch of a DATETIME(6) column, independent of the
/// session's time zone.
macro_rules! ms {
    ($col:literal) => {
        concat!("CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', ", $col, ") DIV 1000 AS SIGNED)")
    };
}

/// How many unreadable jobs one reserve marks `failed` per queue before it
/// gives up for this call (each is looked at once; the next call goes on).
const UNREADABLE_PER_RESERVE: usize = 8;

/// The most jobs one reserve transaction leases ([`Queue::reserve_many`]).
const MAX_BATCH: usize = 16;

macro_rules! job_columns {
    () => {
        concat!(
            "id, state, attempt, attempt_limit, spec, commit_sha, worker, gpu_ids, exit_code, term_signal, ",
            "output_tail, result, artifacts, ",
            "cancel_requested, ",
            ms!("created_at"),
            " AS created_ms, ",
            ms!("started_at"),
            " AS started_ms, ",
            ms!("finished_at"),
            " AS finished_ms, ",
            ms!("not_before"),
            " AS not_before_ms"
        )
    };
}

/// `job_columns!` for a queued row about to be leased: the columns the
/// lease writes (`lease_many`) read as NULL, so that what an earlier
/// attempt left there (a row written by hand, say) is not read, as it was
/// not when the lease was read back after it was written.
macro_rules! candidate_columns {
    () => {
        concat!(
            "id, state, attempt, attempt_limit, spec, commit_sha, NULL AS worker, NULL AS gpu_ids, ",
            "NULL AS exit_code, NULL AS term_signal, output_tail, result, artifacts, cancel_requested, ",
            ms!("created_at"),
            " AS created_ms, NULL AS started_ms, NULL AS finished_ms, ",
            ms!("not_before"),
            " AS not_before_ms"
        )
    };
}

macro_rules! error_columns {
    () => {
        concat!("job_id, attempt, kind, exit_code, term_signal, message, output_tail, ", ms!("at"), " AS at_ms")
    };
}

/// Every statement, with the table prefix filled in once.
#[derive(Debug)]
struct Sql {
    has_work: Arc<str>,
    expired: Arc<str>,
    expire_error: Arc<str>,
    expire_update: Arc<str>,
    /// The next queued jobs that fit, locked and read whole, with the
    /// server's clock (µs since the epoch) that their leases start at.
    candidates: Arc<str>,
    /// `lease_many[k - 1]` leases k jobs.
    lease_many: Vec<Arc<str>>,
    select_job: Arc<str>,
    select_errors: Arc<str>,
    insert: Arc<str>,
    by_key: Arc<str>,
    heartbeat: Arc<str>,
    cancel_flag: Arc<str>,
    started: Arc<str>,
    complete: Arc<str>,
    held: Arc<str>,
    insert_error: Arc<str>,
    fail_update: Arc<str>,
    cancelled: Arc<str>,
    release: Arc<str>,
    defer: Arc<str>,
    state_of: Arc<str>,
    cancel_queued: Arc<str>,
    cancel_running: Arc<str>,
    retry: Arc<str>,
    list: [Arc<str>; 4],
    errors_of: Arc<str>,
    errors_all: Arc<str>,
    worker_upsert: Arc<str>,
    worker_delete: Arc<str>,
    worker_gone: Arc<str>,
    workers: Arc<str>,
    ship_result: Arc<str>,
    set_artifacts: Arc<str>,
    log_end: Arc<str>,
    ship_log: Arc<str>,
    log_trim: Arc<str>,
    /// `held_many[k - 1]` locks k running jobs' rows and reads their
    /// tokens; `log_ends`, `log_insert_many` and `complete_many` likewise
    /// for k logs or ends (`queue/ends.rs`).
    held_many: Vec<Arc<str>>,
    log_ends: Vec<Arc<str>>,
    log_insert_many: Vec<Arc<str>>,
    complete_many: Vec<Arc<str>>,
    log_read: Arc<str>,
    job_known: Arc<str>,
    blob_put: Arc<str>,
    blob_get: Arc<str>,
}

impl Sql {
    fn new(p: &str) -> Sql {
        let s = |t: &str| -> Arc<str> { Arc::from(t.replace("{p}", p)) };
        let list = |filter: &str| {
            s(&format!("SELECT {} FROM {{p}}jobs {filter} ORDER BY id DESC LIMIT ? OFFSET ?", job_columns!()))
        };
        Sql {
            has_work: s("SELECT EXISTS (SELECT 1 FROM {p}jobs WHERE queue = ? AND state = 'queued' \
                         AND COALESCE(gpus, ?) <= ? AND (not_before IS NULL OR not_before <= UTC_TIMESTAMP(6))), \
                         EXISTS (SELECT 1 FROM {p}jobs WHERE state = 'running' \
                         AND lease_expires_at < UTC_TIMESTAMP(6))"),
            expired: s("SELECT id FROM {p}jobs WHERE state = 'running' AND lease_expires_at < UTC_TIMESTAMP(6) \
                        LIMIT 20 FOR UPDATE SKIP LOCKED"),
            // The set-based form of `rows::ExpiredLease`; a test below holds
            // the two to the same result.
            expire_error: s("INSERT INTO {p}job_errors (job_id, attempt, kind, message, output_tail, at) \
                             SELECT id, attempt, 'lease_lost', \
                             CONCAT('lease expired: worker ', COALESCE(worker, 'unknown'), ' stopped heartbeating'), \
                             '', UTC_TIMESTAMP(6) FROM {p}jobs WHERE id = ?"),
            expire_update: s("UPDATE {p}jobs SET \
                              state = CASE WHEN cancel_requested THEN 'cancelled' \
                                           WHEN attempt < attempt_limit THEN 'queued' ELSE 'failed' END, \
                              finished_at = CASE WHEN cancel_requested OR attempt >= attempt_limit \
                                            THEN UTC_TIMESTAMP(6) END, \
                              lease_token = NULL, lease_expires_at = NULL WHERE id = ?"),
            candidates: s(&format!(
                "SELECT {}, CAST(COALESCE(gpus, ?) AS SIGNED) AS need, \
                 CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS SIGNED) AS now_us \
                 FROM {{p}}jobs WHERE queue = ? AND state = 'queued' \
                 AND COALESCE(gpus, ?) <= ? AND (not_before IS NULL OR not_before <= UTC_TIMESTAMP(6)) \
                 ORDER BY priority DESC, id LIMIT ? FOR UPDATE SKIP LOCKED",
                candidate_columns!()
            )),
            lease_many: (1..=MAX_BATCH)
                .map(|k| {
                    s(&format!(
                        "UPDATE {{p}}jobs SET state = 'running', attempt = attempt + 1, lease_token = CASE id {} END, \
                         lease_expires_at = '1970-01-01 00:00:00' + INTERVAL ? MICROSECOND, worker = ?, \
                         started_at = '1970-01-01 00:00:00' + INTERVAL ? MICROSECOND, finished_at = NULL, exit_code = NULL, term_signal = NULL, \
                         gpu_ids = NULL WHERE id IN ({})",
                        vec!["WHEN ? THEN ?"; k].join(" "),
                        vec!["?"; k].join(", ")
                    ))
                })
                .collect(),
            select_job: s(&format!(
                "SELECT {}, {} AS expires_ms FROM {{p}}jobs WHERE id = ?",
                job_columns!(),
                ms!("lease_expires_at")
            )),
            select_errors: s(&format!("SELECT {} FROM {{p}}job_errors WHERE job_id = ? ORDER BY id", error_columns!())),
            insert: s("INSERT INTO {p}jobs (queue, state, priority, gpus, spec, idempotency_key, max_attempts, \
                       attempt_limit, created_at, not_before) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), \
                       TIMESTAMPADD(MICROSECOND, ?, '1970-01-01 00:00:00'))"),
            by_key: s("SELECT id, spec FROM {p}jobs WHERE idempotency_key = ?"),
            heartbeat: s("UPDATE {p}jobs SET lease_expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                          WHERE id = ? AND lease_token = ? AND state = 'running'"),
            cancel_flag: s("SELECT cancel_requested FROM {p}jobs WHERE id = ? AND lease_token = ? \
                            AND state = 'running'"),
            started: s("UPDATE {p}jobs SET commit_sha = ?, gpu_ids = ? \
                        WHERE id = ? AND lease_token = ? AND state = 'running'"),
            complete: s("UPDATE {p}jobs SET state = 'succeeded', exit_code = 0, output_tail = ?, result = ?, \
                         commit_sha = COALESCE(?, commit_sha), gpu_ids = COALESCE(?, gpu_ids), \
                         finished_at = UTC_TIMESTAMP(6), lease_token = NULL, lease_expires_at = NULL \
                         WHERE id = ? AND lease_token = ? AND state = 'running'"),
            held: s("SELECT attempt, attempt_limit FROM {p}jobs WHERE id = ? AND lease_token = ? \
                     AND state = 'running' FOR UPDATE"),
            insert_error: s("INSERT INTO {p}job_errors (job_id, attempt, kind, exit_code, term_signal, message, \
                             output_tail, at) VALUES (?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))"),
            fail_update: s("UPDATE {p}jobs SET state = ?, exit_code = ?, term_signal = ?, output_tail = ?, \
                            finished_at = IF(? , UTC_TIMESTAMP(6), NULL), lease_token = NULL, \
                            lease_expires_at = NULL, not_before = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                            WHERE id = ?"),
            cancelled: s("UPDATE {p}jobs SET state = 'cancelled', output_tail = ?, finished_at = UTC_TIMESTAMP(6), \
                          lease_token = NULL, lease_expires_at = NULL \
                          WHERE id = ? AND lease_token = ? AND state = 'running'"),
            release: s("UPDATE {p}jobs SET state = 'queued', attempt = attempt - 1, lease_token = NULL, \
                        lease_expires_at = NULL WHERE id = ? AND lease_token = ? AND state = 'running'"),
            defer: s("UPDATE {p}jobs SET state = 'queued', attempt = attempt - 1, lease_token = NULL, \
                      lease_expires_at = NULL, not_before = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                      WHERE id = ? AND lease_token = ? AND state = 'running'"),
            state_of: s("SELECT state FROM {p}jobs WHERE id = ? FOR UPDATE"),
            cancel_queued: s("UPDATE {p}jobs SET state = 'cancelled', finished_at = UTC_TIMESTAMP(6) WHERE id = ?"),
            cancel_running: s("UPDATE {p}jobs SET cancel_requested = 1 WHERE id = ?"),
            retry: s("UPDATE {p}jobs SET state = 'queued', cancel_requested = 0, finished_at = NULL, \
                      not_before = NULL, attempt_limit = attempt + max_attempts WHERE id = ?"),
            list: [
                list("WHERE ? IS NULL AND ? IS NULL"),
                list("WHERE state = ? AND ? IS NULL"),
                list("WHERE ? IS NULL AND queue = ?"),
                list("WHERE state = ? AND queue = ?"),
            ],
            errors_of: s(&format!(
                "SELECT {} FROM {{p}}job_errors WHERE job_id = ? ORDER BY id DESC LIMIT ?",
                error_columns!()
            )),
            errors_all: s(&format!("SELECT {} FROM {{p}}job_errors ORDER BY id DESC LIMIT ?", error_columns!())),
            worker_upsert: s("INSERT INTO {p}workers (name, info, seen_at) VALUES (?, ?, UTC_TIMESTAMP(6)) \
                              ON DUPLICATE KEY UPDATE info = VALUES(info), seen_at = VALUES(seen_at)"),
            worker_delete: s("DELETE FROM {p}workers WHERE name = ?"),
            worker_gone: s(&format!("DELETE FROM {{p}}workers WHERE name = ? AND {} = ?", ms!("seen_at"))),
            workers: s(&format!(
                "SELECT info, {} AS seen_ms, {} AS now_ms FROM {{p}}workers ORDER BY name",
                ms!("seen_at"),
                ms!("UTC_TIMESTAMP(6)")
            )),
            ship_result: s("UPDATE {p}jobs SET result = ? WHERE id = ?"),
            // Artifacts::replaces, in SQL; a stored value that does not
            // read is replaced too.
            set_artifacts: s("UPDATE {p}jobs SET artifacts = ? WHERE id = ? AND (artifacts IS NULL OR \
                              CASE WHEN JSON_VALID(artifacts) \
                              THEN CAST(JSON_EXTRACT(artifacts, '$.attempt') AS SIGNED) ELSE 0 END <= ?)"),
            log_end: s("SELECT CAST(COALESCE(MAX(start + len), 0) AS SIGNED) FROM {p}job_logs WHERE job_id = ?"),
            // A piece appended in one statement: fenced by the lease (no row,
            // nothing inserted), at the log's end read under lock, which
            // comes back as the statement's insert id (LAST_INSERT_ID(expr)).
            ship_log: s("INSERT INTO {p}job_logs (job_id, start, len, text) SELECT ?, LAST_INSERT_ID(\
                         (SELECT CAST(COALESCE(MAX(start + len), 0) AS SIGNED) FROM {p}job_logs WHERE job_id = ? \
                         FOR UPDATE)), ?, ? FROM {p}jobs WHERE id = ? AND lease_token = ? AND state = 'running' \
                         FOR UPDATE"),
            log_trim: s("DELETE FROM {p}job_logs WHERE job_id = ? AND start < ? AND start < ?"),
            held_many: (1..=MAX_BATCH)
                .map(|k| {
                    s(&format!(
                        "SELECT id, lease_token FROM {{p}}jobs WHERE id IN ({}) AND state = 'running' \
                         ORDER BY id FOR UPDATE",
                        vec!["?"; k].join(", ")
                    ))
                })
                .collect(),
            log_ends: (1..=MAX_BATCH)
                .map(|k| {
                    s(&format!(
                        "SELECT job_id, CAST(COALESCE(MAX(start + len), 0) AS SIGNED) FROM {{p}}job_logs \
                         WHERE job_id IN ({}) GROUP BY job_id FOR UPDATE",
                        vec!["?"; k].join(", ")
                    ))
                })
                .collect(),
            log_insert_many: (1..=MAX_BATCH)
                .map(|k| {
                    s(&format!(
                        "INSERT INTO {{p}}job_logs (job_id, start, len, text) VALUES {}",
                        vec!["(?, ?, ?, ?)"; k].join(", ")
                    ))
                })
                .collect(),
            complete_many: (1..=MAX_BATCH)
                .map(|k| {
                    let case = vec!["WHEN ? THEN ?"; k].join(" ");
                    s(&format!(
                        "UPDATE {{p}}jobs SET state = 'succeeded', exit_code = 0, output_tail = CASE id {case} END, \
                         result = CASE id {case} END, commit_sha = COALESCE(CASE id {case} END, commit_sha), \
                         gpu_ids = COALESCE(CASE id {case} END, gpu_ids), finished_at = UTC_TIMESTAMP(6), \
                         lease_token = NULL, lease_expires_at = NULL WHERE id IN ({})",
                        vec!["?"; k].join(", ")
                    ))
                })
                .collect(),
            log_read: s("SELECT start, len, text FROM {p}job_logs WHERE job_id = ? AND start + len > ? \
                         ORDER BY start LIMIT ?"),
            job_known: s("SELECT id FROM {p}jobs WHERE id = ?"),
            blob_put: s("INSERT IGNORE INTO {p}blobs (hash, piece, data) VALUES (?, ?, ?)"),
            blob_get: s("SELECT data FROM {p}blobs WHERE hash = ? ORDER BY piece"),
        }
    }
}

fn q(sql: &Arc<str>) -> Query<'static, MySql, MySqlArguments> {
    // Built once in `Sql::new` from constants and a validated prefix.
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A queue in a MySQL or MariaDB database, shared by any number of hosts.
#[derive(Debug, Clone)]
pub struct MysqlQueue {
    pool: MySqlPool,
    opts: Arc<MysqlOptions>,
    sql: Arc<Sql>,
    idle_polls: Arc<AtomicU32>,
    sweep: Arc<gpupool_core::Sweep>,
    /// Where ends that carry output wait for their transaction (`queue/ends.rs`):
    /// the task that writes them, started on the first (again if its
    /// runtime went).
    ends: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<ends::End>>>>,
}

impl MysqlQueue {
    /// Connects to the database a `mysql://` or `mariadb://` URL names. Does
    /// not create tables: call [`Queue::init`] (`gpupool init`) once.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(MysqlOptions::from_url(url)?).await
    }

    /// Connects with parsed options. Fails within the connect timeout with
    /// one line naming `host:port` and the cause.
    pub async fn open(opts: MysqlOptions) -> Result<Self> {
        let pool = MySqlPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.connect_timeout)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                    Ok(())
                })
            })
            .connect_lazy_with(opts.connect.clone());
        // One direct connection first: a pool would retry a refused
        // connection until its timeout and then hide the cause.
        let first = tokio::time::timeout(opts.connect_timeout, opts.connect.connect()).await;
        let cause = match first {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                None
            }
            Ok(Err(e)) => Some(gpupool_core::redact::redact_url(&e.to_string())),
            Err(_) => Some(format!("no answer within {} s", opts.connect_timeout.as_secs())),
        };
        if let Some(cause) = cause {
            return Err(Error::Unavailable {
                backend: crate::error::BACKEND,
                source: format!("cannot connect to MySQL at {}: {cause}", opts.endpoint).into(),
            });
        }
        let sql = Arc::new(Sql::new(&opts.prefix));
        Ok(MysqlQueue {
            pool,
            opts: Arc::new(opts),
            sql,
            idle_polls: Arc::default(),
            sweep: Arc::default(),
            ends: Arc::default(),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &MysqlOptions {
        &self.opts
    }

    /// The pool, for inspection with plain SQL.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Drops this prefix's tables (tests clean up with it).
    pub async fn drop_tables(&self) -> Result<()> {
        for t in ["jobs", "job_errors", "job_logs", "workers", "schema_version"] {
            let sql = format!("DROP TABLE IF EXISTS {}{t}", self.opts.prefix);
            sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await.map_err(map)?;
        }
        Ok(())
    }

    /// Lock-free reads: is anything queued that fits, and has a lease
    /// expired?
    async fn might_have_work(&self, req: &ReserveRequest) -> Result<(bool, bool)> {
        let mut expired = false;
        for queue in &req.queues {
            let row = q(&self.sql.has_work)
                .bind(queue)
                .bind(i64::from(req.gpu_host))
                .bind(i64::from(req.gpu_limit()))
                .fetch_one(&self.pool)
                .await
                .map_err(map)?;
            let (found, lost): (bool, bool) = (row.try_get(0).map_err(map)?, row.try_get(1).map_err(map)?);
            expired |= lost;
            if found {
                return Ok((true, expired));
            }
        }
        Ok((false, expired))
    }

    async fn try_reserve(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        // While reserves keep finding work, skip the lock-free look and
        // sweep expired leases at most once a second.
        let hot = self.sweep.hot.load(Ordering::Relaxed);
        let sweep = if hot {
            self.sweep.due()
        } else {
            let (work, expired) = self.might_have_work(req).await?;
            if !work && !expired {
                return Ok(Vec::new());
            }
            expired
        };
        let mut tries = 0;
        let got = loop {
            match self.reserve_tx(req, sweep, max).await {
                Err(e) if is_lock_conflict(&e) && tries < LOCK_RETRIES => tries += 1,
                other => break other.map_err(map)??,
            }
        };
        self.sweep.hot.store(!got.is_empty(), Ordering::Relaxed);
        Ok(got)
    }

    /// One reserve transaction, leasing up to `max` jobs as one [`Batch`]:
    /// the candidates are locked and read whole in one statement and leased
    /// in one (the lease is what that statement writes, so nothing is read
    /// back), so a batch costs the round trips of one job.
    /// Inner `Result` is ours, outer is the driver's.
    async fn reserve_tx(
        &self,
        req: &ReserveRequest,
        sweep: bool,
        max: usize,
    ) -> std::result::Result<Result<Vec<Lease>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let expired: Vec<i64> = if sweep {
            q(&self.sql.expired).fetch_all(&mut *tx).await?.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        for id in expired {
            q(&self.sql.expire_error).bind(id).execute(&mut *tx).await?;
            q(&self.sql.expire_update).bind(id).execute(&mut *tx).await?;
        }
        let mut batch = Batch::new(req, max.min(MAX_BATCH));
        let mut leases = Vec::new();
        for queue in &req.queues {
            let mut unreadable = 0;
            while !batch.full() && unreadable < UNREADABLE_PER_RESERVE {
                let room = batch.room();
                let rows = q(&self.sql.candidates)
                    .bind(i64::from(req.gpu_host))
                    .bind(queue)
                    .bind(i64::from(req.gpu_host))
                    .bind(i64::from(req.gpu_limit()))
                    .bind(i64::try_from(room).unwrap_or(1))
                    .fetch_all(&mut *tx)
                    .await?;
                let admitted = admit(&rows, &mut batch)?;
                // A candidate refused here ends the queue's turn only if the
                // batch stays closed (an unreadable row below can reopen it:
                // then this queue is looked at again, never skipped).
                let refused = admitted.len() < rows.len();
                if admitted.is_empty() {
                    break;
                }
                let now_us: i64 = rows[0].try_get("now_us")?;
                let ids = admitted.iter().map(|(row, _)| row.try_get::<i64, _>("id")).collect::<Result<Vec<_>, _>>()?;
                let tokens = self.lease_ids(&mut tx, req, &ids, now_us).await?;
                let expires_at = Timestamp(now_us.saturating_add(micros(req.lease)) / 1000);
                for (((row, need), id), token) in admitted.into_iter().zip(ids).zip(tokens) {
                    let attempt = row.try_get::<i32, _>("attempt")?.saturating_add(1);
                    // A row that does not read (written by hand, or by a
                    // newer gpupool), or fails the checks of push, ends
                    // `failed`, kind `invalid`, and the reserve moves on:
                    // one bad row never stalls the queue, and none gets past
                    // the checks.
                    let mut job = match rows::runnable(record(row)) {
                        Ok(j) => j,
                        Err(message) => {
                            fail_invalid(&self.sql, &mut tx, id, attempt, &message).await?;
                            batch.unadmit(need);
                            unreadable += 1;
                            continue;
                        }
                    };
                    as_leased(&mut job, req, attempt, now_us);
                    if job.attempt > 1 {
                        let rows = q(&self.sql.select_errors).bind(id).fetch_all(&mut *tx).await?;
                        job.errors = match rows.iter().map(attempt_error).collect::<Result<Vec<_>>>() {
                            Ok(e) => e,
                            Err(e) => return Ok(Err(e)),
                        };
                    }
                    leases.push(Lease { job, token, expires_at });
                }
                if rows.len() < room && !refused {
                    break; // this queue has no more that fit
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(leases))
    }

    /// Leases the locked rows `ids` (at most [`MAX_BATCH`]) in one
    /// statement, each with a token of its own (returned in the order of
    /// `ids`), from `now_us`, the server's clock the candidates were read at.
    async fn lease_ids(
        &self,
        tx: &mut Transaction<'static, MySql>,
        req: &ReserveRequest,
        ids: &[i64],
        now_us: i64,
    ) -> std::result::Result<Vec<String>, sqlx::Error> {
        let tokens: Vec<String> = ids.iter().map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
        let mut lease = q(&self.sql.lease_many[ids.len() - 1]);
        for (id, token) in ids.iter().zip(&tokens) {
            lease = lease.bind(*id).bind(token.clone());
        }
        lease = lease.bind(now_us.saturating_add(micros(req.lease))).bind(req.worker.clone()).bind(now_us);
        for id in ids {
            lease = lease.bind(*id);
        }
        lease.execute(&mut **tx).await?;
        Ok(tokens)
    }

    /// Runs one of the statements fenced by `lease` (`… WHERE id = ? AND
    /// lease_token = ? AND state = 'running'`, those two parameters last and
    /// bound here): `LeaseLost` if it matched no row. The driver asks for
    /// found rows, so an update that changes nothing still counts its row.
    async fn fenced(&self, query: Query<'_, MySql, MySqlArguments>, lease: &Lease) -> Result<()> {
        let done = query.bind(lease.id().as_i64()?).bind(&lease.token).execute(&self.pool).await.map_err(map)?;
        rows::fenced(done.rows_affected(), lease)
    }

    /// Runs `f` in a transaction, again on deadlock or lock-wait timeout.
    async fn in_tx<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> Fn(
                &'c mut Transaction<'static, MySql>,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = std::result::Result<Result<T>, sqlx::Error>> + Send + 'c>,
            > + Send
            + Sync,
        T: Send,
    {
        let mut tries = 0;
        loop {
            let attempt = async {
                let mut tx = self.pool.begin().await?;
                let out = f(&mut tx).await?;
                if out.is_ok() {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                Ok::<_, sqlx::Error>(out)
            };
            match attempt.await {
                Err(e) if is_lock_conflict(&e) && tries < LOCK_RETRIES => tries += 1,
                Err(e) => return Err(map(e)),
                Ok(out) => return out,
            }
        }
    }
}

/// A job's state, its row locked for the rest of the transaction; the
/// inner error is `NotFound` or an unreadable state.
async fn locked_state(
    sql: &Sql,
    tx: &mut Transaction<'static, MySql>,
    n: i64,
) -> std::result::Result<Result<JobState>, sqlx::Error> {
    let Some(row) = q(&sql.state_of).bind(n).fetch_optional(&mut **tx).await? else {
        return Ok(Err(Error::NotFound { id: n.to_string() }));
    };
    Ok(rows::state_column(BACKEND, &row.try_get::<String, _>(0)?))
}

fn get<'r, T: sqlx::Decode<'r, MySql> + sqlx::Type<MySql>>(row: &'r MySqlRow, col: &str) -> Result<T> {
    row.try_get(col).map_err(map)
}

/// A row of `job_columns!()` as a record (without its errors).
fn record(row: &MySqlRow) -> Result<JobRecord> {
    JobRow {
        id: get(row, "id")?,
        state: get(row, "state")?,
        attempt: get::<i32>(row, "attempt")?.into(),
        attempt_limit: Some(get::<i32>(row, "attempt_limit")?.into()),
        spec: get(row, "spec")?,
        commit: get(row, "commit_sha")?,
        worker: get(row, "worker")?,
        gpu_ids: get(row, "gpu_ids")?,
        exit_code: get(row, "exit_code")?,
        signal: get(row, "term_signal")?,
        output_tail: get(row, "output_tail")?,
        result: get(row, "result")?,
        artifacts: get(row, "artifacts")?,
        cancel_requested: get::<i8>(row, "cancel_requested")? != 0,
        created_at: get(row, "created_ms")?,
        started_at: get(row, "started_ms")?,
        finished_at: get(row, "finished_ms")?,
        not_before: get(row, "not_before_ms")?,
    }
    .into_record(BACKEND)
}

/// The candidates, in order, that `batch` admits, each with the GPUs it
/// needs; the first it refuses closes it.
fn admit<'r>(rows: &'r [MySqlRow], batch: &mut Batch) -> std::result::Result<Vec<(&'r MySqlRow, u32)>, sqlx::Error> {
    let mut admitted = Vec::new();
    for row in rows {
        let need = u32::try_from(row.try_get::<i64, _>("need")?).unwrap_or(u32::MAX);
        if !batch.admit(need) {
            break;
        }
        admitted.push((row, need));
    }
    Ok(admitted)
}

/// A candidate's record as `lease_many` writes its row, leased to `req` at
/// `now_us` (attempt `attempt`, one past the row's). The columns the lease
/// clears already read as NULL (`candidate_columns!`).
fn as_leased(job: &mut JobRecord, req: &ReserveRequest, attempt: i32, now_us: i64) {
    job.state = JobState::Running;
    job.attempt = u32::try_from(attempt).unwrap_or(0);
    job.worker = Some(req.worker.clone());
    job.started_at = Some(Timestamp(now_us / 1000));
}

/// Ends a job whose row does not read or fails the checks of push
/// ([`rows::unfit`]): `failed`, with an `invalid` attempt saying why, so the
/// reserve can go on to the jobs behind it.
async fn fail_invalid(
    sql: &Sql,
    tx: &mut sqlx::MySqlConnection,
    id: i64,
    attempt: i32,
    message: &str,
) -> std::result::Result<(), sqlx::Error> {
    q(&sql.insert_error)
        .bind(id)
        .bind(attempt)
        .bind(FailureKind::Invalid.as_str())
        .bind(None::<i32>)
        .bind(None::<i32>)
        .bind(message)
        .bind("")
        .execute(&mut *tx)
        .await?;
    q(&sql.fail_update)
        .bind(JobState::Failed.as_str())
        .bind(None::<i32>)
        .bind(None::<i32>)
        .bind("")
        .bind(true)
        .bind(None::<i64>)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tracing::warn!(job_id = id, "{message}; marked failed");
    Ok(())
}

/// A row of `error_columns!()`.
fn attempt_error(row: &MySqlRow) -> Result<AttemptError> {
    ErrorRow {
        job_id: get(row, "job_id")?,
        attempt: get::<i32>(row, "attempt")?.into(),
        kind: get(row, "kind")?,
        exit_code: get(row, "exit_code")?,
        signal: get(row, "term_signal")?,
        message: get(row, "message")?,
        output_tail: get(row, "output_tail")?,
        at: get(row, "at_ms")?,
    }
    .into_error(BACKEND)
}

/// Appends `log` to job `id`'s log in one statement (`ship_log`), fenced
/// by the lease `token`: `None` when it no longer holds (nothing written),
/// else the trim the log now needs ([`trim_query`]). `ship` and the ends
/// writer (`queue/ends.rs`) append through it.
async fn append_log<'e>(
    sql: &Sql,
    on: impl Executor<'e, Database = MySql>,
    id: i64,
    token: &str,
    log: &str,
) -> std::result::Result<Option<Option<Query<'static, MySql, MySqlArguments>>>, sqlx::Error> {
    let len = i64::try_from(log.len()).unwrap_or(i64::MAX);
    let done = q(&sql.ship_log)
        .bind(id)
        .bind(id)
        .bind(len)
        .bind(log.to_owned())
        .bind(id)
        .bind(token.to_owned())
        .execute(on)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    // The piece's start, from LAST_INSERT_ID(expr). (The session's
    // LAST_INSERT_ID() holds it too: nothing on this pool reads that;
    // `add` takes its id from the OK packet.)
    let start = i64::try_from(done.last_insert_id()).unwrap_or(0);
    Ok(Some(trim_query(sql, id, start, len)))
}

/// The trim a log needs after a piece at `start`, `len` long: whole pieces
/// that start before the last 16 MiB go, never that piece, so the offsets
/// go on from it. Under the cap nothing starts before the cut: no statement.
fn trim_query(sql: &Sql, id: i64, start: i64, len: i64) -> Option<Query<'static, MySql, MySqlArguments>> {
    let cap = i64::try_from(gpupool_core::LOG_CAP_BYTES).unwrap_or(i64::MAX);
    (start + len > cap).then(|| q(&sql.log_trim).bind(id).bind(start + len - cap).bind(start))
}

#[async_trait]
impl gpupool_core::RunLogs for MysqlQueue {
    async fn ship(&self, lease: &Lease, progress: &gpupool_core::Progress) -> Result<()> {
        let n = lease.id().as_i64()?;
        if progress.result.is_none() && !progress.log.is_empty() {
            // Output alone (most ships): one statement, not a transaction.
            // Past the cap, the trim follows; a trim that fails is not the
            // ship's failure (shipped again, the piece would be there
            // twice), and the next ship trims.
            let appended = append_log(&self.sql, &self.pool, n, &lease.token, &progress.log).await.map_err(map)?;
            let Some(trim) = appended else {
                return Err(Error::lease_lost(lease.id()));
            };
            if let Some(trim) = trim
                && let Err(e) = trim.execute(&self.pool).await
            {
                tracing::debug!("trimming job {n}'s log failed ({e}); the next ship trims it");
            }
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(map)?;
        // Fenced under the row's lock, as `fail` is.
        let held = q(&self.sql.held).bind(n).bind(&lease.token).fetch_optional(&mut *tx).await.map_err(map)?;
        if held.is_none() {
            return Err(Error::lease_lost(lease.id()));
        }
        if let Some(result) = &progress.result {
            q(&self.sql.ship_result).bind(result.to_string()).bind(n).execute(&mut *tx).await.map_err(map)?;
        }
        if !progress.log.is_empty()
            && let Some(Some(trim)) =
                append_log(&self.sql, &mut *tx, n, &lease.token, &progress.log).await.map_err(map)?
        {
            trim.execute(&mut *tx).await.map_err(map)?;
        }
        tx.commit().await.map_err(map)
    }

    async fn read_log(&self, id: &JobId, from: u64) -> Result<gpupool_core::LogPage> {
        let n = id.as_i64()?;
        let from_i = i64::try_from(from).unwrap_or(i64::MAX);
        let pieces = q(&self.sql.log_read)
            .bind(n)
            .bind(from_i)
            .bind(LOG_PIECES_PER_READ)
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        if pieces.is_empty() {
            q(&self.sql.job_known)
                .bind(n)
                .fetch_optional(&self.pool)
                .await
                .map_err(map)?
                .ok_or_else(|| Error::NotFound { id: id.to_string() })?;
            let end: i64 =
                q(&self.sql.log_end).bind(n).fetch_one(&self.pool).await.map_err(map)?.try_get(0).map_err(map)?;
            let end = u64::try_from(end).unwrap_or(0);
            return Ok(gpupool_core::LogPage { text: String::new(), next: from.min(end), dropped: 0 });
        }
        let pieces = pieces
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<std::result::Result<Vec<(i64, i64, String)>, sqlx::Error>>()
            .map_err(map)?;
        Ok(rows::log_page(from, &pieces))
    }
}

#[async_trait]
impl Queue for MysqlQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn init(&self) -> Result<()> {
        // One migrator at a time, across hosts: a named lock on one connection.
        let mut conn = self.pool.acquire().await.map_err(map)?;
        let lock_name = format!("gpupool.migrate.{}", self.opts.prefix);
        let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, 60)")
            .bind(&lock_name)
            .fetch_one(&mut *conn)
            .await
            .map_err(map)?
            .try_get(0)
            .map_err(map)?;
        if got != Some(1) {
            return Err(Error::Unavailable {
                backend: "mysql",
                source: "another host has been migrating the schema for 60 s".into(),
            });
        }
        let result = async {
            let p = &self.opts.prefix;
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {p}schema_version (version INT NOT NULL PRIMARY KEY, \
                 applied_at DATETIME(6) NOT NULL) ENGINE = InnoDB"
            );
            sqlx::query(AssertSqlSafe(create)).execute(&mut *conn).await.map_err(map)?;
            let select = format!("SELECT COALESCE(MAX(version), 0) FROM {p}schema_version");
            let version: i64 = sqlx::query(AssertSqlSafe(select))
                .fetch_one(&mut *conn)
                .await
                .map_err(map)?
                .try_get::<i64, _>(0)
                .map_err(map)?;
            let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
            if version > latest {
                return Err(Error::Config(format!(
                    "the schema is at version {version}, newer than this gpupool knows ({latest}); upgrade gpupool"
                )));
            }
            for (v, script) in MIGRATIONS.iter().filter(|(v, _)| *v > version) {
                for statement in script.split(";\n\n").map(str::trim).filter(|s| !s.is_empty()) {
                    let statement = statement.trim_end_matches(';').replace("{prefix}", p);
                    sqlx::query(AssertSqlSafe(statement)).execute(&mut *conn).await.map_err(map)?;
                }
                let record =
                    format!("INSERT INTO {p}schema_version (version, applied_at) VALUES (?, UTC_TIMESTAMP(6))");
                sqlx::query(AssertSqlSafe(record)).bind(v).execute(&mut *conn).await.map_err(map)?;
            }
            Ok(())
        }
        .await;
        let _ = sqlx::query("SELECT RELEASE_LOCK(?)").bind(&lock_name).execute(&mut *conn).await;
        result
    }

    async fn exists(&self) -> Result<bool> {
        let found: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(format!("{}jobs", self.opts.prefix))
        .fetch_one(&self.pool)
        .await
        .map_err(map)?;
        Ok(found > 0)
    }

    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        let text = spec.validated_json()?;
        let inserted = q(&self.sql.insert)
            .bind(&spec.queue)
            .bind(spec.priority)
            .bind(spec.gpus.map(i64::from))
            .bind(text)
            .bind(&spec.idempotency_key)
            .bind(i64::from(spec.attempts()))
            .bind(i64::from(spec.attempts()))
            .bind(spec.not_before.map(|t| t.0.saturating_mul(1000)))
            .execute(&self.pool)
            .await;
        match inserted {
            Ok(done) => Ok(Pushed::New(JobId::from(i64::try_from(done.last_insert_id()).unwrap_or(i64::MAX)))),
            Err(e) if is_duplicate(&e) && spec.idempotency_key.is_some() => {
                let row = q(&self.sql.by_key).bind(&spec.idempotency_key).fetch_one(&self.pool).await.map_err(map)?;
                let (id, stored): (i64, String) = (get(&row, "id")?, get(&row, "spec")?);
                rows::same_job(JobId::from(id), &JobSpec::from_stored_json(&stored)?, &spec)
            }
            Err(e) => Err(map(e)),
        }
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        Ok(self.reserve_many(req, 1).await?.pop())
    }

    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let leases = self.try_reserve(req, max).await?;
            if !leases.is_empty() {
                self.idle_polls.store(0, Ordering::Relaxed);
                return Ok(leases);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let idle = self.idle_polls.fetch_add(1, Ordering::Relaxed).min(8);
            let pause = (POLL_MIN * 2u32.pow(idle)).min(POLL_MAX).min(deadline - now);
            tokio::time::sleep(pause).await;
        }
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        let id = lease.id().as_i64()?;
        self.fenced(q(&self.sql.heartbeat).bind(micros(extend)), lease).await?;
        let row = q(&self.sql.cancel_flag)
            .bind(id)
            .bind(&lease.token)
            .fetch_optional(&self.pool)
            .await
            .map_err(map)?
            .ok_or_else(|| Error::lease_lost(lease.id()))?;
        let cancel: i8 = row.try_get(0).map_err(map)?;
        Ok(if cancel != 0 { Heartbeat::CancelRequested } else { Heartbeat::Extended })
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        let gpu_ids = serde_json::to_string(&info.gpu_ids).map_err(|e| Error::backend("mysql", e))?;
        self.fenced(q(&self.sql.started).bind(&info.commit).bind(gpu_ids), lease).await
    }

    /// The run's facts (`done.run`) go in the same statement; the output
    /// it carries (`done.log`) in the same transaction, which ends that
    /// finish together share (`queue/ends.rs`): a short run's end is one commit.
    async fn complete(&self, lease: &Lease, done: Completion) -> Result<()> {
        if done.log.is_empty() {
            let (result, commit, gpu_ids) = ends::facts(&done);
            let update = q(&self.sql.complete).bind(done.output_tail).bind(result).bind(commit).bind(gpu_ids);
            return self.fenced(update, lease).await;
        }
        let ends = {
            let mut slot = gpupool_core::sync::lock(&self.ends);
            match slot.as_ref().filter(|tx| !tx.is_closed()) {
                Some(tx) => tx.clone(),
                None => slot.insert(ends::start(self.pool.clone(), Arc::clone(&self.sql))).clone(),
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let stopped = || Error::Unavailable { backend: BACKEND, source: "the task that writes ends stopped".into() };
        ends.send(ends::End { lease: lease.clone(), done, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    fn completes_with_run(&self) -> bool {
        true
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let id = lease.id().as_i64()?;
        let sql = Arc::clone(&self.sql);
        let token = lease.token.clone();
        let spec = Arc::new(lease.job.spec.clone());
        self.in_tx(move |tx| {
            let (sql, token, failure, spec) = (Arc::clone(&sql), token.clone(), failure.clone(), Arc::clone(&spec));
            Box::pin(async move {
                let Some(row) = q(&sql.held).bind(id).bind(&token).fetch_optional(&mut **tx).await? else {
                    return Ok(Err(Error::lease_lost(id)));
                };
                let (attempt, limit): (i32, i32) = (row.try_get(0)?, row.try_get(1)?);
                let attempt_n = u32::try_from(attempt).unwrap_or(0);
                let requeue = failure.requeues(&spec, attempt_n, u32::try_from(limit).unwrap_or(0));
                let backoff = if requeue { spec.retry_delay(failure.kind, attempt_n) } else { None };
                q(&sql.insert_error)
                    .bind(id)
                    .bind(attempt)
                    .bind(failure.kind.as_str())
                    .bind(failure.exit_code)
                    .bind(failure.signal)
                    .bind(&failure.message)
                    .bind(&failure.output_tail)
                    .execute(&mut **tx)
                    .await?;
                let state = if requeue { JobState::Queued } else { JobState::Failed };
                q(&sql.fail_update)
                    .bind(state.as_str())
                    .bind(failure.exit_code)
                    .bind(failure.signal)
                    .bind(&failure.output_tail)
                    .bind(!requeue)
                    .bind(backoff.map(micros))
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                Ok(Ok(if requeue { FailOutcome::Requeued } else { FailOutcome::Failed }))
            })
        })
        .await
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        self.fenced(q(&self.sql.cancelled).bind(output_tail), lease).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.fenced(q(&self.sql.release), lease).await
    }

    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        self.fenced(q(&self.sql.defer).bind(micros(pause)), lease).await
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let n = id.as_i64()?;
        let sql = Arc::clone(&self.sql);
        self.in_tx(move |tx| {
            let sql = Arc::clone(&sql);
            Box::pin(async move {
                let state = match locked_state(&sql, tx, n).await? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                Ok(Ok(match state {
                    JobState::Queued => {
                        q(&sql.cancel_queued).bind(n).execute(&mut **tx).await?;
                        CancelOutcome::Cancelled
                    }
                    JobState::Running => {
                        q(&sql.cancel_running).bind(n).execute(&mut **tx).await?;
                        CancelOutcome::Requested
                    }
                    ended => CancelOutcome::AlreadyEnded(ended),
                }))
            })
        })
        .await
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let n = id.as_i64()?;
        let sql = Arc::clone(&self.sql);
        self.in_tx(move |tx| {
            let sql = Arc::clone(&sql);
            Box::pin(async move {
                let state = match locked_state(&sql, tx, n).await? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                if !matches!(state, JobState::Failed | JobState::Cancelled) {
                    return Ok(Err(Error::not_retryable(n, state)));
                }
                q(&sql.retry).bind(n).execute(&mut **tx).await?;
                Ok(Ok(()))
            })
        })
        .await
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        let n = id.as_i64()?;
        let text = serde_json::to_string(artifacts).map_err(|e| Error::backend(BACKEND, e))?;
        let done = q(&self.sql.set_artifacts)
            .bind(text)
            .bind(n)
            .bind(i64::from(artifacts.attempt))
            .execute(&self.pool)
            .await
            .map_err(map)?;
        // Zero rows: an unknown job, a later attempt's files, or (MySQL
        // counts changed rows) the same value again.
        if done.rows_affected() == 0
            && q(&self.sql.job_known).bind(n).fetch_optional(&self.pool).await.map_err(map)?.is_none()
        {
            return Err(Error::NotFound { id: id.to_string() });
        }
        Ok(())
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        let n = id.as_i64()?;
        let row = q(&self.sql.select_job)
            .bind(n)
            .fetch_optional(&self.pool)
            .await
            .map_err(map)?
            .ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        let mut r = record(&row)?;
        let rows = q(&self.sql.select_errors).bind(n).fetch_all(&self.pool).await.map_err(map)?;
        r.errors = rows.iter().map(attempt_error).collect::<Result<_>>()?;
        Ok(r)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        let shape = usize::from(filter.state.is_some()) + 2 * usize::from(filter.queue.is_some());
        let rows = q(&self.sql.list[shape])
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
            Some(id) => q(&self.sql.errors_of).bind(id.as_i64()?).bind(i64::from(limit)),
            None => q(&self.sql.errors_all).bind(i64::from(limit)),
        }
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

/// Pieces of [`gpupool_core::BLOB_PIECE_BYTES`] (under the default
/// `max_allowed_packet`), written in one transaction.
#[async_trait]
impl gpupool_core::Blobs for MysqlQueue {
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map)?;
        let pieces = gpupool_core::blob_pieces(bytes);
        for (n, piece) in pieces.into_iter().enumerate() {
            q(&self.sql.blob_put)
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
        let rows = q(&self.sql.blob_get).bind(hash).fetch_all(&self.pool).await.map_err(map)?;
        let pieces = rows.iter().map(|r| r.try_get::<Vec<u8>, _>(0)).collect::<std::result::Result<Vec<_>, _>>();
        let pieces = pieces.map_err(map)?;
        Ok((!pieces.is_empty()).then(|| pieces.concat()))
    }
}

#[async_trait]
impl WorkerRegistry for MysqlQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let text = serde_json::to_string(info).map_err(|e| Error::backend("mysql", e))?;
        q(&self.sql.worker_upsert).bind(&info.name).bind(text).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        q(&self.sql.worker_delete).bind(name).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let registered = q(&self.sql.workers).fetch_all(&self.pool).await.map_err(map)?;
        let mut now = Timestamp::now();
        let all = registered
            .iter()
            .map(|row| {
                let seen = Timestamp(get(row, "seen_ms")?);
                now = Timestamp(get(row, "now_ms")?); // the database's clock
                rows::worker_info(BACKEND, &get::<String>(row, "info")?, seen, now)
            })
            .collect::<Result<Vec<_>>>()?;
        let (shown, gone) = rows::split_gone(all, now);
        for w in gone {
            q(&self.sql.worker_gone).bind(&w.name).bind(w.seen_at.0).execute(&self.pool).await.map_err(map)?;
        }
        Ok(shown)
    }
}

impl gpupool_core::Connect for MysqlQueue {
    const SCHEMES: &'static [&'static str] = &crate::SCHEMES;

    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send {
        MysqlQueue::connect(url)
    }
}

#[cfg(test)]
mod tests {
    use gpupool_core::conformance;
    use gpupool_core::rows::ExpiredLease;

    use super::*;

    /// The sweep in `reserve_tx` writes what [`ExpiredLease`] says, for each
    /// branch of the rule: (worker, cancel requested, attempt, attempt limit).
    #[tokio::test]
    async fn expired_leases_end_as_the_core_rule_says() {
        let Some(base) = conformance::service_url("GPUPOOL_TEST_MYSQL_URL", "MySQL test", || None) else { return };
        let prefix = format!("t{}_expiry_", conformance::unique_suffix());
        let sep = if base.contains('?') { '&' } else { '?' };
        let q = MysqlQueue::connect(&format!("{base}{sep}prefix={prefix}")).await.unwrap();
        q.init().await.unwrap();
        let cases =
            [(Some("gpu1:7"), false, 1, 3), (None, false, 3, 3), (Some("gpu2:8"), true, 1, 3), (None, true, 3, 3)];
        let mut ids = Vec::new();
        for (worker, cancel, attempt, limit) in cases {
            let id = q.push(JobSpec::new("main", "train.py")).await.unwrap();
            let expire = format!(
                "UPDATE {prefix}jobs SET state = 'running', worker = ?, cancel_requested = ?, attempt = ?, \
                 attempt_limit = ?, lease_token = 'held', lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND \
                 WHERE id = ?"
            );
            sqlx::query(AssertSqlSafe(expire))
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
        let nothing_queued = ReserveRequest::new(conformance::unique_queue("expiry"));
        assert!(q.reserve_tx(&nothing_queued, true, 1).await.unwrap().unwrap().is_empty());
        for ((worker, cancel, attempt, limit), id) in cases.into_iter().zip(&ids) {
            let want = ExpiredLease::new(worker, cancel, attempt, limit);
            let rec = q.get(id).await.unwrap();
            let at = rec.errors.first().map_or(Timestamp(0), |e| e.at);
            let lost = rows::failed_attempt(&want.failure, id.clone(), attempt, at);
            assert_eq!((rec.state, rec.errors), (want.state, vec![lost]), "{worker:?} {cancel} {attempt}/{limit}");
        }
        q.drop_tables().await.unwrap();
    }
}
