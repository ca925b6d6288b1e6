//! The MySQL 8 / MariaDB ≥ 10.6 backend of gpupool: every GPU host points
//! its worker at one database.
//!
//! ```no_run
//! use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
//! use gpupool_mysql::MysqlQueue;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! let queue = MysqlQueue::connect("mysql://gpupool:secret@db:3306/pool").await?;
//! queue.init().await?; // `gpupool init`: create or migrate the tables, safe to repeat
//! queue.push(JobSpec::new("main", "train.py")).await?;
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("a queued job");
//! queue.complete(&lease, Completion::default()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//!
//! Tables are prefixed (`?prefix=`, default `gpupool_`, validated as
//! `[A-Za-z0-9_]{0,32}`), so that several pools can share a database:
//!
//! - `gpupool_jobs`: one row per job. `spec` is the pushed job as JSON text
//!   (LONGTEXT, not the JSON type, which would reorder args). `state` is one
//!   of `queued`, `running`, `succeeded`, `failed`, `cancelled`; `attempt`
//!   counts runs started; `attempt_limit` is `max_attempts`, raised by each
//!   retry. `lease_token` and `lease_expires_at` (DATETIME(6), UTC, the
//!   database's clock) fence the current holder; `cancel_requested` is set
//!   by `gpupool cancel` on a running job. Indexes: `jobs_reserve (queue,
//!   state, priority DESC, id)` for the reserve query, `jobs_lease (state,
//!   lease_expires_at)` for reclaiming expired leases, `jobs_state (state, id)`
//!   for listing, and a unique `idempotency_key`.
//! - `gpupool_job_errors`: one row per failed attempt (`kind` is `exit`,
//!   `signal`, `timeout`, `setup`, `ref`, `repo`, `lease_lost` or `oom`),
//!   indexed by `(job_id, id)`.
//! - `gpupool_schema_version`: applied migrations. `gpupool init` takes
//!   `GET_LOCK('gpupool.migrate.PREFIX')` so two hosts migrating at once
//!   take turns.
//!
//! ```sql
//! SELECT id, state, attempt, queue, worker, lease_expires_at FROM gpupool_jobs
//!  WHERE state = 'running' ORDER BY id DESC;
//! SELECT job_id, attempt, kind, message FROM gpupool_job_errors ORDER BY id DESC LIMIT 20;
//! ```
//!
//! # Load
//!
//! An idle worker waits in `reserve` calls of up to 1 s, polling with
//! backoff from 50 ms to 500 ms: one indexed, lock-free `SELECT EXISTS` per
//! served queue at the start of each call and at each poll, which comes to
//! about 3 statements a second per idle worker and queue (BENCHMARKS.md
//! measures it as `idle_worker_queries_per_s`), plus its registration every
//! heartbeat (10 s). A job pushed to an idle pool is picked up within about
//! half a second. A reserve that finds work runs one short transaction
//! (`FOR UPDATE SKIP LOCKED`, `UPDATE`, `COMMIT`) at READ COMMITTED; while
//! reserves keep finding work they skip the lock-free look and sweep
//! expired leases at most once a second.

mod error;
mod options;
mod queue;

pub use options::{DEFAULT_PREFIX, MysqlOptions, SCHEMES, valid_prefix};
pub use queue::MysqlQueue;
