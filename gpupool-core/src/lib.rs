//! The contract of gpupool: the job model, the [`Queue`] trait every backend
//! implements, the [`Workspace`], [`Runner`] and [`GpuInventory`] traits a
//! worker runs jobs through, the in-memory queue, and (feature
//! `conformance`) the suite every backend must pass.
//!
//! This crate has no native dependencies (no git, no NVML, no OpenSSL): a
//! backend or a custom workspace depends on it alone. The worker that ties
//! the traits together is `gpupool-worker`; the crate most programs use is
//! the facade `gpupool`, which adds `connect(url)` over every backend.
//!
//! ```
//! use gpupool_core::{message, JobState, MemoryQueue, Queue, ReserveRequest, Completion};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! // The original tool's message.json, as plain JSON.
//! let jobs = message::parse_jobs(r#"{"branch": "develop", "train_path": "./train.py",
//!                                     "seed": "42", "resize": "128 96"}"#)?;
//! let queue = MemoryQueue::new();
//! let id = queue.push(jobs[0].clone()).await?;
//!
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("the job");
//! let argv = gpupool_core::argv::build_argv(&["python3".into()], &lease.job.spec.entrypoint,
//!                                           &lease.job.spec.args, 0);
//! assert_eq!(argv, ["python3", "train.py", "--seed", "42", "--resize", "128", "96"]);
//! queue.complete(&lease, Completion::default()).await?;
//! assert_eq!(queue.get(&id).await?.state, JobState::Succeeded);
//! # Ok(())
//! # }
//! ```

pub mod after;
pub mod argv;
pub mod artifacts;
mod error;
pub mod gpu;
mod job;
mod memory;
pub mod message;
mod queue;
pub mod redact;
pub mod rows;
pub mod runner;
pub mod sweep;
pub mod sync;
pub mod url;
pub mod workspace;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use artifacts::{ArtifactFile, Artifacts};
pub use error::{BoxError, Error, Result};
pub use gpu::GpuInventory;
pub use job::{
    After, Args, AttemptError, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, FailureKind, JobId, JobRecord, JobSpec, JobState,
    MAX_BACKOFF, MAX_SNAPSHOT_BYTES, RetryPolicy, SnapshotRef, Timestamp,
};
pub use memory::MemoryQueue;
pub use queue::{
    BLOB_PIECE_BYTES, Batch, Blobs, CancelOutcome, Capabilities, Completion, Connect, FailOutcome, Failure,
    GONE_AFTER_HEARTBEATS, Heartbeat, LOG_CAP_BYTES, Lease, ListFilter, LogPage, Progress, Pushed, Queue,
    ReserveRequest, RunInfo, RunLogs, RunningJob, Sweep, WorkerInfo, WorkerRegistry, all_jobs, blob_pieces,
    default_worker_name,
};
pub use runner::Runner;
pub use workspace::Workspace;

/// The attribute every implementation of this crate's async traits puts on
/// its `impl` block (re-exported from `async-trait`, so a backend needs no
/// dependency of its own for it).
pub use async_trait::async_trait;
