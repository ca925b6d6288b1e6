//! The job ledger: every change to a job is an [`Event`] in one RabbitMQ
//! stream, and a job's state is the fold of those events ([`State::apply`]).
//!
//! The stream gives every event one place in one order, so every process
//! that replays it reaches the same state and the same verdict on each
//! event: which job a [`Event::Want`] is handed, whether a `Completed` came
//! from the current holder, which `Reclaim` of an expired lease took
//! effect. A publisher learns its event's verdict when its own consumer
//! applies it ([`Outcome`]). Nothing here talks to the broker.
//!
//! **Handing out jobs.** A worker that wants a job publishes a `Want`
//! naming its queues, the GPUs it can give and a fresh lease token. If a
//! queued job fits, the fold leases the best one to it on the spot (queue
//! order, then priority, then the oldest). Otherwise, if the want may wait,
//! it is kept, oldest first, until its time is up (measured by the clocks
//! in the events, so every process expires it at the same event); every
//! job that becomes queued meanwhile goes to the oldest kept want it fits.
//! So the fold never leaves a fitting job queued while a want waits, two
//! workers never contend for one job, and a push reaches an idle worker in
//! the one event that queues it.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use gpupool_core::{AttemptError, Failure, FailureKind, JobId, JobRecord, JobSpec, JobState, Timestamp};
use serde::{Deserialize, Serialize};

/// One change, as stored in the ledger stream (JSON).
///
/// The `dispatch` fields belong to the earlier design, in which each
/// dispatch of a job was a message in a work queue; they are read so that
/// a ledger written then replays the same, and no longer written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Event {
    Pushed {
        spec: Box<JobSpec>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dispatch: Option<String>,
    },
    /// A worker asks for a job; see the module docs.
    Want {
        /// The lease token the job will be held by.
        token: String,
        /// The handle that published it ([`State::owner`]).
        owner: String,
        #[serde(flatten)]
        ask: Ask,
        /// How long the want may wait for a job; 0: only a job queued now.
        wait_ms: u64,
    },
    /// A waiting want is no longer wanted.
    Withdraw {
        token: String,
    },
    /// Earlier design: a worker took a work message for `dispatch`.
    Leased {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        dispatch: String,
        token: String,
        worker: String,
        lease_ms: u64,
    },
    Heartbeat {
        id: String,
        token: String,
        lease_ms: u64,
    },
    Started {
        id: String,
        token: String,
        commit: Option<String>,
        gpu_ids: Vec<u32>,
    },
    Completed {
        id: String,
        token: String,
        output_tail: String,
        result: Option<serde_json::Value>,
        /// Where the holder's shipped log ends (it shipped some).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_end: Option<u64>,
        /// Where its last piece is, when the end carries it (a mark).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mark: Option<(u64, i64)>,
        /// The run's facts, when no `Started` recorded them: (commit, GPUs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<(Option<String>, Vec<u32>)>,
    },
    Failed {
        id: String,
        token: String,
        kind: FailureKind,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: String,
        output_tail: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dispatch: Option<String>,
        /// Where the holder's shipped log ends (it shipped some).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_end: Option<u64>,
    },
    Cancelled {
        id: String,
        token: String,
        output_tail: String,
        /// Where the holder's shipped log ends (it shipped some).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_end: Option<u64>,
    },
    Released {
        id: String,
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dispatch: Option<String>,
        /// Where the holder's shipped log ends (it shipped some).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_end: Option<u64>,
    },
    /// The holder gives the job back uncharged, not to be handed out
    /// before `until` (ms since the epoch): the wait of `after`.
    Deferred {
        id: String,
        token: String,
        until: i64,
        /// Where the holder's shipped log ends (it shipped some).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_end: Option<u64>,
    },
    Cancel {
        id: String,
    },
    Retry {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dispatch: Option<String>,
    },
    Reclaim {
        id: String,
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dispatch: Option<String>,
    },
    Worker {
        info: Box<gpupool_core::WorkerInfo>,
    },
    WorkerGone {
        name: String,
    },
    Parked {
        id: String,
        token: String,
        gpus: u32,
    },
    /// Where a running job's shipped log is (`RunLogs::ship`): a piece's
    /// byte offset and when it was sent (ms since the epoch, the holder's
    /// clock), now and then, and the latest results. Fenced by the token.
    Shipped {
        id: String,
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mark: Option<(u64, i64)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
    },
    /// Earlier design: a job's own log stream was deleted. Its log reads
    /// empty.
    LogDropped {
        id: String,
    },
    /// Where a run left its files (`Queue::record_artifacts`); not fenced.
    Artifacts {
        id: String,
        artifacts: Box<gpupool_core::Artifacts>,
    },
    /// A snapshot of the fold after the event at `covers` is in the
    /// snapshot stream, `bytes` long (see [`Snapshot`]).
    Snapshot {
        covers: i64,
        bytes: u64,
    },
    /// Earlier design: a parked job's work message was sent again. A parked
    /// job is queued now (only big enough wants take it), so this does
    /// nothing.
    Unpark {
        id: String,
        #[serde(default)]
        dispatch: Option<String>,
    },
    Sync,
    /// A `pushed` event whose spec does not read (written by hand, or by a
    /// newer gpupool): a job that ends `failed`, kind `invalid`, saying why.
    /// Made by the reader ([`Envelope::read`]), never published.
    #[serde(skip)]
    Unreadable {
        why: String,
    },
}

/// A mark of a shipped piece: its byte offset in its job's log and when it
/// was sent (ms since the epoch, its holder's clock).
pub(crate) type Mark = (u64, i64);

impl Event {
    /// Whether the event may share a ledger message with others published
    /// at the same moment (`AmqpQueue`'s outbox). Every event of a message
    /// is applied at its offset, and a `Pushed` event's offset is its job's
    /// id, so a push is a message of its own; a snapshot's mark too.
    pub(crate) fn batches(&self) -> bool {
        !matches!(self, Event::Pushed { .. } | Event::Snapshot { .. } | Event::Unreadable { .. })
    }

    /// A lease's end by its holder: (job, token, where its shipped log
    /// ends when it says, and a mark of its last piece when the end carries
    /// one).
    fn lease_end(&self) -> Option<(&str, &str, Option<u64>, Option<Mark>)> {
        match self {
            Event::Completed { id, token, log_end, mark, .. } => Some((id, token, *log_end, *mark)),
            Event::Failed { id, token, log_end, .. }
            | Event::Cancelled { id, token, log_end, .. }
            | Event::Released { id, token, log_end, .. }
            | Event::Deferred { id, token, log_end, .. } => Some((id, token, *log_end, None)),
            Event::Parked { id, token, .. } => Some((id, token, None, None)),
            _ => None,
        }
    }
}

/// What a want asks for (a handle reuses a waiting want for a reserve that
/// asks for the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ask {
    pub(crate) worker: String,
    pub(crate) queues: Vec<String>,
    /// The most GPUs a job may need ([`gpupool_core::ReserveRequest::gpu_limit`]).
    pub(crate) gpu_limit: u32,
    pub(crate) gpu_host: bool,
    pub(crate) lease_ms: u64,
}

impl Ask {
    /// Whether a want asking this may take the job.
    fn takes(&self, job: &Job) -> bool {
        self.queues.contains(&job.record.spec.queue) && job.fits(self.gpu_limit, self.gpu_host)
    }
}

/// An event with its publisher's nonce and clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) nonce: String,
    /// Milliseconds since the epoch, the publisher's clock (for display,
    /// lease ages and wants' deadlines).
    pub(crate) at: i64,
    #[serde(flatten)]
    pub(crate) event: Event,
}

impl Envelope {
    /// An event as stored; a `pushed` event whose spec does not read
    /// becomes [`Event::Unreadable`], so that the job exists (and is failed)
    /// in every fold; `None` for anything else that does not read.
    pub(crate) fn read(data: &[u8]) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_slice(data).or_else(|e| {
            #[derive(Deserialize)]
            struct Head {
                nonce: String,
                at: i64,
                #[serde(rename = "type")]
                kind: String,
            }
            match serde_json::from_slice::<Head>(data) {
                Ok(head) if head.kind == "pushed" => {
                    Ok(Envelope { nonce: head.nonce, at: head.at, event: Event::Unreadable { why: e.to_string() } })
                }
                _ => Err(e),
            }
        })
    }

    /// The events of one ledger message: one envelope, or several written
    /// together as a JSON array (see [`Event::batches`]). An event of a
    /// batch that does not read is left out (`skipped` counts it), as a
    /// message that does not read is; `Err` when the message is neither.
    pub(crate) fn read_all(data: &[u8]) -> std::result::Result<(Vec<Self>, usize), serde_json::Error> {
        if data.first() != Some(&b'[') {
            return Self::read(data).map(|env| (vec![env], 0));
        }
        if let Ok(all) = serde_json::from_slice::<Vec<Self>>(data) {
            return Ok((all, 0));
        }
        let values: Vec<serde_json::Value> = serde_json::from_slice(data)?;
        let total = values.len();
        let all: Vec<Self> = values.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect();
        let skipped = total - all.len();
        Ok((all, skipped))
    }
}

/// What applying an event did, for the publisher waiting on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// A new job with this id.
    Pushed(String),
    /// The idempotency key was known, for the same job: the first job's id.
    Existing(String),
    /// The idempotency key was known, for another job: the first job's id.
    Conflict(String),
    /// Applied.
    Ok,
    /// A want (or a withdrawn want, before it was withdrawn) was handed
    /// this job.
    Leased(String),
    /// A want is kept until a job comes or its time is up.
    Waiting,
    /// Heartbeat applied; whether a cancel was asked for.
    Beat { cancel: bool },
    /// The job went back to the queue.
    Requeued,
    /// A failure ended the job.
    Failed,
    /// Not applied: the lease is not held, a dispatch is stale, or no job
    /// fits a want that may not wait.
    Rejected,
    /// Cancel: queued job cancelled.
    Cancelled,
    /// Cancel: running job asked to stop.
    Requested,
    /// Cancel or retry: the job is in this state.
    State(JobState),
    /// No such job.
    Missing,
}

#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) record: JobRecord,
    pub(crate) token: Option<String>,
    /// Earlier design: the current dispatch nonce while queued.
    dispatch: Option<String>,
    /// Parked: only a want offering at least this many GPUs takes it.
    parked: Option<u32>,
    /// When this process last saw the lease renewed, and for how long.
    pub(crate) renewed: Option<(Instant, Duration)>,
    /// When the lease ends in ledger order: the last renewal's publish time
    /// (`Envelope::at`) plus its length. A `Reclaim` published before it
    /// is refused, so a heartbeat that reached the ledger first wins over a
    /// reclaim built from an older view (a paused or cut-off process).
    lease_until: Option<i64>,
    /// Where its shipped log's pieces are in its log stream.
    pub(crate) log: LogIndex,
    /// Its failed attempts, oldest first, each with its place among all
    /// the fold's failed attempts (`State::error_seq`).
    errors: Vec<(u64, AttemptError)>,
    /// Which end of a job its last end was (`State::ends`), so that an
    /// entry of an earlier end in `State::finished` is known as stale.
    end_seq: u64,
}

