//! Every SQL statement, with the table prefix filled in once at connect
//! time, and the functions that read rows back into core's types.
//!
//! Values always travel as binds (`$1`, `$2`, …). The only text pasted into
//! SQL is the prefix, which [`valid_prefix`](crate::valid_prefix) allows to
//! hold nothing but `[A-Za-z0-9_]`; that is why building the strings with
//! [`sqlx::AssertSqlSafe`] is sound. Times are the database's clock
//! (`now()`), read back as milliseconds since the epoch.

use std::sync::Arc;

use gpupool_core::{AttemptError, Error, FailureKind, JobId, JobRecord, JobSpec, Result, Timestamp};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Postgres, Row};

use crate::error::{BACKEND, map};

/// The schema `gpupool init` runs; `{p}` is the prefix.
pub(crate) const SCHEMA: &str = include_str!("schema.sql");

/// A TIMESTAMPTZ column as milliseconds since the epoch.
macro_rules! ms {
    ($col:literal) => {
        concat!("(EXTRACT(EPOCH FROM ", $col, ") * 1000)::BIGINT")
    };
}

/// The columns [`record`] reads.
const JOB: &str = concat!(
    "id, state, attempt, attempt_limit, spec, commit_sha, worker, gpu_ids, exit_code, term_signal, output_tail, result, ",
    "artifacts, cancel_requested, lease_token, ",
    ms!("created_at"),
    " AS created_ms, ",
    ms!("started_at"),
    " AS started_ms, ",
    ms!("finished_at"),
    " AS finished_ms, ",
    ms!("lease_expires_at"),
    " AS expires_ms"
);

/// The columns [`attempt_error`] reads.
const ERROR: &str =
    concat!("job_id, attempt, kind, exit_code, term_signal, message, output_tail, ", ms!("at"), " AS at_ms");

/// The statements, prefixed.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) drop_tables: Arc<str>,
    pub(crate) insert: Arc<str>,
    pub(crate) by_key: Arc<str>,
    pub(crate) expired: Arc<str>,
    pub(crate) candidate: Arc<str>,
    pub(crate) lease: Arc<str>,
    pub(crate) heartbeat: Arc<str>,
    pub(crate) started: Arc<str>,
    pub(crate) complete: Arc<str>,
    pub(crate) lock_held: Arc<str>,
    pub(crate) insert_error: Arc<str>,
    pub(crate) end_attempt: Arc<str>,
    pub(crate) cancelled: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) state_of: Arc<str>,
    pub(crate) cancel_queued: Arc<str>,
    pub(crate) cancel_running: Arc<str>,
    pub(crate) retry: Arc<str>,
    pub(crate) job: Arc<str>,
    pub(crate) job_errors: Arc<str>,
    pub(crate) list: Arc<str>,
    pub(crate) errors: Arc<str>,
    pub(crate) worker_upsert: Arc<str>,
    pub(crate) worker_delete: Arc<str>,
    pub(crate) worker_gone: Arc<str>,
    pub(crate) workers: Arc<str>,
    pub(crate) artifacts: Arc<str>,
}

