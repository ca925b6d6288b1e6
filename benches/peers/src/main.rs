//! `apalis_bench`: apalis 0.7 on Redis or MySQL, push then drain N no-op jobs.
//!
//! ```text
//! apalis_bench --backend redis|mysql --url URL --jobs N --concurrency C
//!              [--poll-ms MS] [--buffer B] [--timeout-s S]
//! ```
//!
//! Prints exactly one line on stdout:
//!
//! ```text
//! PEER peer=apalis broker=<redis|mysql> jobs=N concurrency=C poll_ms=P push_per_s=X drain_per_s=Y done_rows=D
//! ```
//!
//! (`done_rows`: the jobs apalis recorded done, read back after the drain.) Everything else (settings, errors, extra timings) goes to stderr.
//! `scripts/bench-peers.sh` builds and runs it next to `celery_bench.py`.
//!
//! # What is measured
//!
//! - push: one producer calls `Storage::push` N times, one after another, each
//!   awaited (a Lua script per job on Redis, one `INSERT` per job on MySQL);
//!   `push_per_s = N / elapsed`.
//! - drain: one worker (one `WorkerBuilder`, one `Monitor`) with
//!   `.concurrency(C)` runs a handler that bumps a shared counter. The clock
//!   runs from just before the monitor is first polled until every job is
//!   recorded done (the N-th `Done` row on MySQL, the N-th member of the done
//!   set on Redis: apalis acks after the handler returns, and on MySQL in
//!   batches), polled every 5 ms; `drain_per_s = N / elapsed`.
//!   (celery_bench.py starts its clock at the first task's start instead,
//!   because a Celery worker takes seconds to boot; apalis starts in-process,
//!   so the difference here is at most one poll interval. The rate from the
//!   first handler's start is printed on stderr too.)
//!
//! # Settings (the safest apalis 0.7 offers for long jobs, else its defaults)
//!
//! - Acknowledgement: apalis 0.7 storages ack through the backend's `AckLayer`,
//!   which wraps the handler, so a job is marked done only after the handler
//!   returned; there is no ack-before-run mode to avoid. A job whose worker
//!   dies stays claimed ("inflight" on Redis, `Running` on MySQL) until
//!   apalis re-enqueues orphans (`reenqueue_orphaned_after`, default 5 min,
//!   kept), based on the worker's keep-alive (default 30 s, kept).
//! - `buffer_size` (jobs fetched per poll, default 10) = C: a poll never claims
//!   more jobs than the worker can run at once, so jobs parked behind a long
//!   run are bounded by one batch. apalis has no "fetch only what is free"
//!   mode; `--buffer 1` is the strict variant (then nothing waits claimed, but
//!   the drain is capped at one job per poll interval).
//! - `poll_interval` (`--poll-ms`, default here 100 ms, apalis' default).
//!   Both backends fetch at most `buffer_size` jobs per tick (Redis: an
//!   interval stream; MySQL: a sleep before each fetch, and acks are flushed
//!   in `buffer_size` chunks with the same sleep), so the drain is capped near
//!   `buffer_size / poll_interval` = 10 x C jobs/s at the default.
//!   `scripts/bench-peers.sh` runs 10 ms (the setting its targets are
//!   measured against) and 1 ms (apalis' fastest here; each poll is a query
//!   or a script call, idle or not).
//! - Retries, timeouts, tracing layers: none (not needed by a no-op job).
//!
//! # Isolation
//!
//! - Redis: a fresh namespace `peers-bench-<pid>-<nanos>` (all apalis keys are
//!   `<namespace>:...`), deleted at the end with `SCAN MATCH <namespace>*` +
//!   `DEL`.
//! - MySQL: the database in the URL is made if missing; apalis' tables
//!   (`APALIS_MYSQL_TABLES`: its migrations with a collation MariaDB has),
//!   then `DELETE FROM jobs` before pushing so old runs do not interfere, and
//!   the same fresh namespace as `job_type`. This run's `jobs` and `workers`
//!   rows are deleted at the end.
//!
//! # API checked against (apalis 0.7.x)
//!
//! - docs.rs/apalis (crate example: `WorkerBuilder::new(..).concurrency(2)
//!   .data(0usize).backend(storage).build_fn(f)`, handler
//!   `async fn(job, Data<usize>) -> Result<(), Error>`), docs.rs/crate/apalis/
//!   latest/features (0.7.4: default `tracing`, `limit` gates `concurrency`),
//!   apalis `src/layers/mod.rs` (`WorkerBuilderExt::concurrency`) and
//!   `src/lib.rs` (`prelude`: Data, Error, Event, Monitor, Storage,
//!   WorkerBuilder, WorkerBuilderExt, WorkerFactoryFn).
//! - docs.rs/crate/apalis-core/0.7.4/source/src/builder.rs (`new`, `data`,
//!   `backend`, `build_fn`), .../src/monitor/mod.rs (`Monitor::new`,
//!   `register`, `on_event`, `run_with_signal(S: Future<Output =
//!   io::Result<()>>)`), .../src/storage/mod.rs (`Storage::push`), apalis-core
//!   `src/worker/mod.rs` (readiness + `CallAllUnordered`, `Worker::inner`/`id`).
//! - docs.rs/apalis-redis/latest/apalis_redis/all.html (0.7.4: `connect`,
//!   `Config`, `ConnectionManager`, `RedisStorage`; depends on redis ^0.32),
//!   docs.rs/crate/apalis-redis/latest/features (`tokio-comp` default),
//!   apalis-redis `src/storage.rs` (`connect`, `Config::default`,
//!   `set_namespace`, `set_buffer_size`, `set_poll_interval`, defaults 100 ms /
//!   10 / 30 s / 300 s, `RedisStorage::new_with_config`, keys `<ns>:active`,
//!   `<ns>:inflight:<worker>`, ..., the poll loop).
//! - docs.rs/crate/apalis-sql/0.7.3/source/Cargo.toml and
//!   docs.rs/crate/apalis-sql/latest/features (0.7.4: `mysql`, `migrate`,
//!   `tokio-comp`), docs.rs/apalis-sql/latest/apalis_sql/all.html
//!   (`mysql::MysqlStorage`, `mysql::MySqlPool`, `Config`), apalis-sql
//!   `src/lib.rs` (`Config::new`, setters, defaults 100 ms / 10 / 30 s, `pub
//!   use sqlx`), `src/mysql.rs` (`MysqlStorage::setup(&pool)`,
//!   `new_with_config(pool, config)`, table `jobs`, column `job_type`, status
//!   string `'Done'`, the fetch and ack loops) and
//!   `migrations/mysql/20220530084123_jobs_workers.sql` (`workers.id` is
//!   `varchar(36)`, `jobs.lock_by` references it `ON DELETE CASCADE`).