/// What the fold knows of a job's shipped log, whose text is in the
/// queue's log stream (`PREFIXlogs`, one message per piece, tagged with its
/// job and byte offset): marks of when some pieces were sent, so that a read
/// starts near the piece it wants, and where the log ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LogIndex {
    /// Where the log ends: exactly when it is not `open` (but for a piece
    /// that never reached the stream); else at least the start of its last
    /// marked piece.
    pub(crate) end: u64,
    /// (byte offset, ms since the epoch it was sent) of marked pieces,
    /// oldest first, within two caps of the newest (older ones are past
    /// the cap).
    marks: std::collections::VecDeque<(u64, i64)>,
    /// A holder shipped pieces since the end was last settled: it may end
    /// past `end`.
    #[serde(default)]
    pub(crate) open: bool,
    /// When (ms since the epoch, its holder's clock) the end was settled,
    /// or the holder of an open log went (its lease ended or was
    /// reclaimed): no piece of the job was sent later, but for a line or
    /// two of a reclaimed holder. 0 while a holder ships.
    #[serde(default)]
    pub(crate) settled_at: i64,
    /// Earlier design: the job's own log stream was deleted.
    pub(crate) dropped: bool,
}

/// Marks before this (ms since the epoch, 2001) are an earlier design's:
/// stream offsets in a stream a job, which this version does not read.
const LEGACY_MARK: i64 = 1_000_000_000_000;

impl LogIndex {
    fn mark(&mut self, start: u64, at: i64) {
        if at < LEGACY_MARK {
            self.dropped = true;
            return;
        }
        self.open = true;
        self.settled_at = 0;
        if self.marks.back().is_some_and(|&(s, _)| s >= start) {
            return; // a stale or repeated mark
        }
        self.marks.push_back((start, at));
        self.end = self.end.max(start);
        let keep_from = self.end.saturating_sub(2 * gpupool_core::LOG_CAP_BYTES);
        while self.marks.len() > 1 && self.marks.get(1).is_some_and(|&(s, _)| s <= keep_from) {
            self.marks.pop_front();
        }
    }

    /// The holder that shipped last ended its lease with its log ending at
    /// `end`, at `at`.
    fn settle(&mut self, end: u64, at: i64) {
        self.end = self.end.max(end);
        self.open = false;
        self.settled_at = at;
    }

    /// This index as this version reads it: an earlier design's marks
    /// (stream offsets in a stream a job) make a log this version does not
    /// read.
    fn upgraded(mut self) -> Self {
        if self.marks.iter().any(|&(_, at)| at < LEGACY_MARK) {
            self.marks.clear();
            self.open = false;
            self.dropped = true;
        }
        self
    }

    /// The holder of an open log went at `at` without saying where the log
    /// ends (a reclaim, or an end from a process that lost its cursor).
    fn close(&mut self, at: i64) {
        if self.open {
            self.settled_at = at;
        }
    }

    /// When a read of this log may stop: no piece of it was sent after
    /// this (ms since the epoch, within the clocks' slack); `None` while a
    /// holder may still ship.
    pub(crate) fn sent_by(&self) -> Option<i64> {
        (self.settled_at > 0).then_some(self.settled_at)
    }

    /// Whether a piece was ever marked (so the job has shipped a log).
    pub(crate) fn marked(&self) -> bool {
        !self.marks.is_empty()
    }

    /// When the piece with byte `from` was sent, or before: the time of the
    /// mark at or before it (ms since the epoch; 0 without marks).
    pub(crate) fn seek(&self, from: u64) -> i64 {
        self.marks.iter().rev().find(|&&(s, _)| s <= from).or(self.marks.front()).map_or(0, |&(_, at)| at)
    }

    /// The newest mark: (its byte offset, when it was sent).
    pub(crate) fn last(&self) -> Option<(u64, i64)> {
        self.marks.back().copied()
    }
}

impl Job {
    /// Whether `token` holds the job, as this fold sees it now.
    pub(crate) fn held(&self, token: &str) -> bool {
        self.record.state == JobState::Running && self.token.as_deref() == Some(token)
    }

    /// Whether the lease ran out, by this process's clock, with `grace` to spare.
    pub(crate) fn expired(&self, now: Instant, grace: Duration) -> bool {
        self.record.state == JobState::Running
            && self.renewed.is_some_and(|(at, lease)| now.saturating_duration_since(at) > lease + grace)
    }

    fn end(&mut self, state: JobState, at: i64) {
        self.record.state = state;
        self.token = None;
        self.renewed = None;
        self.lease_until = None;
        if state.is_terminal() {
            self.record.finished_at = Some(Timestamp(at));
        }
    }

    /// This attempt's failure, as `errors` lists it.
    fn attempt_error(&self, failure: &Failure, at: i64) -> AttemptError {
        gpupool_core::rows::failed_attempt(failure, self.record.id.clone(), self.record.attempt, Timestamp(at))
    }

    /// About how much memory its text takes (for [`KEEP_FINISHED_BYTES`]).
    fn weight(&self) -> u64 {
        let r = &self.record;
        let text = r.output_tail.as_ref().map_or(0, String::len)
            + r.result.as_ref().map_or(0, |v| v.to_string().len())
            + r.spec.args.iter().map(|(k, v)| k.len() + v.to_string().len()).sum::<usize>()
            + self.errors.iter().map(|(_, e)| e.output_tail.len() + e.message.len()).sum::<usize>();
        1024 + text as u64
    }

    /// Whether a want offering `limit` GPUs (on a GPU host or not) may take it.
    fn fits(&self, limit: u32, gpu_host: bool) -> bool {
        self.record.spec.gpus_needed(gpu_host).max(self.parked.unwrap_or(0)) <= limit
    }
}

/// A want kept until a job comes for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Waiting {
    token: String,
    owner: String,
    ask: Ask,
    /// Event time (ms) after which it is gone.
    until: i64,
}

/// Where a queued job stands in its queue: highest priority, then oldest.
pub(crate) type Rank = (Reverse<i32>, u64, String);

fn rank(job: &Job) -> Rank {
    rank_of(job.record.spec.priority, job.record.id.as_str())
}

/// A job's place in its queue, best first: priority, then push order (the
/// id is the push's offset).
pub(crate) fn rank_of(priority: i32, id: &str) -> Rank {
    (Reverse(priority), id.parse().unwrap_or(u64::MAX), id.to_owned())
}

/// Finished jobs the fold keeps, at most: the newest this many, and of
/// those no more than [`KEEP_FINISHED_BYTES`] of text (outputs, errors,
/// results). An older finished job is forgotten: `get` and `jobs` no longer
/// know it, its idempotency key is free again, and its log stream is
/// deleted; its artifacts stay in their store. The same numbers for every
/// process, so that every fold forgets the same jobs at the same event.
pub(crate) const KEEP_FINISHED: usize = 10_000;
pub(crate) const KEEP_FINISHED_BYTES: u64 = 64 << 20;

/// Nonces of events are remembered (to give a repeated publish its first
/// verdict) for this long by the events' clocks, and at least the newest
/// [`SEEN_KEEP`]: an event is published again only within a minute of its
/// first publish (`EMIT_WITHIN`). The count keeps a publisher whose clock
/// runs ahead from shortening the memory of a busy ledger.
const SEEN_FOR_MS: i64 = 120_000;
const SEEN_KEEP: usize = 20_000;

/// The fold of the ledger.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) jobs: HashMap<String, Job>,
    /// Ids of the kept jobs (push order is id order).
    pub(crate) order: BTreeSet<u64>,
    idempotency: HashMap<String, String>,
    /// Failed attempts counted so far (orders `Job::errors` across jobs).
    error_seq: u64,
    /// Earlier design: jobs by the dispatch nonce of their push.
    pushed: HashMap<String, String>,
    /// Registered workers, `seen_at` from the event's clock.
    pub(crate) workers: std::collections::BTreeMap<String, gpupool_core::WorkerInfo>,
    /// Verdicts by nonce, so that a publisher that sent an event twice (it
    /// lost its connection before seeing the first) gets the first verdict.
    seen: HashMap<String, Outcome>,
    /// The nonces in `seen`, in ledger order, with their events' times.
    seen_order: VecDeque<(i64, String)>,
    /// The latest event time applied.
    latest_at: i64,
    /// Queued jobs by queue, best first.
    queued: HashMap<String, BTreeSet<Rank>>,
    /// Queued jobs held back until a time (`not_before`, a retry's
    /// backoff, a deferral), by that time: the first event at or after it
    /// puts them in their queue ([`State::promote`]).
    delayed: BTreeSet<(i64, String)>,
    /// Wants waiting for a job, oldest first.
    waiting: VecDeque<Waiting>,
    /// Ends of jobs so far.
    ends: u64,
    /// Finished jobs, oldest end first: (`Job::end_seq`, id, weight).
    finished: VecDeque<(u64, String, u64)>,
    /// The weight of the entries in `finished`.
    finished_bytes: u64,
    /// For each job that a job not yet ended waits for (`after`), how many
    /// such jobs: a finished job named here is not forgotten, so the wait
    /// can read how it ended. Rebuilt from the jobs when a snapshot loads.
    pins: HashMap<String, u32>,
    /// Finished jobs past the window kept for a pin; forgotten when their
    /// last pin goes.
    pinned_past: std::collections::HashSet<String>,
    /// At most how many finished jobs, and how much of their text, are kept
    /// ([`KEEP_FINISHED`]; smaller in tests).
    keep: (usize, u64),
    /// The last offset applied (-1: none).
    pub(crate) applied: i64,
    /// The newest snapshot the ledger names.
    pub(crate) last_snapshot: Option<SnapshotMark>,
    /// Ledger bytes applied since the newest snapshot was named.
    pub(crate) since_snapshot: u64,
    /// This fold found events cut from the ledger between its snapshot and
    /// the ledger's start: it may be wrong, so it writes no snapshot.
    pub(crate) gapped: bool,
    /// The handle this fold belongs to: jobs handed to its waiting wants
    /// are noted in `handed`.
    owner: String,
    /// Jobs handed to this handle's waiting wants, by lease token.
    pub(crate) handed: HashMap<String, String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            jobs: HashMap::new(),
            order: BTreeSet::new(),
            idempotency: HashMap::new(),
            error_seq: 0,
            pushed: HashMap::new(),
            workers: std::collections::BTreeMap::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            latest_at: i64::MIN,
            queued: HashMap::new(),
            delayed: BTreeSet::new(),
            waiting: VecDeque::new(),
            ends: 0,
            finished: VecDeque::new(),
            finished_bytes: 0,
            pins: HashMap::new(),
            pinned_past: std::collections::HashSet::new(),
            keep: (KEEP_FINISHED, KEEP_FINISHED_BYTES),
            applied: -1,
            last_snapshot: None,
            since_snapshot: 0,
            gapped: false,
            owner: String::new(),
            handed: HashMap::new(),
        }
    }
}

