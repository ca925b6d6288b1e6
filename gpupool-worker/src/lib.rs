//! The gpupool worker: the runtime that runs jobs from any
//! [`Queue`](gpupool_core::Queue) on this host.
//!
//! [`Worker`] ties four traits of `gpupool-core` together and this crate
//! gives the default implementation of three of them:
//!
//! | trait | default | what it does |
//! | --- | --- | --- |
//! | [`Queue`](gpupool_core::Queue) | (a backend crate) | where jobs come from |
//! | [`Workspace`](gpupool_core::Workspace) | [`GitWorkspace`] | a checkout at the job's exact commit, from a cached mirror |
//! | [`Runner`](gpupool_core::Runner) | [`ProcessRunner`] | the process tree: argv, no shell, log, timeout, kill |
//! | [`GpuInventory`](gpupool_core::GpuInventory) | the config's `gpus` list; [`NvmlInventory`] through [`inventory`] | the host's GPUs and how busy they are |
//!
//! ```
//! use std::sync::Arc;
//! use gpupool_core::MemoryQueue;
//! use gpupool_core::gpu::GpuSelection;
//! use gpupool_worker::{Worker, WorkerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! # let data_dir = std::env::temp_dir().join("gpupool-worker-doc");
//! let mut cfg = WorkerConfig::new(&data_dir); // mirrors, checkouts, logs
//! cfg.repo = Some("https://github.com/team/model.git".into());
//! cfg.burst = true; // exit once the queue is empty
//! let inventory = gpupool_worker::inventory(&GpuSelection::Auto)?; // NVML; CPU-only without a driver
//! let worker = Worker::builder(Arc::new(MemoryQueue::new()), cfg).inventory(inventory).build();
//! let summary = worker.run(gpupool_worker::CancellationToken::new()).await?;
//! println!("ran {} job(s)", summary.reserved);
//! # Ok(())
//! # }
//! ```
//!
//! Nothing here reads a terminal: a program that wants the worker to ask
//! for git credentials gives it a [`CredentialPrompt`].

mod git;
pub mod host;
mod journal;
mod live;
mod nvml;
mod outputs;
mod process;
pub mod snapshot;
pub mod store;
pub mod supervisor;
mod uploads;
mod worker;

#[cfg(feature = "testing")]
pub mod testing;

pub use git::{CredentialPrompt, Credentials, GitWorkspace, mirror_name};
pub use nvml::{NvmlInventory, Placement, inventory, resolve};
pub use outputs::job_outputs;
pub use process::ProcessRunner;
pub use store::ArtifactStore;
pub use worker::{Worker, WorkerBuilder, WorkerConfig, WorkerSummary, log_path};

/// How a worker is told to stop ([`Worker::run`]'s argument), re-exported so
/// that a program needs no `tokio-util` of its own.
pub use tokio_util::sync::CancellationToken;
