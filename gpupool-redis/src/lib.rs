//! The Redis Streams backend of gpupool (Redis ≥ 6.2, standalone).
//!
//! ```no_run
//! use gpupool_core::{Completion, JobSpec, Queue, ReserveRequest};
//! use gpupool_redis::RedisQueue;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool_core::Result<()> {
//! let queue = RedisQueue::connect("redis://127.0.0.1:6379/0?prefix=gpupool:").await?;
//! queue.init().await?; // checks the server; streams are made on first use
//! queue.push(JobSpec::new("main", "train.py")).await?;
//! let lease = queue.reserve(&ReserveRequest::new("default")).await?.expect("a queued job");
//! queue.complete(&lease, Completion::default()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Keys (all under the prefix, default `gpupool:`)
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `stream:QUEUE` | stream, group `gpupool` | one entry per queued job: `job` = id, and for a pushed job (a first attempt) `spec` = the JSON spec |
//! | `job:ID` | hash | the job: `spec` (JSON), `state`, `attempt`, `token`, `expires`, `entry`, … |
//! | `seq` | string | the id sequence (`INCR`); ids are dense and jobs are never deleted, so listing all jobs counts down from it |
//! | `queue:QUEUE`, `state:failed`, `state:cancelled` | sorted sets | ids, for listing newest first |
//! | `queues` | set | every queue pushed to or served, for listing queued and running jobs |
//! | `parked:QUEUE` | sorted set | jobs waiting for a worker with enough GPUs (score: GPUs) |
//! | `errors:ID`, `errors` | lists | failed attempts of a job; the newest 10,000 of all |
//! | `idem:KEY` | string | idempotency key → id |
//!
//! # How a job travels
//!
//! Queued, running and succeeded jobs have no index of their own, so push,
//! reserve and complete touch none: `jobs --state queued` reads the
//! streams' unread entries (last in line first, then parked jobs), `--state
//! running` the group's pending entries, and `--state succeeded` counts the
//! ids down, keeping succeeded ones, so it is slow behind a long backlog of
//! newer queued jobs (BENCHMARKS.md). The two states that must be found
//! among many, `failed` and `cancelled`, keep theirs.
//!
//! `push` is one Lua script: hash, queue index and `XADD`. `reserve` first, at
//! most once a second, pages through each queue's entries idle for a
//! second or more with `XPENDING … IDLE` (all of them, 100 at a time), and
//! for each one idle for its own lease (its consumer's name carries the
//! lease; heartbeats reset the idle time) or for `reclaim_idle`
//! (`?reclaim_idle=`, default 30 s), a script checks the lease. An expired one
//! (its holder stopped heartbeating: the `expires` field, Redis's clock) is
//! recorded as `lease_lost` and re-leased to the caller with `XCLAIM`, or
//! ends `failed`/`cancelled`; one whose lease still holds stays its
//! holder's. (The pass does not use `XAUTOCLAIM`, which DESIGN.md names: it
//! would move an entry before anything can look at its lease, and lose the
//! entry's consumer, which a bare-read lease below needs.) Then, per queue
//! in order, a bare `XREADGROUP … COUNT 1` reads the next entry. With
//! nothing there it blocks on all the queues (`BLOCK`, on a connection of
//! its own), so a pushed job is picked up at once and an idle worker sends
//! nothing but that one read per second. A worker with several free slots
//! on a host without GPUs (`reserve_many`) reads the entries for the slots
//! left after its first lease in one `XREADGROUP … COUNT`; a job among them
//! that needs GPUs is parked for a host with enough.
//!
//! An entry `push` wrote carries the spec and is a first attempt, and that
//! read is its whole reserve: one command, no script. The lease is the
//! entry pending under the reader's consumer name,
//! `WORKER@INSTANCE/LEASE_MS`, and its token names the entry, a nonce new
//! for each delivery and that consumer: if a restart of Redis loses a
//! delivery and the entry is handed out again, only the holder it is
//! pending under (the first to call, if one consumer got it twice) can
//! record the lease, and the other's calls are refused. The job's
//! hash still says `queued` until the holder's first call (started,
//! heartbeat, complete, fail, release) records the lease there: attempt,
//! holder, the delivery time as its start. Until then, `get` and `jobs`
//! show the job running (its entry is pending), a cancel asks the holder,
//! and the reclaim pass treats the lease as lasting the `LEASE_MS` its
//! consumer's name gives, from the delivery. A later attempt's entry
//! carries the id only and is leased by a script that reads its earlier
//! attempts. Every path that cancels a queued job or gives it a new entry
//! deletes the old one, so a delivered entry is never stale.
//!
//! While the job runs its entry stays pending: the heartbeat script checks
//! the lease token, extends `expires` and resets the entry's idle time with
//! `XCLAIM … JUSTID` (which does not count a delivery). Complete and
//! cancelled check the token and `XACK` the entry; fail, cancel and release
//! also `XDEL` it and, for a retry or a release, `XADD` a new one, all in
//! one script. Acknowledged entries are deleted in bulk by the
//! once-a-second pass (`XTRIM MINID` up to the oldest pending entry), which
//! costs the server less than an `XDEL` per job; an entry stays until every
//! older one is done, so a stream holds at most the entries pushed since
//! its oldest running job started (tens of bytes each). A failed attempt
//! goes back to the queue at once: there are no delayed retries, so no
//! periodic mover to wait for.
//!
//! # Priorities
//!
//! Not supported: a stream is first in, first out, and one stream per
//! priority level would make every reserve a scan over levels. The
//! capability is reported as off, the conformance suite checks FIFO order,
//! and `gpupool push` warns when a job sets `priority` on this backend. Use
//! queues for urgency instead: `gpupool worker --queues urgent,default`.
//!
//! # GPU fitting
//!
//! A stream cannot filter by size, so `reserve` may return a job needing
//! more GPUs than the caller has free. The worker then holds it (heartbeating)
//! and reserves nothing smaller until enough GPUs are free, so big jobs are
//! not starved by a stream of small ones.
//!
//! # What survives a Redis restart
//!
//! | persistence | after a crash or restart |
//! | --- | --- |
//! | none | nothing: every job, stream and record is gone |
//! | RDB snapshots | the state of the last snapshot: jobs pushed or finished since are lost or run again |
//! | AOF `everysec` | all but about the last second: a completion in that second is lost and the job runs again |
//! | AOF `always` | everything acknowledged; a job whose completion was in flight runs again |
//!
//! Each script is one write to the AOF, so a restart never finds a job half
//! moved. A job whose lease was running when Redis went down is reclaimed
//! by the reclaim pass once its lease expires, if its worker does not come
//! back to finish it.
//!
//! # Upgrading from an older gpupool
//!
//! From a gpupool built before commit `362b1c0` (the bare-read lease above):
//! stop every older worker before starting a new one on the same Redis. An
//! older worker's reclaim pass does not know a lease that is only a pending
//! entry: it would acknowledge the entry and leave its job queued with
//! nothing in line. A job an older gpupool sent back to its queue, still
//! waiting there, has an entry with the spec: its worker is told attempt 1,
//! while the job's record counts the attempts right. Keys `state:queued`,
//! `state:running` and `state:succeeded` left by an older gpupool are not
//! read and can be deleted.

mod error;
mod options;
mod queue;

pub use options::{DEFAULT_PREFIX, RedisOptions, SCHEMES};
pub use queue::RedisQueue;