/// A snapshot the ledger names (`Event::Snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotMark {
    /// The last ledger offset it holds.
    pub(crate) covers: i64,
    /// Its size.
    pub(crate) bytes: u64,
    /// When it was named (the event's clock).
    pub(crate) at: i64,
}

/// When an event happened, on the two clocks the fold uses.
#[derive(Debug, Clone, Copy)]
struct When {
    /// Milliseconds since the epoch, the publisher's clock ([`Envelope::at`]).
    at: i64,
    /// The same moment on this process's clock, never later than now: a
    /// lease renewed by the event counts from here.
    now: Instant,
}

impl State {
    /// An empty fold for the handle `owner`.
    pub(crate) fn new(owner: &str) -> Self {
        State { owner: owner.to_owned(), ..State::default() }
    }

    /// Applies one event found at `offset` in the stream.
    ///
    /// `now` is this process's clock; `wall_ms` its wall clock. A lease
    /// renewal counts from when it was published (`env.at`, never later than
    /// now), so a process that replays the ledger after a worker died sees
    /// that worker's lease as old as it is, not as fresh.
    pub(crate) fn apply(&mut self, offset: i64, env: Envelope, now: Instant, wall_ms: i64) -> Outcome {
        self.applied = self.applied.max(offset);
        if let Some(first) = self.seen.get(&env.nonce) {
            return first.clone();
        }
        let renewed_at = local_instant(env.at, now, wall_ms);
        let outcome = self.apply_new(offset, env.event, When { at: env.at, now: renewed_at });
        self.remember(env.nonce, env.at, outcome.clone());
        outcome
    }

    /// Notes a nonce's verdict, and forgets the nonces of events older than
    /// [`SEEN_FOR_MS`] beyond the newest [`SEEN_KEEP`] (by the events'
    /// clocks, so every fold forgets the same ones).
    fn remember(&mut self, nonce: String, at: i64, outcome: Outcome) {
        self.seen.insert(nonce.clone(), outcome);
        self.seen_order.push_back((at, nonce));
        self.latest_at = self.latest_at.max(at);
        let horizon = self.latest_at.saturating_sub(SEEN_FOR_MS);
        while self.seen_order.len() > SEEN_KEEP && self.seen_order.front().is_some_and(|(at, _)| *at < horizon) {
            if let Some((_, old)) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Counts ledger bytes applied (for when a snapshot is due).
    pub(crate) fn grew(&mut self, bytes: usize) {
        self.since_snapshot = self.since_snapshot.saturating_add(bytes as u64);
    }

    /// Whether any queued job or waiting want is left (tests).
    #[cfg(test)]
    fn queued_len(&self) -> usize {
        self.queued.values().map(BTreeSet::len).sum()
    }

    /// The job is queued now: it goes to the oldest waiting want it fits,
    /// or into its queue.
    fn enqueue(&mut self, id: &str, when: When) {
        let Some(job) = self.jobs.get(id) else { return };
        if let Some(start) = job.record.not_before.filter(|t| t.0 > when.at) {
            self.delayed.insert((start.0, id.to_owned()));
            return;
        }
        self.waiting.retain(|w| w.until >= when.at);
        let taker = self.waiting.iter().position(|w| w.ask.takes(job));
        if let Some(w) = taker.and_then(|i| self.waiting.remove(i)) {
            self.lease_to(id, w.token.clone(), w.ask.worker, w.ask.lease_ms, when);
            if w.owner == self.owner {
                self.handed.insert(w.token, id.to_owned());
            }
            return;
        }
        let r = rank(job);
        self.queued.entry(job.record.spec.queue.clone()).or_default().insert(r);
    }

    /// Puts in their queue the jobs held back until `when.at` or before (by
    /// the event's clock, so every process promotes them at the same
    /// event). An entry whose job has left `queued`, or has been held
    /// back to another time since, is dropped.
    fn promote(&mut self, when: When) {
        while let Some((at, id)) = self.delayed.first().cloned() {
            if at > when.at {
                return;
            }
            self.delayed.pop_first();
            let current = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.record.state == JobState::Queued && j.record.not_before == Some(Timestamp(at)));
            if current {
                self.enqueue(&id, when);
            }
        }
    }

    /// When the first job held back is due (ms since the epoch), if any.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.delayed.first().map(|(at, _)| *at)
    }

    /// The job leaves its queue (leased or cancelled).
    fn dequeue(&mut self, id: &str) {
        let Some(job) = self.jobs.get(id) else { return };
        let r = rank(job);
        if let Some(set) = self.queued.get_mut(&job.record.spec.queue) {
            set.remove(&r);
        }
    }

    /// The best queued job for a want: the first of its queues that has
    /// one that fits, then priority, then the oldest.
    fn pick(&self, ask: &Ask) -> Option<String> {
        ask.queues
            .iter()
            .find_map(|q| {
                self.queued
                    .get(q)?
                    .iter()
                    .map(|(_, _, id)| id)
                    .find(|id| self.jobs.get(id.as_str()).is_some_and(|j| j.fits(ask.gpu_limit, ask.gpu_host)))
            })
            .cloned()
    }

    /// How many of the queued jobs a want asking `ask` would be handed
    /// next (in [`pick`](State::pick)'s order) `batch` admits after what it
    /// holds: the size of a batch's further wants that this fold expects to
    /// be filled. Another worker's wants may come first; a want that finds
    /// nothing is refused.
    pub(crate) fn batch_fits(&self, ask: &Ask, mut batch: gpupool_core::Batch) -> usize {
        let next = ask.queues.iter().filter_map(|q| self.queued.get(q)).flat_map(|set| set.iter());
        next.filter_map(|(_, _, id)| self.jobs.get(id.as_str()))
            .filter(|j| j.fits(ask.gpu_limit, ask.gpu_host))
            .take_while(|j| batch.admit(j.record.spec.gpus_needed(ask.gpu_host)))
            .count()
    }

