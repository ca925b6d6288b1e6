//! [`PgQueue`]: the [`Queue`] on PostgreSQL, and how it opens from a URL
//! ([`Connect`]).
//!
//! `reserve` is one short transaction: end the leases that expired (each a
//! `lease_lost` attempt), `SELECT … FOR UPDATE SKIP LOCKED` the best queued
//! job that fits, `UPDATE` that row with a fresh lease token and
//! `attempt + 1`, commit. No row lock is held while a job runs. Every later
//! call about the job is fenced by `WHERE id = $1 AND lease_token = $2`:
//! no row means the lease was lost. The SQL itself is in [`crate::sql`].

use std::sync::Arc;
use std::time::Duration;

use gpupool_core::rows::ExpiredLease;
use gpupool_core::{
    AttemptError, CancelOutcome, Capabilities, Completion, Connect, Error, FailOutcome, Failure, Heartbeat, JobId,
    JobRecord, JobSpec, JobState, Lease, ListFilter, Pushed, Queue, ReserveRequest, Result, RunInfo, Timestamp,
    WorkerRegistry, async_trait,
};
use sqlx::postgres::{PgArguments, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, PgConnection, PgExecutor, Postgres};

use crate::error::{BACKEND, describe, lost, map};
use crate::options::PgOptions;
use crate::sql::{Sql, attempt_error, get, q, record, to_u32};
use crate::wakeup::Wakeup;

/// The longest a waiting `reserve` goes without looking again when no
/// NOTIFY comes (an expired lease sends none).
const POLL: Duration = Duration::from_millis(500);

/// A gpupool queue in a PostgreSQL database, shared by any number of hosts.
/// Clones share one connection pool.
#[derive(Debug, Clone)]
pub struct PgQueue {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<Sql>,
    opts: Arc<PgOptions>,
    wakeup: Arc<Wakeup>,
}

