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
//! - `PREFIXledger`, a stream (prefix: `?prefix=`, default `gpupool.`;
//!   retention: `?ledger_max_age=`, default `30D`, `?ledger_max_bytes=`,
//!   default 1 GiB, and `?ledger_segment_bytes=`, RabbitMQ's 500 MB by
//!   default);
//! - `PREFIXsnapshots`, a stream of snapshots of the fold (the same
//!   retention, at least 256 MiB);
//! - `PREFIXsnapshot.writer`, a classic queue with a single active
//!   consumer: the election of the process that writes snapshots;
//! - `PREFIXlogs`, a stream of every job's shipped output, pieces tagged
//!   by job (retention: `?log_max_age=`, default `7D`, and
//!   `?log_max_bytes=`, default 8 GiB). One stream, not one a job: a stream
//!   holds files open on the broker while it exists, so a stream a run
//!   would run a broker out of files after a few hundred short runs.
//!
//! No exchange, no work queue.
//!
//! # How a job travels
//!
//! - **The ledger** holds every change to every job as an event; each process
//!   folds it into the jobs' state, starting from the newest snapshot.
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
//! - **Grouped messages.** Events a process publishes while its last
//!   message is on its way to the broker (the ends of runs that finish
//!   together, a worker's wants, heartbeats) go out together in the next
//!   one, a JSON array of their envelopes applied in order at its offset:
//!   the broker's work is by message. A push is always a message of its
//!   own, since its offset is its job's id. A gpupool older than this
//!   skips a message of several events, so its fold goes wrong (and the
//!   snapshots it writes, if elected): upgrade every process of a pool
//!   together.
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
//! it, so they see everything published before them.
//!
//! # Snapshots and memory
//!
//! A process that connects loads the newest snapshot of the fold and
//! follows the ledger from the event after it, so it needs neither the
//! ledger's whole history nor the time to replay it, and retention can cut
//! the ledger under a job leased for days. A snapshot holds everything a
//! verdict depends on: a fold loaded from it gives every later event the
//! verdict the writer's fold gives. One process writes them: every process
//! that reserves joins an election (a classic queue with a single active
//! consumer, which RabbitMQ hands to another process when the writer
//! goes), and the writer snapshots when the ledger has grown by as much as
//! the last snapshot's size (at least 1 MiB, at most a quarter of
//! `ledger_max_bytes`) or a quarter of `ledger_max_age` has passed. Two
//! writers at once (a moment of failover) are harmless: every fold's
//! snapshot at an offset is the same. Keep the ledger's retention well
//! above what the pool writes in that time; a process that finds events
//! cut between the snapshot and the ledger says so in its log.
//!
//! The fold keeps every live job (queued or running) and the newest 10,000
//! finished ones, and of those no more than 64 MiB of outputs, errors and
//! results. An older finished job is forgotten by every process at the
//! same event: `get`, `jobs`, `cancel` and `retry` answer that it is not
//! found, and its idempotency key may be used again; its shipped log goes
//! with the log stream's retention, and the artifacts its runs stored stay
//! in their store. Event
//! nonces (for retried publishes) are kept 2 minutes.
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