    /// Leases a queued job.
    fn lease_to(&mut self, id: &str, token: String, worker: String, lease_ms: u64, when: When) {
        self.dequeue(id);
        let Some(job) = self.jobs.get_mut(id) else { return };
        if let Some(d) = job.dispatch.take() {
            self.pushed.remove(&d);
        }
        let r = &mut job.record;
        r.state = JobState::Running;
        r.attempt += 1;
        r.worker = Some(worker);
        r.started_at = Some(Timestamp(when.at));
        r.finished_at = None;
        r.exit_code = None;
        r.signal = None;
        r.gpu_ids = None;
        job.token = Some(token);
        job.parked = None;
        job.renewed = Some((when.now, Duration::from_millis(lease_ms)));
        job.lease_until = Some(when.at.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX)));
    }

    /// Back to the queue (a requeue of the earlier design names its dispatch).
    fn requeue(&mut self, id: &str, dispatch: Option<String>, when: When) -> Outcome {
        if let Some(job) = self.jobs.get_mut(id) {
            if let Some(d) = &dispatch {
                self.pushed.insert(d.clone(), id.to_owned());
            }
            job.dispatch = dispatch;
        }
        self.enqueue(id, when);
        Outcome::Requeued
    }

    /// Applies an event not seen before: one step per kind of event.
    fn apply_new(&mut self, offset: i64, event: Event, when: When) -> Outcome {
        self.promote(when);
        if let Some((id, token, end, mark)) = event.lease_end()
            && let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token))
        {
            if let Some((start, at)) = mark {
                job.log.mark(start, at);
            }
            match end {
                Some(end) => job.log.settle(end, when.at),
                None => job.log.close(when.at),
            }
        }
        match event {
            Event::Pushed { spec, dispatch } => self.push_job(offset, *spec, dispatch, when),
            Event::Want { token, owner, ask, wait_ms } => self.serve_want(token, owner, ask, wait_ms, when),
            Event::Withdraw { token } => self.withdraw_want(&token),
            Event::Leased { id, dispatch, token, worker, lease_ms } => {
                self.lease_dispatch(id, &dispatch, token, worker, lease_ms, when)
            }
            Event::Heartbeat { id, token, lease_ms } => self.renew_lease(&id, &token, lease_ms, when),
            Event::Started { id, token, commit, gpu_ids } => self.record_start(&id, &token, commit, gpu_ids),
            Event::Completed { id, token, output_tail, result, run, .. } => {
                if let Some((commit, gpu_ids)) = run {
                    self.record_start(&id, &token, commit, gpu_ids);
                }
                self.end_succeeded(&id, &token, output_tail, result, when)
            }
            Event::Failed { id, token, kind, exit_code, signal, message, output_tail, dispatch, .. } => {
                let failure = Failure { kind, exit_code, signal, message, output_tail };
                self.fail_attempt(&id, &token, failure, dispatch, when)
            }
            Event::Cancelled { id, token, output_tail, .. } => self.end_cancelled(&id, &token, output_tail, when),
            Event::Released { id, token, dispatch, .. } => self.release(&id, &token, dispatch, when),
            Event::Deferred { id, token, until, .. } => self.defer(&id, &token, until, when),
            Event::Cancel { id } => self.cancel(&id, when),
            Event::Retry { id, dispatch } => self.retry(&id, dispatch, when),
            Event::Reclaim { id, token, dispatch } => self.reclaim(&id, &token, dispatch, when),
            Event::Parked { id, token, gpus } => self.park(&id, &token, gpus, when),
            Event::Artifacts { id, artifacts } => self.record_artifacts(&id, *artifacts),
            Event::Shipped { id, token, mark, result } => self.ship(&id, &token, mark, result),
            Event::LogDropped { id } => {
                if let Some(job) = self.jobs.get_mut(&id) {
                    job.log.dropped = true;
                }
                Outcome::Ok
            }
            Event::Snapshot { covers, bytes } => {
                self.last_snapshot = Some(SnapshotMark { covers, bytes, at: when.at });
                self.since_snapshot = 0;
                Outcome::Ok
            }
            Event::Unpark { .. } => Outcome::Ok,
            Event::Worker { info } => self.register_worker(*info, when),
            Event::WorkerGone { name } => self.forget_worker(&name),
            Event::Sync => Outcome::Ok,
            Event::Unreadable { why } => self.push_unreadable(offset, &why, when),
        }
    }

    /// `Pushed`: a new job, whose id is its offset + 1, or the job its
    /// idempotency key names.
    fn push_job(&mut self, offset: i64, spec: JobSpec, dispatch: Option<String>, when: When) -> Outcome {
        if let Some(id) = spec.idempotency_key.as_ref().and_then(|k| self.idempotency.get(k)) {
            let same = self.jobs.get(id).is_none_or(|job| job.record.spec == spec);
            return if same { Outcome::Existing(id.clone()) } else { Outcome::Conflict(id.clone()) };
        }
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert(key.clone(), (offset + 1).to_string());
        }
        let id = self.insert_job(offset, spec, when);
        self.pin(&id, true);
        self.requeue(&id, dispatch, when);
        Outcome::Pushed(id)
    }

    /// A new job, not yet queued: its id is its event's offset + 1 (ids
    /// count from 1, as every backend's do).
    fn insert_job(&mut self, offset: i64, spec: JobSpec, when: When) -> String {
        let id = (offset + 1).to_string();
        let record = JobRecord::new(JobId::new(id.clone()), spec, Timestamp(when.at));
        self.jobs.insert(
            id.clone(),
            Job {
                record,
                token: None,
                dispatch: None,
                parked: None,
                renewed: None,
                lease_until: None,
                log: LogIndex::default(),
                errors: Vec::new(),
                end_seq: 0,
            },
        );
        self.order.insert(u64::try_from(offset + 1).unwrap_or(0));
        id
    }

    /// A `pushed` event whose spec does not read: a job, failed `invalid`
    /// at once. Its spec is empty, which the checks of push refuse, so a
    /// `retry` of it fails the same way when it is leased.
    fn push_unreadable(&mut self, offset: i64, why: &str, when: When) -> Outcome {
        let id = self.insert_job(offset, JobSpec::new("", ""), when);
        let Some(job) = self.jobs.get_mut(&id) else { return Outcome::Rejected };
        job.record.attempt = 1;
        let failure = Failure::new(FailureKind::Invalid, gpupool_core::rows::unreadable(&why));
        self.error_seq += 1;
        job.errors.push((self.error_seq, job.attempt_error(&failure, when.at)));
        job.end(JobState::Failed, when.at);
        self.finished(&id);
        Outcome::Failed
    }

    /// `Shipped`: the holder's latest results, and where a piece of its
    /// log is.
    fn ship(&mut self, id: &str, token: &str, mark: Option<(u64, i64)>, result: Option<serde_json::Value>) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        if result.is_some() {
            job.record.result = result;
        }
        if let Some((start, at)) = mark {
            job.log.mark(start, at);
        }
        Outcome::Ok
    }

    /// `Artifacts`: kept unless the job holds a later attempt's.
    fn record_artifacts(&mut self, id: &str, artifacts: gpupool_core::Artifacts) -> Outcome {
        let Some(job) = self.jobs.get_mut(id) else { return Outcome::Missing };
        if artifacts.replaces(job.record.artifacts.as_ref()) {
            job.record.artifacts = Some(artifacts);
        }
        Outcome::Ok
    }

    /// `Want`: leases the best queued job that fits, or keeps the want for
    /// `wait_ms` (a want that may not wait is rejected).
    fn serve_want(&mut self, token: String, owner: String, ask: Ask, wait_ms: u64, when: When) -> Outcome {
        if let Some(id) = self.pick(&ask) {
            self.lease_to(&id, token, ask.worker, ask.lease_ms, when);
            return Outcome::Leased(id);
        }
        if wait_ms == 0 {
            return Outcome::Rejected;
        }
        let until = when.at.saturating_add(i64::try_from(wait_ms).unwrap_or(i64::MAX));
        self.waiting.push_back(Waiting { token, owner, ask, until });
        Outcome::Waiting
    }

    /// `Withdraw`: drops a waiting want; a want already handed a job says
    /// which one.
    fn withdraw_want(&mut self, token: &str) -> Outcome {
        if let Some(i) = self.waiting.iter().position(|w| w.token == token) {
            self.waiting.remove(i);
            return Outcome::Ok;
        }
        match self.jobs.values().find(|j| j.held(token)) {
            Some(job) => Outcome::Leased(job.record.id.to_string()),
            None => Outcome::Ok,
        }
    }

    /// `Leased` (earlier design): leases the queued job whose current
    /// dispatch this is; a stale or unknown dispatch is rejected.
    fn lease_dispatch(
        &mut self,
        id: Option<String>,
        dispatch: &str,
        token: String,
        worker: String,
        lease_ms: u64,
        when: When,
    ) -> Outcome {
        let Some(id) = id.or_else(|| self.pushed.get(dispatch).cloned()) else { return Outcome::Rejected };
        let Some(job) = self.jobs.get(&id) else { return Outcome::Rejected };
        if job.record.state != JobState::Queued || job.dispatch.as_deref() != Some(dispatch) {
            return Outcome::Rejected;
        }
        self.lease_to(&id, token, worker, lease_ms, when);
        Outcome::Leased(id)
    }

    /// `Heartbeat`: the holder renews its lease and learns whether a cancel
    /// was asked for.
    fn renew_lease(&mut self, id: &str, token: &str, lease_ms: u64, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.renewed = Some((when.now, Duration::from_millis(lease_ms)));
        job.lease_until = Some(when.at.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX)));
        Outcome::Beat { cancel: job.record.cancel_requested }
    }

    /// `Started`: the holder records the commit and the GPUs of its run.
    fn record_start(&mut self, id: &str, token: &str, commit: Option<String>, gpu_ids: Vec<u32>) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.record.commit = commit;
        job.record.gpu_ids = Some(gpu_ids);
        Outcome::Ok
    }

    /// `Completed`: the holder's run succeeded.
    fn end_succeeded(
        &mut self,
        id: &str,
        token: &str,
        output_tail: String,
        result: Option<serde_json::Value>,
        when: When,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.end(JobState::Succeeded, when.at);
        job.record.exit_code = Some(0);
        job.record.output_tail = Some(output_tail);
        job.record.result = result;
        self.finished(id);
        Outcome::Ok
    }

    /// `Failed`: records the holder's failed attempt, then requeues the job
    /// if the failure allows another attempt, or fails it.
    fn fail_attempt(
        &mut self,
        id: &str,
        token: &str,
        failure: Failure,
        dispatch: Option<String>,
        when: When,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        let requeue = failure.requeues(&job.record.spec, job.record.attempt, job.record.attempt_limit);
        let retry_at = failure.retry_at(&job.record.spec, job.record.attempt, Timestamp(when.at));
        self.error_seq += 1;
        job.errors.push((self.error_seq, job.attempt_error(&failure, when.at)));
        job.record.exit_code = failure.exit_code;
        job.record.signal = failure.signal;
        job.record.output_tail = Some(failure.output_tail);
        if requeue {
            job.record.not_before = retry_at;
            job.end(JobState::Queued, when.at);
            self.requeue(id, dispatch, when)
        } else {
            job.end(JobState::Failed, when.at);
            self.finished(id);
            Outcome::Failed
        }
    }

    /// `Cancelled`: the holder stopped its run on a cancel.
    fn end_cancelled(&mut self, id: &str, token: &str, output_tail: String, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.end(JobState::Cancelled, when.at);
        job.record.output_tail = Some(output_tail);
        self.finished(id);
        Outcome::Ok
    }

    /// `Released`: the holder gives the job back to the queue, uncharged.
    fn release(&mut self, id: &str, token: &str, dispatch: Option<String>, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.end(JobState::Queued, when.at);
        job.record.attempt = job.record.attempt.saturating_sub(1);
        self.requeue(id, dispatch, when)
    }

    /// `Deferred`: as `Released`, held back until `until`.
    fn defer(&mut self, id: &str, token: &str, until: i64, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.end(JobState::Queued, when.at);
        job.record.attempt = job.record.attempt.saturating_sub(1);
        job.record.not_before = Some(Timestamp(until));
        self.requeue(id, None, when)
    }

    /// `Cancel`: a queued job is cancelled at once; a running one is asked
    /// to stop (its holder learns at its next heartbeat).
    fn cancel(&mut self, id: &str, when: When) -> Outcome {
        let Some(job) = self.jobs.get(id) else { return Outcome::Missing };
        match job.record.state {
            JobState::Queued => {
                self.dequeue(id);
                let Some(job) = self.jobs.get_mut(id) else { return Outcome::Missing };
                job.end(JobState::Cancelled, when.at);
                if let Some(d) = job.dispatch.take() {
                    self.pushed.remove(&d);
                }
                self.finished(id);
                Outcome::Cancelled
            }
            JobState::Running => {
                if let Some(job) = self.jobs.get_mut(id) {
                    job.record.cancel_requested = true;
                }
                Outcome::Requested
            }
            ended => Outcome::State(ended),
        }
    }

    /// `Retry`: a failed or cancelled job is queued again with
    /// `max_attempts` more attempts.
    fn retry(&mut self, id: &str, dispatch: Option<String>, when: When) -> Outcome {
        match self.jobs.get_mut(id) {
            None => Outcome::Missing,
            Some(job) if matches!(job.record.state, JobState::Failed | JobState::Cancelled) => {
                job.record.state = JobState::Queued;
                job.record.cancel_requested = false;
                job.record.finished_at = None;
                job.record.not_before = None;
                job.record.attempt_limit = job.record.attempt.saturating_add(job.record.spec.attempts());
                self.pin(id, true);
                self.requeue(id, dispatch, when)
            }
            Some(job) => Outcome::State(job.record.state),
        }
    }

    /// `Reclaim`: the first reclaim of an expired lease records
    /// `lease_lost`, then the job is cancelled (if asked), requeued or
    /// failed; a later one finds the lease gone and is rejected.
    fn reclaim(&mut self, id: &str, token: &str, dispatch: Option<String>, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        if job.lease_until.is_some_and(|until| when.at < until) {
            // Renewed after the reclaimer last looked: the lease holds.
            return Outcome::Rejected;
        }
        let expired = gpupool_core::rows::ExpiredLease::new(
            job.record.worker.as_deref(),
            job.record.cancel_requested,
            job.record.attempt,
            job.record.attempt_limit,
        );
        self.error_seq += 1;
        job.errors.push((self.error_seq, job.attempt_error(&expired.failure, when.at)));
        job.end(expired.state, when.at);
        job.log.close(when.at);
        match expired.state {
            JobState::Queued => self.requeue(id, dispatch, when),
            JobState::Cancelled => {
                self.finished(id);
                Outcome::Ok
            }
            _ => {
                self.finished(id);
                Outcome::Failed
            }
        }
    }

    /// `Parked`: the holder gives back, uncharged, a job that needs more
    /// GPUs than it has free; from now on only a want offering `gpus` takes it.
    fn park(&mut self, id: &str, token: &str, gpus: u32, when: When) -> Outcome {
        let Some(job) = self.jobs.get_mut(id).filter(|j| j.held(token)) else { return Outcome::Rejected };
        job.end(JobState::Queued, when.at);
        job.record.attempt = job.record.attempt.saturating_sub(1);
        job.parked = Some(gpus);
        self.requeue(id, None, when);
        Outcome::Ok
    }

    /// `Worker`: registers a worker, seen at the event's time.
    /// Workers gone silent for long are dropped here, by the event's clock,
    /// so that every replay drops the same ones.
    fn register_worker(&mut self, mut info: gpupool_core::WorkerInfo, when: When) -> Outcome {
        info.seen_at = Timestamp(when.at);
        self.workers.insert(info.name.clone(), info);
        self.workers.retain(|_, w| !w.gone_at(Timestamp(when.at)));
        Outcome::Ok
    }

    /// `WorkerGone`: forgets a worker. A leaving worker withdraws its own
    /// wants first; several handles in one process may share a worker name,
    /// so its wants are not dropped by name here.
    fn forget_worker(&mut self, name: &str) -> Outcome {
        self.workers.remove(name);
        Outcome::Ok
    }

    /// A job's failed attempts, oldest first.
    pub(crate) fn errors_of(&self, id: &str) -> Vec<AttemptError> {
        self.jobs.get(id).map(|j| j.errors.iter().map(|(_, e)| e.clone()).collect()).unwrap_or_default()
    }

    /// The newest `limit` failed attempts of kept jobs, newest first.
    pub(crate) fn recent_errors(&self, limit: usize) -> Vec<AttemptError> {
        let mut all: Vec<&(u64, AttemptError)> = self.jobs.values().flat_map(|j| j.errors.iter()).collect();
        all.sort_unstable_by_key(|(seq, _)| Reverse(*seq));
        all.into_iter().take(limit).map(|(_, e)| e.clone()).collect()
    }

    /// The job has just ended: it joins the finished window, and the
    /// oldest finished jobs past it are forgotten ([`KEEP_FINISHED`]).
    fn finished(&mut self, id: &str) {
        self.pin(id, false);
        let Some(job) = self.jobs.get_mut(id) else { return };
        self.ends += 1;
        job.end_seq = self.ends;
        let weight = job.weight();
        self.finished.push_back((self.ends, id.to_owned(), weight));
        self.finished_bytes = self.finished_bytes.saturating_add(weight);
        while self.finished.len() > self.keep.0 || self.finished_bytes > self.keep.1 {
            let Some((seq, old, weight)) = self.finished.pop_front() else { break };
            self.finished_bytes = self.finished_bytes.saturating_sub(weight);
            // A job retried since that end is not finished (or ended again later).
            if self.jobs.get(&old).is_some_and(|j| j.end_seq == seq && j.record.state.is_terminal()) {
                if self.pins.get(&old).is_some_and(|n| *n > 0) {
                    self.pinned_past.insert(old);
                } else {
                    self.forget(&old);
                }
            }
        }
    }

    /// Forgets a finished job.
    /// Pins (`true`: the job `id` is waiting again) or unpins (it ended)
    /// the jobs its `after` names; a finished job past the window whose last
    /// pin goes is forgotten then.
    fn pin(&mut self, id: &str, on: bool) {
        let Some(gpupool_core::After::Jobs(parents)) = self.jobs.get(id).and_then(|j| j.record.spec.after.clone())
        else {
            return;
        };
        for parent in parents {
            let parent = parent.as_str().to_owned();
            let n = self.pins.entry(parent.clone()).or_default();
            *n = if on { n.saturating_add(1) } else { n.saturating_sub(1) };
            if *n == 0 {
                self.pins.remove(&parent);
                if self.pinned_past.remove(&parent) {
                    self.forget(&parent);
                }
            }
        }
    }

    fn forget(&mut self, id: &str) {
        let Some(job) = self.jobs.remove(id) else { return };
        if let Ok(n) = id.parse::<u64>() {
            self.order.remove(&n);
        }
        if let Some(key) = &job.record.spec.idempotency_key
            && self.idempotency.get(key).is_some_and(|k| k == id)
        {
            self.idempotency.remove(key);
        }
        if let Some(d) = &job.dispatch {
            self.pushed.remove(d);
        }
    }
}