impl PgQueue {
    /// Connects to the database a `postgres://` URL names. Creates no
    /// tables: run [`Queue::init`] (`gpupool init`) once.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(PgOptions::from_url(url)?).await
    }

    /// Connects with parsed options; fails within the connect timeout with
    /// one line naming `host:port` and the cause.
    pub async fn open(opts: PgOptions) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.connect_timeout)
            .connect_with(opts.connect.clone())
            .await
            .map_err(|e| {
                let cause = match e {
                    sqlx::Error::PoolTimedOut => {
                        format!("no connection within {} s; is the server running?", opts.connect_timeout.as_secs())
                    }
                    e => describe(&e),
                };
                let source = format!("cannot connect to PostgreSQL at {}: {cause}", opts.endpoint).into();
                Error::Unavailable { backend: BACKEND, source }
            })?;
        let sql = Arc::new(Sql::new(&opts.prefix));
        let wakeup = Arc::new(Wakeup::new(pool.clone(), format!("{}queued", opts.prefix)));
        Ok(PgQueue { pool, sql, opts: Arc::new(opts), wakeup })
    }

    /// The connection pool, for looking at the tables with plain SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Drops this prefix's tables, jobs and all (tests clean up with it).
    pub async fn drop_tables(&self) -> Result<()> {
        q(&self.sql.drop_tables).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    /// One look for work, in one transaction.
    async fn try_reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let mut tx = self.pool.begin().await.map_err(map)?;
        self.expire_leases(&mut tx).await?;
        for queue in &req.queues {
            let candidate = q(&self.sql.candidate)
                .bind(queue)
                .bind(i32::from(req.gpu_host)) // what an unset `gpus` needs: JobSpec::gpus_needed
                .bind(i64::from(req.gpu_limit()))
                .fetch_optional(&mut *tx)
                .await
                .map_err(map)?;
            let Some(candidate) = candidate else { continue };
            let id: i64 = get(&candidate, "id")?;
            let row = q(&self.sql.lease)
                .bind(id)
                .bind(req.lease.as_secs_f64())
                .bind(&req.worker)
                .fetch_one(&mut *tx)
                .await
                .map_err(map)?;
            let mut job = record(&row)?;
            if job.attempt > 1 {
                job.errors = self.job_errors(&mut *tx, id).await?;
            }
            let (token, expires_at) = (get(&row, "lease_token")?, Timestamp(get(&row, "expires_ms")?));
            tx.commit().await.map_err(map)?;
            return Ok(Some(Lease { job, token, expires_at }));
        }
        tx.commit().await.map_err(map)?;
        Ok(None)
    }

    /// Ends the leases that expired: each is a `lease_lost` attempt, and the
    /// job goes back to the queue, fails, or is cancelled if that was asked.
    async fn expire_leases(&self, tx: &mut PgConnection) -> Result<()> {
        for row in q(&self.sql.expired).fetch_all(&mut *tx).await.map_err(map)? {
            // The rule every backend applies: gpupool_core::rows::ExpiredLease.
            let attempt: i32 = get(&row, "attempt")?;
            let expired = ExpiredLease::new(
                get::<Option<String>>(&row, "worker")?.as_deref(),
                get(&row, "cancel_requested")?,
                to_u32(attempt)?,
                to_u32(get(&row, "attempt_limit")?)?,
            );
            self.end_attempt(tx, get(&row, "id")?, attempt, &expired.failure, None, expired.state).await?;
        }
        Ok(())
    }

    /// Records a failed attempt of a job this transaction holds, and moves
    /// the job to `state`. `tail` replaces the job's output tail if given.
    async fn end_attempt(
        &self,
        tx: &mut PgConnection,
        id: i64,
        attempt: i32,
        failure: &Failure,
        tail: Option<&str>,
        state: JobState,
    ) -> Result<()> {
        q(&self.sql.insert_error)
            .bind(id)
            .bind(attempt)
            .bind(failure.kind.as_str())
            .bind(failure.exit_code)
            .bind(failure.signal)
            .bind(&failure.message)
            .bind(&failure.output_tail)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        q(&self.sql.end_attempt)
            .bind(id)
            .bind(state.as_str())
            .bind(failure.exit_code)
            .bind(failure.signal)
            .bind(tail)
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        Ok(())
    }

    /// A job's failed attempts, oldest first.
    async fn job_errors(&self, conn: impl PgExecutor<'_>, id: i64) -> Result<Vec<AttemptError>> {
        let rows = q(&self.sql.job_errors).bind(id).fetch_all(conn).await.map_err(map)?;
        rows.iter().map(attempt_error).collect()
    }

    /// A job's state (its row locked, inside a transaction); `NotFound`.
    async fn state_of(&self, conn: impl PgExecutor<'_>, id: i64) -> Result<JobState> {
        let row = q(&self.sql.state_of).bind(id).fetch_optional(conn).await.map_err(map)?;
        get::<String>(&row.ok_or_else(|| Error::NotFound { id: id.to_string() })?, "state")?.parse()
    }

    /// Tells waiting reserves, in every process, that a job of `queue` is
    /// queued. Best effort: the change is already committed, and a waiter
    /// that misses this looks again within [`POLL`].
    async fn wake(&self, queue: &str) {
        let sent =
            sqlx::query("SELECT pg_notify($1, $2)").bind(self.wakeup.channel()).bind(queue).execute(&self.pool).await;
        if let Err(e) = sent {
            tracing::debug!("NOTIFY failed: {}", map(e));
        }
    }
}

/// A statement about a held job, with `$1` bound to its id and `$2` to the
/// lease token: once the lease is lost, it matches no row.
fn fenced<'q>(sql: &Arc<str>, lease: &'q Lease) -> Result<Query<'q, Postgres, PgArguments>> {
    Ok(q(sql).bind(lease.id().as_i64().map_err(|_| lost(lease))?).bind(&lease.token))
}

