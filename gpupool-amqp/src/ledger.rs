//! The job ledger: every change to a job is an [`Event`] in one RabbitMQ
//! stream, and a job's state is the fold of those events ([`State::apply`]).
//!
//! The stream gives every event one place in one order, so every process
//! that replays it reaches the same state and the same verdict on each
//! event: which of two `Leased` events for a job won, whether a
//! `Completed` came from the current holder, which `Reclaim` of an expired
//! lease took effect. A publisher learns its event's verdict when its own
//! consumer applies it ([`Outcome`]). Nothing here talks to the broker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpupool_core::{AttemptError, FailureKind, JobId, JobRecord, JobSpec, JobState, Timestamp};
use serde::{Deserialize, Serialize};

/// One change, as stored in the ledger stream (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Event {
    Pushed {
        spec: Box<JobSpec>,
        dispatch: String,
    },
    /// `id` is absent when the work message named only its dispatch (a
    /// fresh push's, sent before the pusher had read its id back); the
    /// fold finds the job by that dispatch.
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
    },
    Failed {
        id: String,
        token: String,
        kind: FailureKind,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: String,
        output_tail: String,
        dispatch: String,
    },
    Cancelled {
        id: String,
        token: String,
        output_tail: String,
    },
    Released {
        id: String,
        token: String,
        dispatch: String,
    },
    Cancel {
        id: String,
    },
    Retry {
        id: String,
        dispatch: String,
    },
    Reclaim {
        id: String,
        token: String,
        dispatch: String,
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
    Unpark {
        id: String,
        dispatch: String,
    },
    Sync,
}

/// An event with its publisher's nonce and clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) nonce: String,
    /// Milliseconds since the epoch, the publisher's clock (for display).
    pub(crate) at: i64,
    #[serde(flatten)]
    pub(crate) event: Event,
}

/// What applying an event did, for the publisher waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A new job with this id.
    Pushed(String),
    /// The idempotency key was known: the first job's id.
    Existing(String),
    /// Applied.
    Ok,
    /// A lease won: the job's id.
    Leased(String),
    /// Heartbeat applied; whether a cancel was asked for.
    Beat { cancel: bool },
    /// The job went back to the queue: publish a work message with this
    /// dispatch nonce.
    Requeued(String),
    /// A failure ended the job.
    Failed,
    /// Not applied: the lease is not held, or a dispatch is stale.
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
    pub(crate) dispatch: Option<String>,
    pub(crate) attempt_limit: u32,
    /// Parked until a worker with this many GPUs reserves.
    pub(crate) parked: Option<u32>,
    /// When this process last saw the lease renewed, and for how long.
    pub(crate) renewed: Option<(Instant, Duration)>,
}

impl Job {
    fn held(&self, token: &str) -> bool {
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
        if state.is_terminal() {
            self.record.finished_at = Some(Timestamp(at));
        }
    }
}

/// The fold of the ledger.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) jobs: HashMap<String, Job>,
    /// Ids in push order (oldest first).
    pub(crate) order: Vec<String>,
    idempotency: HashMap<String, String>,
    /// Every failed attempt, oldest first.
    pub(crate) errors: Vec<AttemptError>,
    /// Jobs by the dispatch nonce of their push, while that dispatch is
    /// current (a push's work message may name only it).
    pushed: HashMap<String, String>,
    /// Registered workers, `seen_at` from the event's clock.
    pub(crate) workers: std::collections::BTreeMap<String, gpupool_core::WorkerInfo>,
    /// Verdicts by nonce, so that a publisher that sent an event twice (it
    /// lost its connection before seeing the first) gets the first verdict.
    seen: HashMap<String, Outcome>,
}

impl State {
    /// Applies one event found at `offset` in the stream.
    ///
    /// `now` is this process's clock; `wall_ms` its wall clock. A lease
    /// renewal counts from when it was published (`env.at`, never later than
    /// now), so a process that replays the ledger after a worker died sees
    /// that worker's lease as old as it is, not as fresh.
    pub(crate) fn apply(&mut self, offset: i64, env: Envelope, now: Instant, wall_ms: i64) -> Outcome {
        if let Some(first) = self.seen.get(&env.nonce) {
            return first.clone();
        }
        let age = Duration::from_millis(u64::try_from(wall_ms.saturating_sub(env.at)).unwrap_or(0));
        let renewed_at = now.checked_sub(age).unwrap_or(now);
        let outcome = self.apply_new(offset, env.event, env.at, renewed_at);
        self.seen.insert(env.nonce, outcome.clone());
        outcome
    }