use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use apalis::prelude::{Data, Error, Event, Monitor, Storage, WorkerBuilder, WorkerBuilderExt, WorkerFactoryFn};
use apalis_redis::{Config as RedisConfig, ConnectionManager, RedisStorage};
use apalis_sql::mysql::{MySqlPool, MysqlStorage};
use apalis_sql::sqlx;
use apalis_sql::Config as SqlConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

/// Errors are reported once, on stderr, by `main`.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// apalis' default poll interval, for `apalis_redis::Config` and
/// `apalis_sql::Config` alike (both `Duration::from_millis(100)`).
const APALIS_DEFAULT_POLL_MS: u64 = 100;

/// How long the monitor gets to shut down gracefully once told to stop
/// before it is dropped (which cancels everything it still runs).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// MySQL: how long to wait, after the N-th handler returned, for apalis'
/// batched ack loop to mark every row `Done`.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// The job: a no-op carrying its index, so the payload is not empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    i: usize,
}

/// State shared by the handler (through apalis `Data`) and the driver.
#[derive(Debug)]
struct Shared {
    /// Number of jobs the run expects; the handler that completes this one
    /// stamps `finished_at` and wakes the driver.
    target: usize,
    /// Handler completions so far.
    done: AtomicUsize,
    /// When the first handler started (stderr only).
    first_started: OnceLock<Instant>,
    /// When the `target`-th handler completed.
    finished_at: OnceLock<Instant>,
    /// Woken once, by the `target`-th completion. `notify_one` stores a permit
    /// when nobody waits yet, so the wake-up cannot be lost.
    all_done: Notify,
}

impl Shared {
    fn new(target: usize) -> Self {
        Self {
            target,
            done: AtomicUsize::new(0),
            first_started: OnceLock::new(),
            finished_at: OnceLock::new(),
            all_done: Notify::new(),
        }
    }
}