/// The format of [`Snapshot`]; a process does not load a newer one (it
/// replays the ledger instead).
pub(crate) const SNAPSHOT_VERSION: u32 = 2;

/// The fold written out after the event at `covers`. A process that
/// connects loads the newest one and follows the ledger from `covers + 1`,
/// so it needs neither the ledger's history (which retention cuts) nor the
/// time to replay it. It holds everything a verdict depends on, so a fold
/// loaded from it gives every later event the verdict the writer's fold
/// gives; readings of the writer's own clock are kept as event times (a
/// lease as its end in ledger order and its length).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub(crate) v: u32,
    pub(crate) covers: i64,
    jobs: Vec<JobSnap>,
    error_seq: u64,
    workers: Vec<gpupool_core::WorkerInfo>,
    seen: Vec<(i64, String, Outcome)>,
    latest_at: i64,
    waiting: Vec<Waiting>,
    ends: u64,
    finished: Vec<(u64, String, u64)>,
    /// Earlier design: forgotten jobs whose log stream was to be deleted.
    /// Always empty; written for processes of that version, which need it.
    #[serde(default)]
    orphan_logs: Vec<String>,
    last_snapshot: Option<SnapshotMark>,
    /// The jobs held back, by time: kept as they are (whether one is due
    /// depends on the events to come, whose clocks may lag `latest_at`).
    #[serde(default)]
    delayed: Vec<(i64, String)>,
}

/// A job in a [`Snapshot`].
#[derive(Debug, Serialize, Deserialize)]
struct JobSnap {
    id: String,
    spec: JobSpec,
    state: JobState,
    attempt: u32,
    attempt_limit: u32,
    commit: Option<String>,
    worker: Option<String>,
    gpu_ids: Option<Vec<u32>>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    output_tail: Option<String>,
    result: Option<serde_json::Value>,
    artifacts: Option<gpupool_core::Artifacts>,
    cancel_requested: bool,
    created_at: Timestamp,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<Timestamp>,
    token: Option<String>,
    dispatch: Option<String>,
    parked: Option<u32>,
    /// The lease's end in ledger order, and its length (ms).
    lease: Option<(i64, u64)>,
    log: LogIndex,
    errors: Vec<(u64, AttemptError)>,
    end_seq: u64,
}

impl JobSnap {
    fn of(job: &Job) -> Self {
        let r = &job.record;
        JobSnap {
            id: r.id.to_string(),
            spec: r.spec.clone(),
            state: r.state,
            attempt: r.attempt,
            attempt_limit: r.attempt_limit,
            commit: r.commit.clone(),
            worker: r.worker.clone(),
            gpu_ids: r.gpu_ids.clone(),
            exit_code: r.exit_code,
            signal: r.signal,
            output_tail: r.output_tail.clone(),
            result: r.result.clone(),
            artifacts: r.artifacts.clone(),
            cancel_requested: r.cancel_requested,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            not_before: r.not_before,
            token: job.token.clone(),
            dispatch: job.dispatch.clone(),
            parked: job.parked,
            lease: job.lease_until.zip(job.renewed.map(|(_, d)| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            log: job.log.clone(),
            errors: job.errors.clone(),
            end_seq: job.end_seq,
        }
    }

    /// The job, its lease renewed (on this process's clock) when the
    /// renewal was published.
    fn into_job(self, now: Instant, wall_ms: i64) -> Job {
        let mut record = JobRecord::new(JobId::new(self.id), self.spec, self.created_at);
        record.state = self.state;
        record.attempt = self.attempt;
        record.attempt_limit = self.attempt_limit;
        record.commit = self.commit;
        record.worker = self.worker;
        record.gpu_ids = self.gpu_ids;
        record.exit_code = self.exit_code;
        record.signal = self.signal;
        record.output_tail = self.output_tail;
        record.result = self.result;
        record.artifacts = self.artifacts;
        record.cancel_requested = self.cancel_requested;
        record.started_at = self.started_at;
        record.finished_at = self.finished_at;
        record.not_before = self.not_before;
        let renewed = self.lease.map(|(until, ms)| {
            let at = until.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
            (local_instant(at, now, wall_ms), Duration::from_millis(ms))
        });
        Job {
            record,
            token: self.token,
            dispatch: self.dispatch,
            parked: self.parked,
            renewed,
            lease_until: self.lease.map(|(until, _)| until),
            log: self.log.upgraded(),
            errors: self.errors,
            end_seq: self.end_seq,
        }
    }
}

impl State {
    /// The fold as a [`Snapshot`] (covering the last event applied).
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            v: SNAPSHOT_VERSION,
            covers: self.applied,
            jobs: self.order.iter().filter_map(|n| self.jobs.get(&n.to_string())).map(JobSnap::of).collect(),
            error_seq: self.error_seq,
            workers: self.workers.values().cloned().collect(),
            seen: self
                .seen_order
                .iter()
                .filter_map(|(at, nonce)| Some((*at, nonce.clone(), self.seen.get(nonce)?.clone())))
                .collect(),
            latest_at: self.latest_at,
            waiting: self.waiting.iter().cloned().collect(),
            ends: self.ends,
            finished: self.finished.iter().cloned().collect(),
            orphan_logs: Vec::new(),
            last_snapshot: self.last_snapshot,
            delayed: self.delayed.iter().cloned().collect(),
        }
    }