/// `Ok` if a fenced statement changed its row, else `LeaseLost`.
fn one_row(done: PgQueryResult, lease: &Lease) -> Result<()> {
    if done.rows_affected() == 1 { Ok(()) } else { Err(lost(lease)) }
}

#[async_trait]
impl Queue for PgQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_priority(true).with_gpu_filter(true)
    }

    async fn init(&self) -> Result<()> {
        // One transaction, and one host at a time: two `CREATE TABLE IF NOT
        // EXISTS` racing each other can still collide in the catalog.
        let mut tx = self.pool.begin().await.map_err(map)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("gpupool init {}", self.opts.prefix))
            .execute(&mut *tx)
            .await
            .map_err(map)?;
        sqlx::raw_sql(AssertSqlSafe(self.sql.schema.clone())).execute(&mut *tx).await.map_err(map)?;
        tx.commit().await.map_err(map)
    }

    async fn exists(&self) -> Result<bool> {
        // `to_regclass` is NULL for a table that is not there (on the
        // search path, as every statement here finds it).
        let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}jobs", self.opts.prefix))
            .fetch_one(&self.pool)
            .await
            .map_err(map)?;
        Ok(found)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(map)?;
        let Some(row) = inserted else {
            // ON CONFLICT DO NOTHING: this idempotency key was pushed before;
            // the same job gets its id back, another one an error.
            let row = q(&self.sql.by_key).bind(&spec.idempotency_key).fetch_one(&self.pool).await.map_err(map)?;
            let stored = JobSpec::from_stored_json(&get::<String>(&row, "spec")?)?;
            return gpupool_core::rows::same_job(JobId::from(get::<i64>(&row, "id")?), &stored, &spec);
        };
        self.wake(&spec.queue).await;
        Ok(Pushed::New(JobId::from(get::<i64>(&row, "id")?)))
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            // Registered before the look, so a NOTIFY during it still wakes us.
            let woken = (!req.wait.is_zero()).then(|| self.wakeup.notified());
            if let Some(lease) = self.try_reserve(req).await? {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            let Some(woken) = woken.filter(|_| now < deadline) else { return Ok(None) };
            let _ = tokio::time::timeout((deadline - now).min(POLL), woken).await;
        }
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        let row = fenced(&self.sql.heartbeat, lease)?.bind(extend.as_secs_f64()).fetch_optional(&self.pool).await;
        let row = row.map_err(map)?.ok_or_else(|| lost(lease))?;
        Ok(if get(&row, "cancel_requested")? { Heartbeat::CancelRequested } else { Heartbeat::Extended })
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        let gpu_ids: Vec<i64> = info.gpu_ids.iter().map(|&g| i64::from(g)).collect();
        let done = fenced(&self.sql.started, lease)?.bind(&info.commit).bind(gpu_ids).execute(&self.pool).await;
        one_row(done.map_err(map)?, lease)
    }

    async fn complete(&self, lease: &Lease, mut done: Completion) -> Result<()> {
        done.record_first(self, lease).await?;
        let result = done.result.map(|v| v.to_string());
        let done = fenced(&self.sql.complete, lease)?.bind(done.output_tail).bind(result).execute(&self.pool).await;
        one_row(done.map_err(map)?, lease)
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let mut tx = self.pool.begin().await.map_err(map)?;
        let row = fenced(&self.sql.lock_held, lease)?.fetch_optional(&mut *tx).await.map_err(map)?;
        let row = row.ok_or_else(|| lost(lease))?;
        let (id, attempt): (i64, i32) = (get(&row, "id")?, get(&row, "attempt")?);
        let requeue = failure.requeues(&lease.job.spec, to_u32(attempt)?, to_u32(get(&row, "attempt_limit")?)?);
        let state = if requeue { JobState::Queued } else { JobState::Failed };
        self.end_attempt(&mut tx, id, attempt, &failure, Some(&failure.output_tail), state).await?;
        tx.commit().await.map_err(map)?;
        if !requeue {
            return Ok(FailOutcome::Failed);
        }
        self.wake(&lease.job.spec.queue).await;
        Ok(FailOutcome::Requeued)
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        let done = fenced(&self.sql.cancelled, lease)?.bind(output_tail).execute(&self.pool).await;
        one_row(done.map_err(map)?, lease)
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let row = fenced(&self.sql.release, lease)?.fetch_optional(&self.pool).await.map_err(map)?;
        let row = row.ok_or_else(|| lost(lease))?;
        self.wake(&get::<String>(&row, "queue")?).await;
        Ok(())
    }

    async fn park(&self, lease: &Lease, _gpus: u32) -> Result<()> {
        // Reserve filters by GPUs: a smaller worker is never offered the job.
        self.release(lease).await
    }

    async fn stop_reserving(&self, _worker: &str) -> Result<()> {
        // Reserve keeps nothing between calls.
        Ok(())
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let n = id.as_i64()?;
        let mut tx = self.pool.begin().await.map_err(map)?;
        let outcome = match self.state_of(&mut *tx, n).await? {
            JobState::Queued => {
                q(&self.sql.cancel_queued).bind(n).execute(&mut *tx).await.map_err(map)?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                // Its worker sees this at the next heartbeat.
                q(&self.sql.cancel_running).bind(n).execute(&mut *tx).await.map_err(map)?;
                CancelOutcome::Requested
            }
            ended => CancelOutcome::AlreadyEnded(ended),
        };
        tx.commit().await.map_err(map)?;
        Ok(outcome)
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        let n = id.as_i64()?;
        match q(&self.sql.retry).bind(n).fetch_optional(&self.pool).await.map_err(map)? {
            Some(row) => {
                self.wake(&get::<String>(&row, "queue")?).await;
                Ok(())
            }
            None => Err(Error::not_retryable(id, self.state_of(&self.pool, n).await?)),
        }
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &gpupool_core::Artifacts) -> Result<()> {
        let n = id.as_i64()?;
        let text = serde_json::to_string(artifacts).map_err(|e| Error::backend(BACKEND, e))?;
        let set = q(&self.sql.artifacts)
            .bind(n)
            .bind(text)
            .bind(i64::from(artifacts.attempt))
            .fetch_optional(&self.pool)
            .await
            .map_err(map)?;
        if set.is_none() {
            self.state_of(&self.pool, n).await?; // NotFound, or a later attempt's are kept
        }
        Ok(())
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        let n = id.as_i64()?;
        let row = q(&self.sql.job).bind(n).fetch_optional(&self.pool).await.map_err(map)?;
        let mut job = record(&row.ok_or_else(|| Error::NotFound { id: id.to_string() })?)?;
        job.errors = self.job_errors(&self.pool, n).await?;
        Ok(job)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        let rows = q(&self.sql.list)
            .bind(filter.state.map(JobState::as_str))
            .bind(&filter.queue)
            .bind(i64::from(filter.limit))
            .bind(i64::try_from(filter.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        rows.iter().map(record).collect()
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        let rows = q(&self.sql.errors)
            .bind(job.map(JobId::as_i64).transpose()?)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map)?;
        rows.iter().map(attempt_error).collect()
    }

    fn worker_registry(&self) -> Option<&dyn WorkerRegistry> {
        Some(self) // see workers.rs
    }

    fn run_logs(&self) -> Option<&dyn gpupool_core::RunLogs> {
        None // not kept yet: `gpupool logs` reads the log where the job ran
    }
}

impl Connect for PgQueue {
    const SCHEMES: &'static [&'static str] = &crate::SCHEMES;

    fn connect(url: &str) -> impl std::future::Future<Output = Result<Self>> + Send {
        PgQueue::connect(url)
    }
}
