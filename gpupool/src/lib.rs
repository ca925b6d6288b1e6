//! gpupool turns a fleet of GPU servers into one training pool fed by a job
//! queue: push training runs (a git branch or commit, a train script,
//! hyperparameters), and every GPU server running a worker pulls the next
//! run, checks out exactly that code, trains on the GPUs it was given, and
//! reports success or a readable error.
//!
//! This is the facade: it re-exports the contract ([`gpupool_core`]: the
//! job model and the [`Queue`], [`Workspace`], [`Runner`] and
//! [`GpuInventory`] traits), the runtime ([`gpupool_worker`]: [`Worker`] and
//! its default parts), and opens any backend by URL through [`connect`] or
//! a [`Registry`] that custom backends join.
//!
//! | feature | backend | URL |
//! | --- | --- | --- |
//! | `sqlite` (default) | [`sqlite`] | `sqlite://.gpupool/queue.db` |
//! | `mysql` | `mysql` | `mysql://user:pass@host:3306/db` |
//! | `redis` | `redis` | `redis://host:6379/0` |
//! | `amqp` | `amqp` | `amqp://user:pass@host:5672/%2f` |
//! | (always) | [`MemoryQueue`] | `memory://` |
//!
//! ```
//! use gpupool::{Completion, JobSpec, JobState, ReserveRequest};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("gpupool-doc-{}", std::process::id()));
//! # let url = format!("sqlite://{}/queue.db", dir.display());
//! // let url = "sqlite://.gpupool/queue.db";
//! let queue = gpupool::connect(&url).await?;
//! queue.init().await?;
//! let id = queue.push(JobSpec::new("main", "train.py").arg("lr", 0.001)).await?;
//!
//! // What a worker does, by hand: lease the job, run it, report.
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("the job");
//! queue.complete(&lease, Completion::default()).await?;
//! assert_eq!(queue.get(&id).await?.state, JobState::Succeeded);
//! # drop(queue);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(())
//! # }
//! ```
//!
//! A whole worker is [`Worker::builder(queue, WorkerConfig::new(data_dir))`](Worker::builder),
//! given this host's GPUs with `.inventory(gpupool::inventory(&GpuSelection::Auto)?)`
//! (NVML; CPU-only without a driver), then `.build().run(shutdown)`;
//! `examples/worker.rs` in the repository is one in about 50 lines.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod registry;

pub use gpupool_core::*;
pub use gpupool_worker::{
    CancellationToken, CredentialPrompt, Credentials, GitWorkspace, NvmlInventory, ProcessRunner, Worker,
    WorkerBuilder, WorkerConfig, WorkerSummary, inventory,
};
pub use registry::{Registry, connect};

/// The contract crate, whole.
pub use gpupool_core;
/// The runtime crate, whole: also `gpupool::worker::inventory` and the
/// rest of what the worker is built from.
pub use gpupool_worker as worker;

/// The embedded SQLite backend (feature `sqlite`).
#[cfg(feature = "sqlite")]
pub use gpupool_sqlite as sqlite;

/// The MySQL / MariaDB backend (feature `mysql`).
#[cfg(feature = "mysql")]
pub use gpupool_mysql as mysql;

/// The Redis Streams backend (feature `redis`).
#[cfg(feature = "redis")]
pub use gpupool_redis as redis;

/// The RabbitMQ backend (feature `amqp`).
#[cfg(feature = "amqp")]
pub use gpupool_amqp as amqp;