    /// The fold a snapshot holds, for the handle `owner`; `now` and
    /// `wall_ms` as in [`State::apply`].
    pub(crate) fn from_snapshot(snap: Snapshot, owner: &str, now: Instant, wall_ms: i64) -> Self {
        let mut st = State::new(owner);
        let delayed: BTreeSet<(i64, String)> = snap.delayed.into_iter().collect();
        st.applied = snap.covers;
        st.error_seq = snap.error_seq;
        for j in snap.jobs {
            let job = j.into_job(now, wall_ms);
            let id = job.record.id.to_string();
            if let Some(key) = &job.record.spec.idempotency_key {
                st.idempotency.insert(key.clone(), id.clone());
            }
            if let Some(d) = &job.dispatch {
                st.pushed.insert(d.clone(), id.clone());
            }
            let held = job.record.not_before.is_some_and(|t| delayed.contains(&(t.0, id.clone())));
            if job.record.state == JobState::Queued && !held {
                st.queued.entry(job.record.spec.queue.clone()).or_default().insert(rank(&job));
            }
            st.order.insert(id.parse().unwrap_or(0));
            st.jobs.insert(id, job);
        }
        st.workers = snap.workers.into_iter().map(|w| (w.name.clone(), w)).collect();
        for (at, nonce, outcome) in snap.seen {
            st.seen.insert(nonce.clone(), outcome);
            st.seen_order.push_back((at, nonce));
        }
        st.latest_at = snap.latest_at;
        st.waiting = snap.waiting.into();
        st.ends = snap.ends;
        st.finished_bytes = snap.finished.iter().map(|(_, _, w)| *w).sum();
        st.finished = snap.finished.into();
        st.last_snapshot = snap.last_snapshot;
        st.delayed = delayed;
        // Pins, from the jobs not yet ended; finished jobs outside the window
        // are there for a pin.
        let waiting: Vec<String> =
            st.jobs.iter().filter(|(_, j)| !j.record.state.is_terminal()).map(|(id, _)| id.clone()).collect();
        for id in waiting {
            st.pin(&id, true);
        }
        let in_window: std::collections::HashSet<&String> = st.finished.iter().map(|(_, id, _)| id).collect();
        st.pinned_past = st
            .jobs
            .iter()
            .filter(|(id, j)| j.record.state.is_terminal() && !in_window.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        st
    }
}

/// The moment an event published at `at` (ms, its publisher's clock) is on
/// this process's clock, given `now` and the wall clock `wall_ms`: never
/// later than now.
fn local_instant(at: i64, now: Instant, wall_ms: i64) -> Instant {
    let age = Duration::from_millis(u64::try_from(wall_ms.saturating_sub(at)).unwrap_or(0));
    now.checked_sub(age).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str, event: Event) -> Envelope {
        Envelope { nonce: n.to_owned(), at: 1, event }
    }

    fn at(n: &str, at: i64, event: Event) -> Envelope {
        Envelope { nonce: n.to_owned(), at, event }
    }

    fn pushed(spec: JobSpec) -> Event {
        Event::Pushed { spec: Box::new(spec), dispatch: None }
    }

    /// A plain `Completed` by the holder of `token`.
    fn completed(id: String, token: &str) -> Event {
        Event::Completed {
            id,
            token: token.into(),
            output_tail: String::new(),
            result: None,
            log_end: None,
            mark: None,
            run: None,
        }
    }

    fn want(token: &str, owner: &str, queues: &[&str], gpu_limit: u32, wait_ms: u64) -> Event {
        let ask = Ask {
            worker: format!("w-{owner}"),
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            gpu_limit,
            gpu_host: true,
            lease_ms: 1000,
        };
        Event::Want { token: token.into(), owner: owner.into(), ask, wait_ms }
    }

    #[test]
    fn each_job_goes_to_one_want_and_stale_holders_are_refused() {
        let now = Instant::now();
        let mut s = State::new("me");
        let Outcome::Pushed(id) = s.apply(7, env("a", pushed(JobSpec::new("main", "t.py"))), now, 1) else {
            panic!("not pushed")
        };
        assert_eq!(id, "8", "the id is the stream offset + 1");
        assert_eq!(s.apply(8, env("b", want("t1", "x", &["default"], 1, 0)), now, 1), Outcome::Leased(id.clone()));
        assert_eq!(s.apply(9, env("c", want("t2", "y", &["default"], 1, 0)), now, 1), Outcome::Rejected);
        // The same nonce again gets the first verdict.
        assert_eq!(s.apply(10, env("b", want("t1", "x", &["default"], 1, 0)), now, 1), Outcome::Leased(id.clone()));
        let reclaim = |n: &str| at(n, 2000, Event::Reclaim { id: id.clone(), token: "t1".into(), dispatch: None });
        assert_eq!(s.apply(11, reclaim("d"), now, 1), Outcome::Requeued);
        assert_eq!(s.apply(12, reclaim("e"), now, 1), Outcome::Rejected, "only one reclaim takes effect");
        let done = completed(id.clone(), "t1");
        assert_eq!(s.apply(13, env("f", done), now, 1), Outcome::Rejected, "the old holder is fenced");
        assert_eq!(s.apply(14, env("g", want("t3", "y", &["default"], 1, 0)), now, 1), Outcome::Leased(id.clone()));
        assert_eq!(s.jobs[&id].record.attempt, 2);
        assert_eq!(s.errors_of(&id).len(), 1);
        assert_eq!(s.errors_of(&id)[0].kind, FailureKind::LeaseLost);
        assert_eq!(s.queued_len(), 0);
    }

    #[test]
    fn a_waiting_want_is_handed_the_next_job_until_its_time_is_up() {
        let now = Instant::now();
        let mut s = State::new("me");
        assert_eq!(s.apply(0, at("a", 1000, want("old", "me", &["default"], 1, 500)), now, 1000), Outcome::Waiting);
        assert_eq!(s.apply(1, at("b", 1000, want("mine", "me", &["default"], 1, 5000)), now, 1000), Outcome::Waiting);
        assert_eq!(s.apply(2, at("c", 1000, want("theirs", "x", &["default"], 1, 5000)), now, 1000), Outcome::Waiting);
        // At 2000 the first want's time is up: the job goes to the next one.
        let Outcome::Pushed(first) = s.apply(3, at("d", 2000, pushed(JobSpec::new("main", "t.py"))), now, 2000) else {
            panic!()
        };
        assert_eq!(s.jobs[&first].token.as_deref(), Some("mine"));
        assert_eq!(s.handed.get("mine"), Some(&first), "a job for this handle's want is noted");
        let Outcome::Pushed(second) = s.apply(4, at("e", 2000, pushed(JobSpec::new("main", "t.py"))), now, 2000) else {
            panic!()
        };
        assert_eq!(s.jobs[&second].token.as_deref(), Some("theirs"));
        assert!(!s.handed.contains_key("theirs"), "another handle's want is not noted here");
        // Withdrawing a want that was handed a job tells which job.
        let withdraw = |n: &str, t: &str| env(n, Event::Withdraw { token: t.into() });
        assert_eq!(s.apply(5, withdraw("f", "theirs"), now, 2000), Outcome::Leased(second));
        assert_eq!(s.apply(6, at("g", 2000, want("w", "me", &["default"], 1, 5000)), now, 2000), Outcome::Waiting);
        assert_eq!(s.apply(7, withdraw("h", "w"), now, 2000), Outcome::Ok);
        let Outcome::Pushed(third) = s.apply(8, at("i", 2000, pushed(JobSpec::new("main", "t.py"))), now, 2000) else {
            panic!()
        };
        assert_eq!(s.jobs[&third].record.state, JobState::Queued, "a withdrawn want takes nothing");
        assert_eq!(s.queued_len(), 1);
    }

    #[test]
    fn wants_take_queue_order_then_priority_then_the_oldest_that_fits() {
        let now = Instant::now();
        let mut s = State::new("me");
        let mut push = |offset: i64, queue: &str, priority: i32, gpus: u32| {
            let mut spec = JobSpec::new("main", "t.py");
            spec.queue = queue.into();
            spec.priority = priority;
            spec.gpus = Some(gpus);
            match s.apply(offset, env(&format!("p{offset}"), pushed(spec)), now, 1) {
                Outcome::Pushed(id) => id,
                other => panic!("{other:?}"),
            }
        };
        let low = push(0, "b", 0, 1);
        let big = push(1, "b", 9, 4);
        let high = push(2, "b", 9, 1);
        let other = push(3, "a", 0, 1);
        let mut take =
            |n: &str, queues: &[&str], limit: u32| match s.apply(9, env(n, want(n, "x", queues, limit, 0)), now, 1) {
                Outcome::Leased(id) => Some(id),
                _ => None,
            };
        assert_eq!(take("w1", &["a", "b"], 1), Some(other), "the first queue first");
        assert_eq!(take("w2", &["a", "b"], 1), Some(high), "then priority, skipping what does not fit");
        assert_eq!(take("w3", &["a", "b"], 1), Some(low));
        assert_eq!(take("w4", &["a", "b"], 1), None, "the 4-GPU job does not fit 1");
        assert_eq!(take("w5", &["b"], 4), Some(big));
    }

    #[test]
    fn a_batch_counts_the_jobs_next_in_line_that_fit_it_together() {
        let now = Instant::now();
        let mut s = State::new("me");
        for (offset, queue, gpus) in [(0, "b", 1), (1, "a", 2), (2, "b", 5), (3, "a", 1), (4, "b", 1), (5, "b", 1)] {
            let mut spec = JobSpec::new("main", "t.py");
            spec.queue = queue.into();
            spec.gpus = Some(gpus);
            s.apply(offset, env(&format!("p{offset}"), pushed(spec)), now, 1);
        }
        let Event::Want { ask, .. } = want("t", "me", &["a", "b"], 4, 0) else { unreachable!() };
        let offer = |free: u32, max: usize| {
            let req = gpupool_core::ReserveRequest::new("a").gpus(free, true).max_gpus(4);
            gpupool_core::Batch::new(&req, max)
        };
        // In line: a/2, a/1, b/1 (b/5 does not fit the ask: skipped), b/1, b/1.
        assert_eq!(s.batch_fits(&ask, offer(8, 8)), 5);
        assert_eq!(s.batch_fits(&ask, offer(8, 3)), 3, "no more than asked for");
        assert_eq!(s.batch_fits(&ask, offer(4, 8)), 3, "2 + 1 + 1 GPUs fill 4: the batch closes");
        let mut holding = offer(3, 8);
        assert!(holding.admit(1));
        assert_eq!(s.batch_fits(&ask, holding), 1, "1 GPU held and 2 next make 3; the 1 after would be a fourth");
        let mut full = offer(2, 8);
        assert!(full.admit(2));
        assert_eq!(s.batch_fits(&ask, full), 0, "a batch that holds every GPU offered takes nothing more");
        let Event::Want { ask: cpu, .. } = want("t", "me", &["c"], 4, 0) else { unreachable!() };
        assert_eq!(s.batch_fits(&cpu, offer(8, 8)), 0, "no job in its queues");
    }