/// The handler: count the completion and return. apalis acks the job (marks
/// it done in the backend) after this returns `Ok`.
async fn handle(job: Noop, shared: Data<Arc<Shared>>) -> Result<(), Error> {
    shared.first_started.get_or_init(Instant::now);
    std::hint::black_box(job.i);
    let done = shared.done.fetch_add(1, Ordering::AcqRel) + 1;
    if done == shared.target {
        let _ = shared.finished_at.set(Instant::now());
        shared.all_done.notify_one();
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    Mysql,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Mysql => "mysql",
        }
    }
}

/// Command line (see the module docs).
#[derive(Debug)]
struct Args {
    backend: Backend,
    url: String,
    jobs: usize,
    concurrency: usize,
    /// apalis `poll_interval`.
    poll: Duration,
    /// apalis `buffer_size` (jobs fetched per poll).
    buffer: usize,
    /// Upper bound on the drain, so a stuck run fails instead of hanging.
    timeout: Duration,
}

const USAGE: &str = "usage: apalis_bench --backend redis|mysql --url URL --jobs N --concurrency C \
                     [--poll-ms MS (default 100)] [--buffer B (default C)] [--timeout-s S (default 600)]";

fn parse_args() -> Result<Args, BoxError> {
    let mut backend = None;
    let mut url = None;
    let mut jobs = None;
    let mut concurrency = None;
    let mut poll_ms = APALIS_DEFAULT_POLL_MS;
    let mut buffer = None;
    let mut timeout_s: u64 = 600;

    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let mut value = || -> Result<String, BoxError> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => Err(format!("{flag} needs a value\n{USAGE}").into()),
            }
        };
        match flag.as_str() {
            "--backend" => {
                backend = Some(match value()?.as_str() {
                    "redis" => Backend::Redis,
                    "mysql" => Backend::Mysql,
                    other => return Err(format!("unknown backend {other:?}\n{USAGE}").into()),
                })
            }
            "--url" => url = Some(value()?),
            "--jobs" => jobs = Some(value()?.parse::<usize>()?),
            "--concurrency" => concurrency = Some(value()?.parse::<usize>()?),
            "--poll-ms" => poll_ms = value()?.parse()?,
            "--buffer" => buffer = Some(value()?.parse::<usize>()?),
            "--timeout-s" => timeout_s = value()?.parse()?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }

    let missing = |name: &str| -> BoxError { format!("missing {name}\n{USAGE}").into() };
    let jobs = jobs.ok_or_else(|| missing("--jobs"))?;
    let concurrency = concurrency.ok_or_else(|| missing("--concurrency"))?;
    if jobs == 0 || concurrency == 0 {
        return Err(format!("--jobs and --concurrency must be at least 1\n{USAGE}").into());
    }
    let buffer = buffer.unwrap_or(concurrency);
    if buffer == 0 || poll_ms == 0 {
        return Err(format!("--buffer and --poll-ms must be at least 1\n{USAGE}").into());
    }
    Ok(Args {
        backend: backend.ok_or_else(|| missing("--backend"))?,
        url: url.ok_or_else(|| missing("--url"))?,
        jobs,
        concurrency,
        poll: Duration::from_millis(poll_ms),
        buffer,
        timeout: Duration::from_secs(timeout_s),
    })
}

/// A namespace no earlier run used: `peers-bench-<pid>-<nanos>`. No glob
/// characters, so `SCAN MATCH <namespace>*` matches exactly this run's keys.
fn fresh_namespace() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("peers-bench-{}-{nanos}", std::process::id())
}

/// The worker's name. MySQL stores it in `workers.id`, a `varchar(36)`, so it
/// must stay short.
fn worker_name() -> String {
    format!("apalis-bench-{}", std::process::id())
}

/// What a drain measured.
#[derive(Debug)]
struct Drain<T> {
    /// Monitor start to the N-th completion.
    elapsed: Duration,
    /// First handler start to the N-th completion (stderr only).
    from_first_start: Option<Duration>,
    /// Whatever `after_done` returned.
    extra: T,
}

