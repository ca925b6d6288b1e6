//! A gpupool queue on PostgreSQL (≥ 13), written as a team would write its
//! own backend: one type, [`PgQueue`], that implements
//! [`Queue`](gpupool_core::Queue), [`WorkerRegistry`](gpupool_core::WorkerRegistry)
//! and [`Connect`](gpupool_core::Connect), passes the conformance suite, and
//! joins the `gpupool` command through `gpupool::Registry::add` (see
//! `src/main.rs`). `docs/custom-backend.md` walks through it step by step.
//!
//! ```no_run
//! use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
//! use gpupool_postgres_example::PgQueue;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! let queue = PgQueue::connect("postgres://gpupool:secret@db:5432/pool?prefix=gpupool_").await?;
//! queue.init().await?; // `gpupool init`: create the tables, safe to repeat
//! let id = queue.push(JobSpec::new("main", "train.py").arg("lr", 0.1)).await?;
//!
//! // What a worker does: lease the job, run it, report.
//! if let Some(lease) = queue.reserve(&ReserveRequest::new("default")).await? {
//!     assert_eq!(lease.id(), &id);
//!     queue.complete(&lease, Completion::default()).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//!
//! - `options.rs`: the URL, `postgres://user:pass@host:5432/db?prefix=gpupool_`
//!   (also `max_connections`, `connect_timeout`; other parameters such as
//!   `sslmode` go to the driver).
//! - `schema.sql`: the tables `{prefix}jobs`, `{prefix}job_errors` and
//!   `{prefix}workers`, and an index per query that must stay fast.
//! - `sql.rs`: every statement, built once per prefix, and row decoding.
//! - `queue.rs`: the [`Queue`](gpupool_core::Queue) methods; `workers.rs`:
//!   the worker registry.
//! - `wakeup.rs`: `LISTEN`/`NOTIFY`, so a waiting `reserve` starts a pushed
//!   job at once.
//! - `error.rs`: which driver errors are worth retrying.
//!
//! To look at a pool by hand:
//!
//! ```sql
//! SELECT id, state, attempt, queue, worker, lease_expires_at FROM gpupool_jobs ORDER BY id DESC LIMIT 20;
//! SELECT job_id, attempt, kind, message FROM gpupool_job_errors ORDER BY id DESC LIMIT 20;
//! ```

mod error;
mod options;
mod queue;
mod sql;
mod wakeup;
mod workers;

pub use options::{DEFAULT_PREFIX, PgOptions, SCHEMES, valid_prefix};
pub use queue::PgQueue;