    #[test]
    fn a_want_is_one_flat_json_object() {
        let text = serde_json::to_string(&env("n", want("t", "o", &["a", "b"], 2, 30_000))).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "nonce",
                "at",
                "type",
                "token",
                "owner",
                "worker",
                "queues",
                "gpu_limit",
                "gpu_host",
                "lease_ms",
                "wait_ms"
            ]
        );
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, want("t", "o", &["a", "b"], 2, 30_000));
    }

    #[test]
    fn a_message_of_several_events_reads_as_each_and_one_that_does_not_read_is_left_out() {
        let one = serde_json::to_vec(&env("a", Event::Sync)).unwrap();
        let done = serde_json::to_vec(&env("b", completed("8".into(), "t1"))).unwrap();
        assert_eq!(Envelope::read_all(&one).unwrap(), (vec![env("a", Event::Sync)], 0));
        let mut several = b"[".to_vec();
        several.extend_from_slice(&one);
        several.push(b',');
        several.extend_from_slice(br#"{"nonce":"c","at":1,"type":"from_a_newer_gpupool"}"#);
        several.push(b',');
        several.extend_from_slice(&done);
        several.push(b']');
        let (events, skipped) = Envelope::read_all(&several).unwrap();
        assert_eq!(events, vec![env("a", Event::Sync), env("b", completed("8".into(), "t1"))]);
        assert_eq!(skipped, 1);
        assert!(Envelope::read_all(b"[1,").is_err());
        assert!(!pushed(JobSpec::new("main", "t.py")).batches(), "a push's offset is its id");
        assert!(completed("8".into(), "t1").batches());
    }

    #[test]
    fn a_ledger_of_the_earlier_design_replays() {
        let now = Instant::now();
        let mut s = State::new("me");
        let spec = Box::new(JobSpec::new("main", "t.py"));
        let text = serde_json::to_string(&env("a", Event::Pushed { spec, dispatch: Some("p1".into()) })).unwrap();
        let Outcome::Pushed(id) = s.apply(3, serde_json::from_str(&text).unwrap(), now, 1) else {
            panic!("not pushed")
        };
        let lease = |token: &str, dispatch: &str| Event::Leased {
            id: None,
            dispatch: dispatch.into(),
            token: token.into(),
            worker: "w".into(),
            lease_ms: 1000,
        };
        assert_eq!(s.apply(4, env("x", lease("t0", "nope")), now, 1), Outcome::Rejected, "an unknown dispatch loses");
        assert_eq!(s.apply(5, env("b", lease("t1", "p1")), now, 1), Outcome::Leased(id.clone()));
        assert_eq!(s.apply(6, env("c", lease("t2", "p1")), now, 1), Outcome::Rejected, "a redelivery loses");
        assert_eq!(s.jobs[&id].token.as_deref(), Some("t1"));
        assert_eq!(s.queued_len(), 0);
        let old = r#"{"nonce":"d","at":1,"type":"released","id":"4","token":"t1","dispatch":"p2"}"#;
        assert_eq!(s.apply(7, serde_json::from_str(old).unwrap(), now, 1), Outcome::Requeued);
        assert_eq!(s.apply(8, env("e", lease("t3", "p2")), now, 1), Outcome::Leased(id));
        // New events carry no dispatch field.
        let text = serde_json::to_string(&env("f", pushed(JobSpec::new("main", "t.py")))).unwrap();
        assert!(!text.contains("dispatch"), "{text}");
    }

    #[test]
    fn a_log_read_starts_at_the_mark_it_wants_and_old_marks_go() {
        let mut log = LogIndex::default();
        assert_eq!((log.seek(0), log.marked(), log.open), (0, false, false));
        // A mark every 100 pieces of 1 MiB, one a second.
        let t0 = 1_800_000_000_000;
        for n in 0..100u64 {
            log.mark((n * 100) << 20, t0 + 1_000 * i64::try_from(n).unwrap());
        }
        log.mark(50 << 20, t0 + 50); // stale: ignored
        let end = (99 * 100) << 20;
        assert_eq!((log.end, log.open, log.sent_by()), (end, true, None));
        assert!(log.marks.len() <= 2 * (gpupool_core::LOG_CAP_BYTES >> 20) as usize / 100 + 2, "{}", log.marks.len());
        let from = end - (150 << 20);
        assert_eq!(log.seek(from), t0 + 98_000, "the mark at or before it");
        assert_eq!(log.seek(end + 5), t0 + 99_000);
        assert_eq!(log.last(), Some((end, t0 + 99_000)));
        log.settle(end + 7, t0 + 120_000);
        assert_eq!((log.end, log.open, log.sent_by()), (end + 7, false, Some(t0 + 120_000)));
        // An earlier design's mark (a stream offset): a log this version
        // does not read.
        let mut old = LogIndex::default();
        old.mark(0, 17);
        assert!(old.dropped && !old.marked());
        let mut snap = LogIndex::default();
        snap.marks.push_back((0, 17));
        assert!(snap.upgraded().dropped);
    }

    /// A fold with job 1 leased with token `t1`, whose holder shipped (a
    /// mark at byte 0).
    fn shipping_job() -> (State, String, Instant) {
        let now = Instant::now();
        let mut s = State::new("me");
        assert!(matches!(s.apply(0, env("a", pushed(JobSpec::new("main", "t.py"))), now, 1), Outcome::Pushed(_)));
        let id = "1".to_owned();
        assert_eq!(s.apply(1, env("b", want("t1", "w", &["default"], 1, 0)), now, 1), Outcome::Leased(id.clone()));
        let ship =
            Event::Shipped { id: id.clone(), token: "t1".into(), mark: Some((0, 1_800_000_000_000)), result: None };
        assert_eq!(s.apply(2, env("c", ship), now, 1), Outcome::Ok);
        (s, id, now)
    }

    #[test]
    fn a_holders_end_settles_its_log_and_a_stale_one_does_not() {
        let (mut s, id, now) = shipping_job();
        assert!(s.jobs[&id].log.open, "a holder shipped: the end may be past the mark");
        let stale = Event::Released { id: id.clone(), token: "t0".into(), dispatch: None, log_end: Some(99) };
        s.apply(3, env("d", stale), now, 1);
        assert!(s.jobs[&id].log.open, "a stale lease's end settles nothing");
        let done = Event::Completed {
            id: id.clone(),
            token: "t1".into(),
            output_tail: String::new(),
            result: None,
            log_end: Some(42),
            mark: Some((40, 1_800_000_002_000)),
            run: Some((Some("abc".into()), vec![3])),
        };
        s.apply(4, env("e", done), now, 1);
        let log = &s.jobs[&id].log;
        assert_eq!(
            (log.end, log.open, log.last()),
            (42, false, Some((40, 1_800_000_002_000))),
            "its last piece marked, settled"
        );
        assert_eq!(s.jobs[&id].record.commit.as_deref(), Some("abc"), "the run's facts, with its end");
    }

    #[test]
    fn a_reclaimed_holders_log_stays_open_but_a_read_of_it_is_bounded() {
        let (mut s, id, now) = shipping_job();
        let gone = 1_800_000_060_000;
        let reclaim = Event::Reclaim { id: id.clone(), token: "t1".into(), dispatch: None };
        assert_eq!(s.apply(3, at("d", gone, reclaim), now, 1), Outcome::Requeued);
        let log = &s.jobs[&id].log;
        assert_eq!((log.open, log.sent_by()), (true, Some(gone)), "its end unknown, but nothing sent after it went");
    }

    #[test]
    fn a_reclaim_from_an_older_view_loses_to_a_later_heartbeat() {
        let now = Instant::now();
        let mut s = State::new("me");
        let Outcome::Pushed(id) = s.apply(0, at("a", 1000, pushed(JobSpec::new("main", "t.py"))), now, 1000) else {
            panic!("not pushed")
        };
        // Leased at 1000 for 1000 ms, renewed at 1800 (until 2800).
        assert_eq!(
            s.apply(1, at("b", 1000, want("t1", "x", &["default"], 1, 0)), now, 1000),
            Outcome::Leased(id.clone())
        );
        let beat = Event::Heartbeat { id: id.clone(), token: "t1".into(), lease_ms: 1000 };
        assert_eq!(s.apply(2, at("c", 1800, beat), now, 1800), Outcome::Beat { cancel: false });
        // A process that was paused saw only the lease at 1000: its reclaim
        // at 2100 is refused, and the run goes on.
        let reclaim = |n: &str, t: i64| at(n, t, Event::Reclaim { id: id.clone(), token: "t1".into(), dispatch: None });
        assert_eq!(s.apply(3, reclaim("d", 2100), now, 2100), Outcome::Rejected);
        assert_eq!(s.jobs[&id].record.state, JobState::Running);
        assert!(s.errors_of(&id).is_empty(), "nothing charged");
        // Past the renewed lease, a reclaim counts.
        assert_eq!(s.apply(4, reclaim("e", 2800), now, 2800), Outcome::Requeued);
        assert_eq!(s.errors_of(&id)[0].kind, FailureKind::LeaseLost);
    }

    /// A varied history: pushes (one with a key), wants that wait and that
    /// take, a lease renewed, a failure that requeues, a cancel, artifacts,
    /// a worker; `n` names the nonces.
    fn history(base: i64) -> Vec<Envelope> {
        let mut keyed = JobSpec::new("main", "t.py");
        keyed.idempotency_key = Some("k1".into());
        let mut big = JobSpec::new("main", "t.py");
        big.gpus = Some(4);
        let id = |n: i64| (base + n + 1).to_string();
        let fail = |id: String, token: &str| Event::Failed {
            id,
            token: token.into(),
            kind: FailureKind::Exit,
            exit_code: Some(1),
            signal: None,
            message: "exit 1".into(),
            output_tail: "boom".into(),
            dispatch: None,
            log_end: None,
        };
        let info: gpupool_core::WorkerInfo =
            serde_json::from_value(serde_json::json!({"name": "w1", "host": "h", "gpus": [], "heartbeat_ms": 10_000,
                "queues": ["default"], "slots": 1, "running": [], "started_at": 1000}))
            .unwrap_or_else(|e| panic!("{e}"));
        vec![
            at("n0", 1000, pushed(keyed.clone())),
            at("n1", 1000, pushed(JobSpec::new("main", "t.py"))),
            at("n2", 1000, pushed(big)),
            at("n3", 1100, want("t1", "me", &["default"], 1, 0)),
            at("n4", 1100, Event::Heartbeat { id: id(0), token: "t1".into(), lease_ms: 1000 }),
            at("n5", 1200, want("t2", "x", &["default"], 1, 0)),
            at("n6", 1300, fail(id(1), "t2")),
            at("n7", 1300, want("t3", "me", &["default"], 1, 60_000)),
            at("n8", 1400, Event::Worker { info: Box::new(info) }),
            at("n9", 1500, Event::Cancel { id: id(2) }),
            at("n10", 1600, want("t4", "x", &["gpu"], 8, 60_000)),
            // The snapshot is taken here in the test.
            at("n11", 1700, pushed(JobSpec::new("main", "t.py"))),
            at("n3", 1100, want("t1", "me", &["default"], 1, 0)),
            at("n12", 1800, pushed(keyed)),
            at("n13", 1900, Event::Heartbeat { id: id(0), token: "t1".into(), lease_ms: 1000 }),
            at("n14", 2000, Event::Reclaim { id: id(0), token: "t1".into(), dispatch: None }),
            at("n15", 2000, completed(id(0), "t1")),
            at("n16", 3000, Event::Reclaim { id: id(0), token: "t1".into(), dispatch: None }),
            at("n17", 3100, Event::Retry { id: id(2), dispatch: None }),
            at("n18", 3200, want("t5", "y", &["default"], 8, 0)),
            at("n19", 3300, Event::Withdraw { token: "t4".into() }),
        ]
    }

    #[test]
    fn a_fold_loaded_from_a_snapshot_gives_every_later_event_the_same_verdict() {
        let now = Instant::now();
        let events = history(40);
        let (head, tail) = events.split_at(11);
        let mut full = State::new("me");
        for (i, e) in head.iter().enumerate() {
            full.apply(40 + i as i64, e.clone(), now, 1700);
        }
        let text = serde_json::to_vec(&full.snapshot()).unwrap();
        let snap: Snapshot = serde_json::from_slice(&text).unwrap();
        assert_eq!(snap.covers, 50);
        let mut loaded = State::from_snapshot(snap, "me", now, 1700);
        for (i, e) in tail.iter().enumerate() {
            let offset = 51 + i as i64;
            let wall = e.at;
            let want = full.apply(offset, e.clone(), now, wall);
            assert_eq!(loaded.apply(offset, e.clone(), now, wall), want, "event {i} of the tail: {e:?}");
        }
        let (a, b) = (serde_json::to_value(full.snapshot()).unwrap(), serde_json::to_value(loaded.snapshot()).unwrap());
        assert_eq!(a, b, "the two folds agree");
        // The history did what it says: the reclaim before the renewed
        // lease's end lost, the one after won; a retried job is queued.
        assert_eq!(full.jobs["41"].record.state, JobState::Succeeded);
        assert_eq!(full.jobs["43"].record.state, JobState::Running, "retried, then taken by the 8-GPU want");
        assert_eq!(full.jobs["52"].record.state, JobState::Running, "handed to the waiting want t3");
        assert_eq!(loaded.queued_len(), full.queued_len());
    }

    /// A job held back goes to the waiting want at the first event at or
    /// after its start, in a fold loaded from a snapshot as in the one that
    /// wrote it; a deferral holds it back again, uncharged.
    #[test]
    fn a_job_held_back_is_handed_out_at_the_first_event_after_its_start() {
        let now = Instant::now();
        let mut spec = JobSpec::new("main", "train.py");
        spec.not_before = Some(Timestamp(5000));
        let mut s = State::new("me");
        assert_eq!(s.apply(0, at("n0", 1000, pushed(spec)), now, 1000), Outcome::Pushed("1".into()));
        assert_eq!(s.apply(1, at("n1", 1100, want("t1", "me", &["default"], 1, 10_000)), now, 1100), Outcome::Waiting);
        let snap: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s.snapshot()).unwrap()).unwrap();
        let mut loaded = State::from_snapshot(snap, "me", now, 1100);
        for fold in [&mut s, &mut loaded] {
            assert_eq!(fold.next_due(), Some(5000));
            fold.apply(2, at("n2", 4999, Event::Sync), now, 4999);
            assert_eq!(fold.jobs["1"].record.state, JobState::Queued, "not before its start");
            fold.apply(3, at("n3", 5000, Event::Sync), now, 5000);
            assert_eq!(fold.jobs["1"].record.state, JobState::Running, "handed to the waiting want");
            assert_eq!(fold.handed.get("t1").map(String::as_str), Some("1"));
            let defer = Event::Deferred { id: "1".into(), token: "t1".into(), until: 9000, log_end: None };
            assert_eq!(fold.apply(4, at("n4", 5100, defer), now, 5100), Outcome::Requeued);
            let job = &fold.jobs["1"].record;
            assert_eq!((job.state, job.attempt, job.not_before), (JobState::Queued, 0, Some(Timestamp(9000))));
            assert_eq!(fold.next_due(), Some(9000));
        }
    }

    /// A job held back stays held in a fold loaded from a snapshot even
    /// when an event from a fast clock came before it: whether it is due
    /// depends on the events to come, and both folds give them the same
    /// verdict.
    #[test]
    fn a_snapshot_keeps_a_job_held_back_past_a_fast_clock() {
        let now = Instant::now();
        let mut s = State::new("me");
        s.apply(0, at("n0", 1000, pushed(JobSpec::new("main", "train.py"))), now, 1000);
        assert_eq!(
            s.apply(1, at("n1", 1100, want("t1", "me", &["default"], 1, 0)), now, 1100),
            Outcome::Leased("1".into())
        );
        s.apply(2, at("n2", 9000, Event::Sync), now, 9000);
        let defer = Event::Deferred { id: "1".into(), token: "t1".into(), until: 7000, log_end: None };
        assert_eq!(s.apply(3, at("n3", 5100, defer), now, 5100), Outcome::Requeued);
        let snap: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s.snapshot()).unwrap()).unwrap();
        let mut loaded = State::from_snapshot(snap, "me", now, 5100);
        let slow = at("n4", 6000, want("t2", "me", &["default"], 1, 0));
        assert_eq!(loaded.apply(4, slow.clone(), now, 6000), s.apply(4, slow, now, 6000));
        assert_eq!(s.jobs["1"].record.state, JobState::Queued, "not before 7000 by the events' clocks");
        assert_eq!(loaded.jobs["1"].record.state, JobState::Queued);
    }

    /// A finished job that a waiting job runs `after` is kept past the
    /// window (the wait must read how it ended), in a fold loaded from a
    /// snapshot too, and forgotten once the waiting job has ended.
    #[test]
    fn a_finished_job_another_waits_for_is_kept_until_that_one_ends() {
        let now = Instant::now();
        let mut s = State::new("me");
        s.keep = (2, 1 << 30);
        let mut offset = 0i64;
        let mut next = |s: &mut State, e: Event| {
            offset += 1;
            s.apply(offset, at(&format!("n{offset}"), 1000 + offset, e), now, 1000 + offset)
        };
        let run = |s: &mut State, next: &mut dyn FnMut(&mut State, Event) -> Outcome, n: usize| {
            let token = format!("t{n}");
            let Outcome::Leased(id) = next(s, want(&token, "me", &["default"], 1, 0)) else { panic!("a job to lease") };
            let done = Event::Completed {
                id: id.clone(),
                token,
                output_tail: String::new(),
                result: None,
                log_end: None,
                mark: None,
                run: None,
            };
            assert_eq!(next(s, done), Outcome::Ok);
            id
        };
        let Outcome::Pushed(parent) = next(&mut s, pushed(JobSpec::new("main", "train.py"))) else { panic!() };
        assert_eq!(run(&mut s, &mut next, 0), parent);
        let mut child = JobSpec::new("main", "eval.py").with_queue("later");
        child.after = Some(gpupool_core::After::Jobs(vec![JobId::new(parent.clone())]));
        let Outcome::Pushed(child) = next(&mut s, pushed(child)) else { panic!() };
        for n in 1..=3 {
            next(&mut s, pushed(JobSpec::new("main", "other.py")));
            run(&mut s, &mut next, n);
        }
        assert!(s.jobs.contains_key(&parent), "kept past the window while its child waits");
        let snap: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s.snapshot()).unwrap()).unwrap();
        let mut loaded = State::from_snapshot(snap, "me", now, 2000);
        assert!(loaded.jobs.contains_key(&parent), "and in a fold loaded from a snapshot");
        for fold in [&mut s, &mut loaded] {
            assert_eq!(
                fold.apply(100, at("n100", 3000, Event::Cancel { id: child.clone() }), now, 3000),
                Outcome::Cancelled
            );
            assert!(!fold.jobs.contains_key(&parent), "forgotten once the child ended");
        }
    }

    #[test]
    fn finished_jobs_past_the_window_are_forgotten_and_live_ones_kept() {
        let now = Instant::now();
        let mut s = State::new("me");
        s.keep = (50, 1 << 30);
        let mut offset = 0i64;
        let mut next = |s: &mut State, t: i64, e: Event| {
            offset += 1;
            s.apply(offset, at(&format!("n{offset}"), t, e), now, t)
        };
        let Outcome::Pushed(long) = next(&mut s, 0, pushed(JobSpec::new("main", "t.py"))) else { panic!() };
        assert_eq!(next(&mut s, 0, want("long", "me", &["default"], 1, 0)), Outcome::Leased(long.clone()));
        let mut first = None;
        for n in 0..3000i64 {
            let t = n * 1000;
            let mut spec = JobSpec::new("main", "t.py");
            spec.idempotency_key = Some(format!("key{n}"));
            let Outcome::Pushed(id) = next(&mut s, t, pushed(spec)) else { panic!() };
            first.get_or_insert(id.clone());
            let token = format!("t{n}");
            assert_eq!(next(&mut s, t, want(&token, "me", &["default"], 1, 0)), Outcome::Leased(id.clone()));
            let tail = "x".repeat(100);
            let done =
                Event::Completed { id, token, output_tail: tail, result: None, log_end: None, mark: None, run: None };
            assert_eq!(next(&mut s, t, done), Outcome::Ok);
        }
        assert_eq!(s.jobs.len(), 51, "50 finished and the running one");
        assert_eq!(s.order.len(), 51);
        assert_eq!(s.jobs[&long].record.state, JobState::Running);
        let first = first.unwrap();
        assert!(!s.jobs.contains_key(&first));
        assert_eq!(next(&mut s, 0, Event::Retry { id: first, dispatch: None }), Outcome::Missing);
        // A forgotten job's key is free again.
        let mut spec = JobSpec::new("main", "t.py");
        spec.idempotency_key = Some("key0".into());
        assert!(matches!(next(&mut s, 3_000_000, pushed(spec)), Outcome::Pushed(_)));
        assert!(s.seen.len() <= SEEN_KEEP && s.seen_order.len() == s.seen.len(), "{}", s.seen.len());
        // By weight: 2 KB outputs in a 10 KB window keep a few.
        s.keep = (10_000, 10_000);
        for n in 0..20i64 {
            next(&mut s, 4_000_000, pushed(JobSpec::new("main", "t.py")));
            let token = format!("w{n}");
            let Outcome::Leased(id) = next(&mut s, 4_000_000, want(&token, "me", &["default"], 1, 0)) else { panic!() };
            let done = Event::Completed {
                id,
                token,
                output_tail: "y".repeat(2048),
                result: None,
                log_end: None,
                mark: None,
                run: None,
            };
            next(&mut s, 4_000_000, done);
        }
        let finished = s.jobs.values().filter(|j| j.record.state.is_terminal()).count();
        assert!((2..=4).contains(&finished), "{finished}");
        assert!(s.finished_bytes <= 10_000);
    }
}