    fn apply_new(&mut self, offset: i64, event: Event, at: i64, now: Instant) -> Outcome {
        match event {
            Event::Pushed { spec, dispatch } => {
                if let Some(id) = spec.idempotency_key.as_ref().and_then(|k| self.idempotency.get(k)) {
                    return Outcome::Existing(id.clone());
                }
                // Ids count from 1, as every backend's do.
                let id = (offset + 1).to_string();
                if let Some(key) = &spec.idempotency_key {
                    self.idempotency.insert(key.clone(), id.clone());
                }
                let attempt_limit = spec.max_attempts;
                let record = JobRecord::new(JobId::new(id.clone()), *spec, Timestamp(at));
                self.pushed.insert(dispatch.clone(), id.clone());
                self.jobs.insert(
                    id.clone(),
                    Job { record, token: None, dispatch: Some(dispatch), attempt_limit, parked: None, renewed: None },
                );
                self.order.push(id.clone());
                Outcome::Pushed(id)
            }
            Event::Leased { id, dispatch, token, worker, lease_ms } => {
                let Some(id) = id.or_else(|| self.pushed.get(&dispatch).cloned()) else { return Outcome::Rejected };
                let Some(job) = self.jobs.get_mut(&id) else { return Outcome::Rejected };
                if job.record.state != JobState::Queued || job.dispatch.as_deref() != Some(dispatch.as_str()) {
                    return Outcome::Rejected;
                }
                self.pushed.remove(&dispatch);
                let r = &mut job.record;
                r.state = JobState::Running;
                r.attempt += 1;
                r.worker = Some(worker);
                r.started_at = Some(Timestamp(at));
                r.finished_at = None;
                r.exit_code = None;
                r.signal = None;
                r.gpu_ids = None;
                job.token = Some(token);
                job.dispatch = None;
                job.renewed = Some((now, Duration::from_millis(lease_ms)));
                Outcome::Leased(id)
            }
            Event::Heartbeat { id, token, lease_ms } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.renewed = Some((now, Duration::from_millis(lease_ms)));
                    Outcome::Beat { cancel: job.record.cancel_requested }
                }
                _ => Outcome::Rejected,
            },
            Event::Started { id, token, commit, gpu_ids } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.record.commit = commit;
                    job.record.gpu_ids = Some(gpu_ids);
                    Outcome::Ok
                }
                _ => Outcome::Rejected,
            },
            Event::Completed { id, token, output_tail, result } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.end(JobState::Succeeded, at);
                    job.record.exit_code = Some(0);
                    job.record.output_tail = Some(output_tail);
                    job.record.result = result;
                    Outcome::Ok
                }
                _ => Outcome::Rejected,
            },
            Event::Failed { id, token, kind, exit_code, signal, message, output_tail, dispatch } => {
                let Some(job) = self.jobs.get_mut(&id) else { return Outcome::Rejected };
                if !job.held(&token) {
                    return Outcome::Rejected;
                }
                let failure = gpupool_core::Failure { kind, exit_code, signal, message, output_tail };
                let requeue = failure.requeues(job.record.attempt, job.attempt_limit);
                self.errors.push(AttemptError {
                    job_id: job.record.id.clone(),
                    attempt: job.record.attempt,
                    kind,
                    exit_code,
                    signal,
                    message: failure.message,
                    output_tail: failure.output_tail.clone(),
                    at: Timestamp(at),
                });
                job.record.exit_code = exit_code;
                job.record.signal = signal;
                job.record.output_tail = Some(failure.output_tail);
                if requeue {
                    job.end(JobState::Queued, at);
                    job.dispatch = Some(dispatch.clone());
                    Outcome::Requeued(dispatch)
                } else {
                    job.end(JobState::Failed, at);
                    Outcome::Failed
                }
            }
            Event::Cancelled { id, token, output_tail } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.end(JobState::Cancelled, at);
                    job.record.output_tail = Some(output_tail);
                    Outcome::Ok
                }
                _ => Outcome::Rejected,
            },
            Event::Released { id, token, dispatch } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.end(JobState::Queued, at);
                    job.record.attempt = job.record.attempt.saturating_sub(1);
                    job.dispatch = Some(dispatch.clone());
                    Outcome::Requeued(dispatch)
                }
                _ => Outcome::Rejected,
            },
            Event::Cancel { id } => match self.jobs.get_mut(&id) {
                None => Outcome::Missing,
                Some(job) => match job.record.state {
                    JobState::Queued => {
                        job.end(JobState::Cancelled, at);
                        if let Some(d) = job.dispatch.take() {
                            self.pushed.remove(&d);
                        }
                        Outcome::Cancelled
                    }
                    JobState::Running => {
                        job.record.cancel_requested = true;
                        Outcome::Requested
                    }
                    ended => Outcome::State(ended),
                },
            },
            Event::Retry { id, dispatch } => match self.jobs.get_mut(&id) {
                None => Outcome::Missing,
                Some(job) if matches!(job.record.state, JobState::Failed | JobState::Cancelled) => {
                    job.record.state = JobState::Queued;
                    job.record.cancel_requested = false;
                    job.record.finished_at = None;
                    job.attempt_limit = job.record.attempt.saturating_add(job.record.spec.max_attempts);
                    job.dispatch = Some(dispatch.clone());
                    Outcome::Requeued(dispatch)
                }
                Some(job) => Outcome::State(job.record.state),
            },
            Event::Reclaim { id, token, dispatch } => {
                let Some(job) = self.jobs.get_mut(&id) else { return Outcome::Rejected };
                if !job.held(&token) {
                    return Outcome::Rejected;
                }
                let failure = gpupool_core::Failure::new(
                    FailureKind::LeaseLost,
                    format!(
                        "lease expired: worker {} stopped heartbeating",
                        job.record.worker.as_deref().unwrap_or("unknown")
                    ),
                );
                self.errors.push(AttemptError {
                    job_id: job.record.id.clone(),
                    attempt: job.record.attempt,
                    kind: failure.kind,
                    exit_code: None,
                    signal: None,
                    message: failure.message.clone(),
                    output_tail: String::new(),
                    at: Timestamp(at),
                });
                if job.record.cancel_requested {
                    job.end(JobState::Cancelled, at);
                    Outcome::Ok
                } else if failure.requeues(job.record.attempt, job.attempt_limit) {
                    job.end(JobState::Queued, at);
                    job.dispatch = Some(dispatch.clone());
                    Outcome::Requeued(dispatch)
                } else {
                    job.end(JobState::Failed, at);
                    Outcome::Failed
                }
            }
            Event::Parked { id, token, gpus } => match self.jobs.get_mut(&id) {
                Some(job) if job.held(&token) => {
                    job.end(JobState::Queued, at);
                    job.record.attempt = job.record.attempt.saturating_sub(1);
                    job.dispatch = None;
                    job.parked = Some(gpus);
                    Outcome::Ok
                }
                _ => Outcome::Rejected,
            },
            Event::Unpark { id, dispatch } => match self.jobs.get_mut(&id) {
                Some(job) if job.record.state == JobState::Queued && job.parked.is_some() => {
                    job.parked = None;
                    job.dispatch = Some(dispatch.clone());
                    Outcome::Requeued(dispatch)
                }
                _ => Outcome::Rejected,
            },
            Event::Worker { mut info } => {
                info.seen_at = Timestamp(at);
                self.workers.insert(info.name.clone(), *info);
                Outcome::Ok
            }
            Event::WorkerGone { name } => {
                self.workers.remove(&name);
                Outcome::Ok
            }
            Event::Sync => Outcome::Ok,
        }
    }

    /// A job's failed attempts, oldest first.
    pub(crate) fn errors_of(&self, id: &str) -> Vec<AttemptError> {
        self.errors.iter().filter(|e| e.job_id.as_str() == id).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str, event: Event) -> Envelope {
        Envelope { nonce: n.to_owned(), at: 1, event }
    }

    #[test]
    fn one_lease_wins_and_stale_holders_are_refused() {
        let now = Instant::now();
        let mut s = State::default();
        let spec = Box::new(JobSpec::new("main", "t.py"));
        let id = match s.apply(7, env("a", Event::Pushed { spec, dispatch: "d1".into() }), now, 1) {
            Outcome::Pushed(id) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(id, "8", "the id is the stream offset + 1");
        let lease = |token: &str, dispatch: &str| Event::Leased {
            id: Some(id.clone()),
            dispatch: dispatch.into(),
            token: token.into(),
            worker: "w".into(),
            lease_ms: 1000,
        };
        assert_eq!(s.apply(8, env("b", lease("t1", "d1")), now, 1), Outcome::Leased(id.clone()));
        assert_eq!(s.apply(9, env("c", lease("t2", "d1")), now, 1), Outcome::Rejected, "a redelivery loses");
        // The same nonce again gets the first verdict.
        assert_eq!(s.apply(10, env("b", lease("t1", "d1")), now, 1), Outcome::Leased(id.clone()));
        let reclaim = Event::Reclaim { id: id.clone(), token: "t1".into(), dispatch: "d2".into() };
        assert_eq!(s.apply(11, env("d", reclaim.clone()), now, 1), Outcome::Requeued("d2".into()));
        assert_eq!(
            s.apply(12, env("e", Event::Reclaim { id: id.clone(), token: "t1".into(), dispatch: "d3".into() }), now, 1),
            Outcome::Rejected,
            "only one reclaim takes effect"
        );
        let done = Event::Completed { id: id.clone(), token: "t1".into(), output_tail: String::new(), result: None };
        assert_eq!(s.apply(13, env("f", done), now, 1), Outcome::Rejected, "the old holder is fenced");
        assert_eq!(s.apply(14, env("g", lease("t3", "d2")), now, 1), Outcome::Leased(id.clone()));
        assert_eq!(s.jobs[&id].record.attempt, 2);
        assert_eq!(s.errors_of(&id).len(), 1);
        assert_eq!(s.errors_of(&id)[0].kind, FailureKind::LeaseLost);
    }

    #[test]
    fn a_push_work_message_may_name_only_its_dispatch() {
        let now = Instant::now();
        let mut s = State::default();
        let spec = Box::new(JobSpec::new("main", "t.py"));
        let Outcome::Pushed(id) = s.apply(3, env("a", Event::Pushed { spec, dispatch: "p1".into() }), now, 1) else {
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
        // An id-less Leased round-trips through JSON without an `id` field.
        let text = serde_json::to_string(&env("d", lease("t3", "p1"))).unwrap();
        assert!(!text.contains("\"id\""), "{text}");
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event, lease("t3", "p1"));
    }
}
