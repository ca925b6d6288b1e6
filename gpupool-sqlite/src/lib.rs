//! The embedded default backend of gpupool: one SQLite file, zero setup,
//! safe for several worker processes on one host.
//!
//! ```
//! use gpupool_core::{JobSpec, Queue, ReserveRequest, Completion};
//! use gpupool_sqlite::SqliteQueue;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let url = format!("sqlite://{}/queue.db", dir.path().display());
//! let queue = SqliteQueue::connect(&url).await?; // file and schema made if missing
//! let id = queue.push(JobSpec::new("main", "train.py").arg("epochs", 3)).await?;
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("the job");
//! queue.complete(&lease, Completion::default()).await?;
//! # let _ = id;
//! # Ok(())
//! # }
//! ```
//!
//! # How it stores jobs
//!
//! WAL journal, `synchronous=NORMAL` (a crashed process loses nothing; a
//! power cut can lose the last commits), a busy timeout (default 10 s), and
//! migrations embedded in the binary, versioned with `PRAGMA user_version`
//! and applied in one `BEGIN IMMEDIATE` transaction, so two processes opening
//! a new file at once do not both apply them.
//!
//! - `jobs`: one row per job. `spec` is the pushed job as JSON text;
//!   `state`, `queue`, `priority` and `gpus` are columns for the reserve
//!   query (index `jobs_reserve` on `queue, state, priority DESC, id`).
//!   `lease_token` and `lease_expires_at` (Unix ms) fence the holder.
//!   `attempt_limit` is `max_attempts`, raised by each retry.
//! - `job_errors`: one row per failed attempt, with its `kind`.
//!
//! ```sh
//! sqlite3 .gpupool/queue.db "SELECT id, state, attempt, queue FROM jobs ORDER BY id DESC LIMIT 10"
//! ```
//!
//! Time is this host's clock, which every process on the host shares.

mod error;
mod options;
mod queue;

pub use options::{SCHEMES, SqliteOptions};
pub use queue::SqliteQueue;