/// Run `monitor` until `shared.target` handlers have completed, then run
/// `after_done` (still polling the monitor, so its background loops, such as
/// MySQL's batched acks, keep going), then stop the monitor gracefully, and
/// drop it if it does not stop within [`SHUTDOWN_GRACE`].
///
/// The monitor runs on this task, as in apalis' own examples
/// (`Monitor::new()...run().await` in `main`).
async fn drive<A: Future>(
    monitor: Monitor,
    shared: &Shared,
    timeout: Duration,
    after_done: A,
) -> Result<Drain<A::Output>, BoxError> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let started = Instant::now();
    let run = monitor.run_with_signal(async move {
        // A dropped sender also means "stop".
        let _ = stop_rx.await;
        Ok::<(), std::io::Error>(())
    });
    tokio::pin!(run);

    let controller = async {
        tokio::time::timeout(timeout, shared.all_done.notified()).await.map_err(|_| {
            format!(
                "drain did not finish within {} s ({} of {} jobs done)",
                timeout.as_secs(),
                shared.done.load(Ordering::Acquire),
                shared.target
            )
        })?;
        let finished = shared.finished_at.get().copied().unwrap_or_else(Instant::now);
        let from_first_start = shared.first_started.get().map(|t| finished.duration_since(*t));
        let extra = after_done.await;
        Ok::<_, BoxError>(Drain { elapsed: finished.duration_since(started), from_first_start, extra })
    };

    // `run` must not be polled again once it has completed.
    let mut monitor_exited = false;
    let outcome: Result<Drain<A::Output>, BoxError> = tokio::select! {
        res = &mut run => {
            monitor_exited = true;
            Err(format!(
                "the apalis monitor exited before the drain finished ({res:?}, {} of {} jobs done)",
                shared.done.load(Ordering::Acquire),
                shared.target
            )
            .into())
        }
        out = controller => out,
    };

    // Graceful stop: the monitor stops fetching, waits for running handlers,
    // and returns. If it does not, dropping `run` (on return) cancels it.
    if !monitor_exited {
        let _ = stop_tx.send(());
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut run).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("apalis_bench: monitor shutdown error: {e}"),
            Err(_) => {
                eprintln!("apalis_bench: monitor did not stop within {} s; dropping it", SHUTDOWN_GRACE.as_secs())
            }
        }
    }
    outcome
}

/// A monitor that reports worker errors (backend poll/ack failures) on
/// stderr; otherwise a broken connection would only show as a timeout.
fn monitor() -> Monitor {
    Monitor::new().on_event(|e| {
        if let Event::Error(err) = e.inner() {
            eprintln!("apalis_bench: worker {}: {err}", e.id());
        }
    })
}