impl Sql {
    /// Every statement for tables named `{prefix}jobs`, … (`prefix` is valid).
    pub(crate) fn new(prefix: &str) -> Sql {
        let s = |t: &str| -> Arc<str> { t.replace("{job}", JOB).replace("{err}", ERROR).replace("{p}", prefix).into() };
        let end_lease = "lease_token = NULL, lease_expires_at = NULL";
        Sql {
            schema: SCHEMA.replace("{p}", prefix),
            drop_tables: s("DROP TABLE IF EXISTS {p}job_errors, {p}jobs, {p}workers"),
            insert: s("INSERT INTO {p}jobs (queue, state, priority, gpus, spec, idempotency_key, max_attempts, \
                       attempt_limit) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $6) \
                       ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"),
            by_key: s("SELECT id, spec FROM {p}jobs WHERE idempotency_key = $1"),
            expired: s("SELECT id, attempt, attempt_limit, cancel_requested, worker FROM {p}jobs \
                        WHERE state = 'running' AND lease_expires_at < now() \
                        ORDER BY lease_expires_at LIMIT 20 FOR UPDATE SKIP LOCKED"),
            candidate: s("SELECT id FROM {p}jobs WHERE queue = $1 AND state = 'queued' AND COALESCE(gpus, $2) <= $3 \
                          ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED"),
            lease: s("UPDATE {p}jobs SET state = 'running', attempt = attempt + 1, \
                      lease_token = gen_random_uuid()::TEXT, lease_expires_at = now() + make_interval(secs => $2), \
                      worker = $3, started_at = now(), finished_at = NULL, exit_code = NULL, term_signal = NULL, \
                      gpu_ids = NULL WHERE id = $1 RETURNING {job}"),
            heartbeat: s("UPDATE {p}jobs SET lease_expires_at = now() + make_interval(secs => $3) \
                          WHERE id = $1 AND lease_token = $2 RETURNING cancel_requested"),
            started: s("UPDATE {p}jobs SET commit_sha = $3, gpu_ids = $4 WHERE id = $1 AND lease_token = $2"),
            complete: s(&format!(
                "UPDATE {{p}}jobs SET state = 'succeeded', exit_code = 0, output_tail = $3, result = $4, \
                 finished_at = now(), {end_lease} WHERE id = $1 AND lease_token = $2"
            )),
            lock_held: s(
                "SELECT id, attempt, attempt_limit FROM {p}jobs WHERE id = $1 AND lease_token = $2 FOR UPDATE",
            ),
            insert_error: s("INSERT INTO {p}job_errors (job_id, attempt, kind, exit_code, term_signal, message, \
                             output_tail) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            end_attempt: s(&format!(
                "UPDATE {{p}}jobs SET state = $2, exit_code = $3, term_signal = $4, \
                 output_tail = COALESCE($5, output_tail), \
                 finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END, {end_lease} WHERE id = $1"
            )),
            cancelled: s(&format!(
                "UPDATE {{p}}jobs SET state = 'cancelled', output_tail = $3, finished_at = now(), {end_lease} \
                 WHERE id = $1 AND lease_token = $2"
            )),
            release: s(&format!(
                "UPDATE {{p}}jobs SET state = 'queued', attempt = attempt - 1, {end_lease} \
                 WHERE id = $1 AND lease_token = $2 RETURNING queue"
            )),
            state_of: s("SELECT state FROM {p}jobs WHERE id = $1 FOR UPDATE"),
            cancel_queued: s("UPDATE {p}jobs SET state = 'cancelled', finished_at = now() WHERE id = $1"),
            cancel_running: s("UPDATE {p}jobs SET cancel_requested = TRUE WHERE id = $1"),
            retry: s("UPDATE {p}jobs SET state = 'queued', cancel_requested = FALSE, finished_at = NULL, \
                      attempt_limit = attempt + max_attempts \
                      WHERE id = $1 AND state IN ('failed', 'cancelled') RETURNING queue"),
            job: s("SELECT {job} FROM {p}jobs WHERE id = $1"),
            job_errors: s("SELECT {err} FROM {p}job_errors WHERE job_id = $1 ORDER BY id"),
            list: s("SELECT {job} FROM {p}jobs WHERE ($1::TEXT IS NULL OR state = $1) \
                     AND ($2::TEXT IS NULL OR queue = $2) ORDER BY id DESC LIMIT $3 OFFSET $4"),
            errors: s("SELECT {err} FROM {p}job_errors WHERE ($1::BIGINT IS NULL OR job_id = $1) \
                       ORDER BY id DESC LIMIT $2"),
            worker_upsert: s("INSERT INTO {p}workers (name, info, seen_at) VALUES ($1, $2, now()) \
                              ON CONFLICT (name) DO UPDATE SET info = EXCLUDED.info, seen_at = EXCLUDED.seen_at"),
            worker_delete: s("DELETE FROM {p}workers WHERE name = $1"),
            worker_gone: s(concat!("DELETE FROM {p}workers WHERE name = $1 AND ", ms!("seen_at"), " = $2")),
            workers: s(concat!(
                "SELECT info, ",
                ms!("seen_at"),
                " AS seen_ms, ",
                ms!("now()"),
                " AS now_ms FROM {p}workers ORDER BY name"
            )),
            // Artifacts::replaces, in SQL.
            artifacts: s("UPDATE {p}jobs SET artifacts = $2 WHERE id = $1 \
                          AND (artifacts IS NULL OR (artifacts::jsonb ->> 'attempt')::BIGINT <= $3) RETURNING id"),
        }
    }
}

/// A query from one of the prepared strings.
pub(crate) fn q<'q>(sql: &Arc<str>) -> Query<'q, Postgres, PgArguments> {
    // Built in `Sql::new` from constants and a validated prefix.
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

/// One column of a row.
pub(crate) fn get<'r, T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>>(row: &'r PgRow, col: &str) -> Result<T> {
    row.try_get(col).map_err(map)
}

/// An INTEGER column that holds a count or an index.
pub(crate) fn to_u32(v: i32) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::backend(BACKEND, format!("{v} is out of range in the jobs table")))
}

/// A row of [`JOB`] columns as a record (without its errors).
pub(crate) fn record(row: &PgRow) -> Result<JobRecord> {
    let spec = JobSpec::from_stored_json(&get::<String>(row, "spec")?)?;
    let mut r = JobRecord::new(JobId::from(get::<i64>(row, "id")?), spec, Timestamp(get(row, "created_ms")?));
    r.state = get::<String>(row, "state")?.parse()?;
    r.attempt = to_u32(get(row, "attempt")?)?;
    r.attempt_limit = to_u32(get(row, "attempt_limit")?)?;
    r.commit = get(row, "commit_sha")?;
    r.worker = get(row, "worker")?;
    r.gpu_ids =
        get::<Option<Vec<i32>>>(row, "gpu_ids")?.map(|ids| ids.into_iter().map(to_u32).collect()).transpose()?;
    r.exit_code = get(row, "exit_code")?;
    r.signal = get(row, "term_signal")?;
    r.output_tail = get(row, "output_tail")?;
    r.result = get::<Option<String>>(row, "result")?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| Error::backend(BACKEND, format!("stored result is not JSON: {e}")))?;
    r.artifacts = get::<Option<String>>(row, "artifacts")?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| Error::backend(BACKEND, format!("stored artifacts do not read: {e}")))?;
    r.cancel_requested = get(row, "cancel_requested")?;
    r.started_at = get::<Option<i64>>(row, "started_ms")?.map(Timestamp);
    r.finished_at = get::<Option<i64>>(row, "finished_ms")?.map(Timestamp);
    Ok(r)
}

/// A row of [`ERROR`] columns.
pub(crate) fn attempt_error(row: &PgRow) -> Result<AttemptError> {
    Ok(AttemptError {
        job_id: JobId::from(get::<i64>(row, "job_id")?),
        attempt: to_u32(get(row, "attempt")?)?,
        kind: get::<String>(row, "kind")?.parse::<FailureKind>()?,
        exit_code: get(row, "exit_code")?,
        signal: get(row, "term_signal")?,
        message: get(row, "message")?,
        output_tail: get(row, "output_tail")?,
        at: Timestamp(get(row, "at_ms")?),
    })
}
