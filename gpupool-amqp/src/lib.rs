//! The RabbitMQ backend of gpupool (RabbitMQ ≥ 3.10): RabbitMQ alone, no
//! second server, and safe for training runs that last hours.
//!
//! ```no_run
//! use gpupool_amqp::AmqpQueue;
//! use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! // Declares the ledger stream if it is missing, then replays it.
//! let queue = AmqpQueue::connect("amqp://guest:guest@127.0.0.1:5672/%2f?prefix=gpupool.").await?;
//! queue.push(JobSpec::new("main", "train.py")).await?;
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("a queued job");
//! queue.complete(&lease, Completion::default()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is declared
//!
//! One stream, `PREFIXledger` (prefix: `?prefix=`, default `gpupool.`;
//! retention: `?ledger_max_age=`, default `30D`, and `?ledger_max_bytes=`,
//! default 1 GiB). Nothing else: no exchange, no work queue.
//!
//! # How a job travels
//!
//! - **The ledger** holds every change to every job as an event; each process
//!   replays it from the first offset and folds it into the jobs' state.
//!   Listing, errors, ids (a job's id is the stream offset of its `Pushed`
//!   event), idempotency keys, which worker gets which job, and the verdict
//!   on every race come from that fold, so every process agrees on them.
//! - **A reserve** is a `Want` event (queues, GPUs, a lease token). The fold
//!   leases it the best queued job that fits (queue order, priority, age),
//!   or keeps it (30 s, renewed while the worker waits) and hands it the
//!   first fitting job queued later. A push thus reaches an idle worker in
//!   one event, two workers never contend for a job, and no delivery is
//!   held for a run, so RabbitMQ's `consumer_timeout` never fires.
//! - **Heartbeats** are events; every process notes by its own clock when it
//!   last saw a lease renewed. A reserving worker that sees one unrenewed
//!   past its length publishes `Reclaim`; the first one in the stream wins
//!   and records `lease_lost`. So a worker killed mid-run has its job run
//!   again within the lease plus about one second and a 250 ms grace.
//! - **Cancel** of a queued job ends it at once; of a running job sets a flag
//!   that its worker reads in its next heartbeat's verdict. **Retry** is an
//!   event.
//!
//! # Guarantees
//!
//! The stream is durable, events persistent, publishes confirmed. The hosts'
//! clocks should agree within a few seconds (a want's life is measured by
//! the clocks in the events).
//!
//! Reads (`get`, `list`, `errors`) first publish a `Sync` event and wait for
//! it, so they see everything published before them. A process replays the
//! ledger when it connects: within the retention, that is every job's whole
//! history.
//!
//! A want that may wait outlives the `reserve` call that made it, so a
//! program of your own that reserves with a wait and then stops reserving
//! should call `stop_reserving` with the worker name of its requests: a job
//! handed to its want meanwhile then goes back to the queue at once,
//! uncharged, where it would otherwise run again only after its lease runs
//! out, charged a `lease_lost` attempt. `gpupool worker` does this itself.

mod ledger;
mod options;
mod queue;

pub use options::{AmqpOptions, DEFAULT_PREFIX, SCHEMES};
pub use queue::AmqpQueue;