/// Push `jobs` no-ops one by one; returns jobs per second.
async fn push_all<S>(storage: &mut S, jobs: usize) -> Result<f64, BoxError>
where
    S: Storage<Job = Noop>,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let t = Instant::now();
    for i in 0..jobs {
        storage.push(Noop { i }).await?;
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

/// The result line's numbers.
#[derive(Debug)]
struct Outcome {
    push_per_s: f64,
    drain_per_s: f64,
    /// MySQL only.
    done_rows: Option<i64>,
}

async fn run_redis(args: &Args) -> Result<Outcome, BoxError> {
    let namespace = fresh_namespace();
    let conn = apalis_redis::connect(args.url.as_str()).await?;
    // Kept for the cleanup; a ConnectionManager clone shares the connection.
    let cleanup_conn = conn.clone();

    let config =
        RedisConfig::default().set_namespace(&namespace).set_buffer_size(args.buffer).set_poll_interval(args.poll);
    let done_set = config.done_jobs_set();
    let storage: RedisStorage<Noop> = RedisStorage::new_with_config(conn, config);

    let result = async {
        let push_per_s = push_all(&mut storage.clone(), args.jobs).await?;

        let shared = Arc::new(Shared::new(args.jobs));
        let worker = WorkerBuilder::new(worker_name())
            .concurrency(args.concurrency)
            .data(shared.clone())
            .backend(storage)
            .build_fn(handle);
        // As on MySQL, drained means recorded: the acks (`done_job.lua`,
        // which moves a job to the done set) run after the handlers.
        let wait_acks = wait_done_set(cleanup_conn.clone(), &done_set, args.jobs, ACK_WAIT);
        let drain = drive(monitor().register(worker), &shared, args.timeout, wait_acks).await?;
        recorded(args, push_per_s, drain, "jobs in the done set")
    }
    .await;

    // Clean up even when the run failed.
    match redis_delete_namespace(cleanup_conn, &namespace).await {
        Ok(n) => eprintln!("apalis_bench: deleted {n} redis keys under {namespace}"),
        Err(e) => eprintln!("apalis_bench: could not delete redis keys under {namespace}: {e}"),
    }
    result
}

/// Polls `ZCARD` of apalis' done set every 5 ms until it holds `jobs` or
/// `limit` passes; returns the count and the time waited.
async fn wait_done_set(
    mut conn: ConnectionManager,
    key: &str,
    jobs: usize,
    limit: Duration,
) -> Result<(i64, Duration), redis::RedisError> {
    let t = Instant::now();
    loop {
        let done: i64 = redis::cmd("ZCARD").arg(key).query_async(&mut conn).await?;
        if usize::try_from(done).unwrap_or(0) >= jobs || t.elapsed() >= limit {
            return Ok((done, t.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `SCAN MATCH <namespace>*` + `DEL` until the cursor returns to 0; returns
/// how many keys were deleted.
async fn redis_delete_namespace(mut conn: ConnectionManager, namespace: &str) -> Result<u64, redis::RedisError> {
    let pattern = format!("{namespace}*");
    let mut cursor: u64 = 0;
    let mut deleted: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
    }
}

/// apalis-sql 0.7.4's three MySQL migrations, as one schema, with one
/// change: its collation `utf8mb4_0900_ai_ci` exists on MySQL 8 only, so
/// `MysqlStorage::setup` fails on MariaDB; these use `utf8mb4_unicode_ci`.
/// Same tables, columns, keys and indexes otherwise.
const APALIS_MYSQL_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS workers (
        id varchar(36) NOT NULL,
        worker_type varchar(200) NOT NULL,
        storage_name varchar(200) NOT NULL,
        layers VARCHAR(1000) NOT NULL DEFAULT '',
        last_seen datetime DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
        PRIMARY KEY (id),
        INDEX Idx (id), INDEX WTIdx (worker_type), INDEX LSIdx (last_seen)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci",
    "CREATE TABLE IF NOT EXISTS jobs (
        job JSON NOT NULL,
        id varchar(36) NOT NULL,
        job_type varchar(200) NOT NULL,
        status varchar(20) NOT NULL DEFAULT 'Pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 25,
        run_at datetime DEFAULT CURRENT_TIMESTAMP,
        last_error varchar(1000) DEFAULT NULL,
        lock_at datetime DEFAULT NULL,
        lock_by varchar(36) DEFAULT NULL,
        done_at datetime DEFAULT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (id),
        FOREIGN KEY (lock_by) REFERENCES workers(id) ON DELETE CASCADE,
        INDEX job_id (id), INDEX job_status (status), INDEX LIdx (lock_by), INDEX JTIdx (job_type),
        INDEX JRTIdx (run_at), INDEX LCATIdx (lock_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci",
];

/// A pool on `url`'s database, made first if it does not exist (apalis'
/// tables are unprefixed, so they get a database of their own).
async fn connect_mysql(url: &str) -> Result<MySqlPool, BoxError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, db) = base.rsplit_once('/').ok_or("mysql URL without a database")?;
    if !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || db.is_empty() {
        return Err(format!("mysql database name {db:?}: letters, digits and _ only").into());
    }
    let admin_url = if query.is_empty() { server.to_owned() } else { format!("{server}?{query}") };
    let admin = MySqlPool::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE IF NOT EXISTS `{db}`")).execute(&admin).await?;
    admin.close().await;
    Ok(MySqlPool::connect(url).await?)
}

async fn run_mysql(args: &Args) -> Result<Outcome, BoxError> {
    let namespace = fresh_namespace();
    let worker = worker_name();
    let pool = connect_mysql(&args.url).await?;

    // apalis' tables, then an empty `jobs` table so rows left by earlier
    // runs cannot be fetched or counted.
    for ddl in APALIS_MYSQL_TABLES {
        sqlx::query(ddl).execute(&pool).await?;
    }
    sqlx::query("DELETE FROM jobs").execute(&pool).await?;

    let config = SqlConfig::new(&namespace).set_buffer_size(args.buffer).set_poll_interval(args.poll);
    let storage: MysqlStorage<Noop> = MysqlStorage::new_with_config(pool.clone(), config);

    let result = async {
        let push_per_s = push_all(&mut storage.clone(), args.jobs).await?;

        let shared = Arc::new(Shared::new(args.jobs));
        let built = WorkerBuilder::new(&worker)
            .concurrency(args.concurrency)
            .data(shared.clone())
            .backend(storage)
            .build_fn(handle);
        // Once every handler has returned, wait (bounded) for apalis' ack loop,
        // which writes `Done` in batches of `buffer_size` with a poll-interval
        // sleep between batches, before stopping the monitor; stopping first
        // would drop acks still queued and undercount `done_rows`.
        let wait_acks = wait_done_rows(&pool, &namespace, args.jobs, ACK_WAIT);
        let drain = drive(monitor().register(built), &shared, args.timeout, wait_acks).await?;
        recorded(args, push_per_s, drain, "rows Done")
    }
    .await;

    // Clean up this run's rows even when it failed. Jobs first: deleting the
    // worker row cascades to jobs it still has locked.
    let cleanup = async {
        sqlx::query("DELETE FROM jobs WHERE job_type = ?").bind(&namespace).execute(&pool).await?;
        sqlx::query("DELETE FROM workers WHERE id = ?").bind(&worker).execute(&pool).await?;
        Ok::<_, sqlx::Error>(())
    };
    if let Err(e) = cleanup.await {
        eprintln!("apalis_bench: could not delete this run's mysql rows: {e}");
    }
    pool.close().await;
    result
}

/// Poll `SELECT COUNT(*) ... status = 'Done'` for this run's namespace every
/// 5 ms until it reaches `jobs` or `limit` passes; returns the count and the
/// time waited.
async fn wait_done_rows(
    pool: &MySqlPool,
    namespace: &str,
    jobs: usize,
    limit: Duration,
) -> Result<(i64, Duration), sqlx::Error> {
    let t = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE job_type = ? AND status = 'Done'")
            .bind(namespace)
            .fetch_one(pool)
            .await?;
        if usize::try_from(done).unwrap_or(0) >= jobs || t.elapsed() >= limit {
            return Ok((done, t.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn per_second(jobs: usize, elapsed: Duration) -> f64 {
    jobs as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// Extra timings on stderr, for reading the result line.
/// The outcome of a drain that ended when the backend had recorded every
/// job done: `drain.extra` holds how many it recorded and how long after
/// the last handler returned. Drained means recorded, so that wait counts
/// (within the 5 ms poll of `wait_done_rows`/`wait_done_set`).
fn recorded<E: Into<BoxError>>(
    args: &Args,
    push_per_s: f64,
    drain: Drain<Result<(i64, Duration), E>>,
    what: &str,
) -> Result<Outcome, BoxError> {
    report_drain(args, &drain);
    let (done, ack_wait) = drain.extra.map_err(Into::into)?;
    eprintln!(
        "apalis_bench: {done} of {} {what} {:.3} s after the last handler returned",
        args.jobs,
        ack_wait.as_secs_f64()
    );
    Ok(Outcome { push_per_s, drain_per_s: per_second(args.jobs, drain.elapsed + ack_wait), done_rows: Some(done) })
}

fn report_drain<T>(args: &Args, drain: &Drain<T>) {
    let first =
        drain.from_first_start.map(|d| format!("{:.1}", per_second(args.jobs, d))).unwrap_or_else(|| "n/a".into());
    eprintln!(
        "apalis_bench: drain {:.3} s from monitor start ({:.1}/s); from first handler start {first}/s",
        drain.elapsed.as_secs_f64(),
        per_second(args.jobs, drain.elapsed),
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "apalis_bench: apalis 0.7 {} jobs={} concurrency={} buffer_size={} poll_interval={} ms",
        args.backend.name(),
        args.jobs,
        args.concurrency,
        args.buffer,
        args.poll.as_millis()
    );

    let outcome = match args.backend {
        Backend::Redis => run_redis(&args).await,
        Backend::Mysql => run_mysql(&args).await,
    };
    match outcome {
        Ok(o) => {
            let mut line = format!(
                "PEER peer=apalis broker={} jobs={} concurrency={} poll_ms={} push_per_s={:.1} drain_per_s={:.1}",
                args.backend.name(),
                args.jobs,
                args.concurrency,
                args.poll.as_millis(),
                o.push_per_s,
                o.drain_per_s
            );
            if let Some(done) = o.done_rows {
                line.push_str(&format!(" done_rows={done}"));
            }
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apalis_bench: {} run failed: {e}", args.backend.name());
            ExitCode::FAILURE
        }
    }
}
