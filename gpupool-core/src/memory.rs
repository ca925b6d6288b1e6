//! [`MemoryQueue`]: the whole queue in this process's memory. For tests,
//! benchmarks and a worker that pushes its own jobs (`memory://`). Nothing
//! survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::job::{AttemptError, JobId, JobRecord, JobSpec, JobState, Timestamp};
use crate::queue::{
    CancelOutcome, Capabilities, Completion, FailOutcome, Failure, Heartbeat, Lease, ListFilter, Pushed, Queue,
    ReserveRequest, RunInfo, WorkerInfo, WorkerRegistry,
};
use crate::rows::{ExpiredLease, failed_attempt, same_job};
use crate::{Error, Result};

/// How often a waiting `reserve` looks for expired leases.
const EXPIRY_POLL: Duration = Duration::from_millis(100);

/// An in-process queue. Cheap to clone: clones share the same jobs.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    pushed: Notify,
}

#[derive(Debug, Default)]
struct State {
    next_id: i64,
    jobs: BTreeMap<i64, Entry>,
    errors: Vec<AttemptError>,
    idempotency: HashMap<String, i64>,
    workers: BTreeMap<String, WorkerInfo>,
    blobs: HashMap<String, Vec<u8>>,
}

#[derive(Debug)]
struct Entry {
    record: JobRecord,
    token: Option<String>,
    expires_at: Option<Timestamp>,
    /// The shipped log's kept text, and the offset of its first byte.
    log: String,
    log_start: u64,
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic inside one of our own short critical
        // sections; the data is still consistent (every section writes at
        // its end), so keep going.
        crate::sync::lock(&self.inner.state)
    }

    fn try_reserve(&self, req: &ReserveRequest) -> Option<Lease> {
        let now = Timestamp::now();
        let mut st = self.lock();
        st.expire_leases(now);
        let id = st.next_for(req, now)?;
        st.lease(id, req, now)
    }

    /// Runs `f` on the entry the lease holds (and the error list), or
    /// returns `LeaseLost`.
    fn with_held<T>(&self, lease: &Lease, f: impl FnOnce(&mut Entry, &mut Vec<AttemptError>) -> T) -> Result<T> {
        let lost = || Error::lease_lost(lease.id());
        let id = lease.id().as_i64().map_err(|_| lost())?;
        let mut st = self.lock();
        let State { jobs, errors, .. } = &mut *st;
        match jobs.get_mut(&id) {
            Some(e) if e.record.state == JobState::Running && e.token.as_deref() == Some(lease.token.as_str()) => {
                Ok(f(e, errors))
            }
            _ => Err(lost()),
        }
    }

    fn entry<'a>(st: &'a mut State, id: &JobId) -> Result<(i64, &'a mut Entry)> {
        let n = id.as_i64()?;
        let e = st.jobs.get_mut(&n).ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        Ok((n, e))
    }
}

#[async_trait]
impl crate::RunLogs for MemoryQueue {
    async fn ship(&self, lease: &Lease, progress: &crate::Progress) -> Result<()> {
        self.with_held(lease, |e, _| {
            if let Some(result) = &progress.result {
                e.record.result = Some(result.clone());
            }
            e.log.push_str(&progress.log);
            let cap = usize::try_from(crate::LOG_CAP_BYTES).unwrap_or(usize::MAX);
            if e.log.len() > cap {
                // Drop whole lines from the front.
                let over = e.log.len() - cap;
                let cut = e.log[over..].find('\n').map_or(e.log.len(), |i| over + i + 1);
                e.log.drain(..cut);
                e.log_start += cut as u64;
            }
        })
    }

    async fn read_log(&self, id: &JobId, from: u64) -> Result<crate::LogPage> {
        let mut st = self.lock();
        let (_, e) = Self::entry(&mut st, id)?;
        let end = e.log_start + e.log.len() as u64;
        let start = from.clamp(e.log_start, end);
        let mut at = usize::try_from(start - e.log_start).unwrap_or(0);
        while !e.log.is_char_boundary(at) {
            at += 1;
        }
        let upto = (at + (1 << 20)).min(e.log.len());
        let upto = (upto..=e.log.len()).find(|i| e.log.is_char_boundary(*i)).unwrap_or(e.log.len());
        Ok(crate::LogPage {
            text: e.log[at..upto].to_owned(),
            next: e.log_start + upto as u64,
            dropped: e.log_start.saturating_sub(from),
        })
    }
}

impl Entry {
    /// Ends a lease: the job leaves `running`.
    fn finish(&mut self, state: JobState, output_tail: Option<String>) {
        self.record.state = state;
        self.token = None;
        self.expires_at = None;
        if state.is_terminal() {
            self.record.finished_at = Some(Timestamp::now());
        }
        if output_tail.is_some() {
            self.record.output_tail = output_tail;
        }
    }
}

impl State {
    /// The job a reserve takes next: the first of the request's queues
    /// that has one that fits, then the highest priority, then the oldest.
    fn next_for(&self, req: &ReserveRequest, now: Timestamp) -> Option<i64> {
        req.queues.iter().find_map(|queue| {
            self.jobs
                .iter()
                .filter(|(_, e)| {
                    e.record.state == JobState::Queued
                        && &e.record.spec.queue == queue
                        && req.fits(&e.record.spec)
                        && e.record.not_before.is_none_or(|t| t <= now)
                })
                // Highest priority, then the oldest (smallest id).
                .min_by_key(|(id, e)| (std::cmp::Reverse(e.record.spec.priority), **id))
                .map(|(id, _)| *id)
        })
    }

    /// Leases the queued job `id` to the request.
    fn lease(&mut self, id: i64, req: &ReserveRequest, now: Timestamp) -> Option<Lease> {
        let errors = self.errors_of(id);
        let entry = self.jobs.get_mut(&id)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = now.plus(req.lease);
        let r = &mut entry.record;
        r.state = JobState::Running;
        r.attempt += 1;
        r.worker = Some(req.worker.clone());
        r.started_at = Some(now);
        r.finished_at = None;
        r.exit_code = None;
        r.signal = None;
        r.gpu_ids = None;
        entry.token = Some(token.clone());
        entry.expires_at = Some(expires_at);
        let mut job = entry.record.clone();
        job.errors = errors;
        Some(Lease { job, token, expires_at })
    }

    fn errors_of(&self, id: i64) -> Vec<AttemptError> {
        let id = JobId::from(id);
        self.errors.iter().filter(|e| e.job_id == id).cloned().collect()
    }

    /// Ends every expired lease: a `lease_lost` record, then queued, failed
    /// or cancelled.
    fn expire_leases(&mut self, now: Timestamp) {
        let mut lost = Vec::new();
        for (id, e) in &mut self.jobs {
            if e.record.state != JobState::Running || e.expires_at.is_none_or(|t| t >= now) {
                continue;
            }
            let expired = ExpiredLease::new(
                e.record.worker.as_deref(),
                e.record.cancel_requested,
                e.record.attempt,
                e.record.attempt_limit,
            );
            lost.push(failed_attempt(&expired.failure, JobId::from(*id), e.record.attempt, now));
            e.token = None;
            e.expires_at = None;
            e.record.state = expired.state;
            if e.record.state.is_terminal() {
                e.record.finished_at = Some(now);
            }
        }
        self.errors.extend(lost);
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn init(&self) -> Result<()> {
        Ok(())
    }

    async fn exists(&self) -> Result<bool> {
        Ok(true) // it lives in this process, set up when made
    }

    async fn add(&self, spec: JobSpec) -> Result<Pushed> {
        spec.validate()?;
        let id = {
            let mut st = self.lock();
            if let Some(existing) = spec.idempotency_key.as_ref().and_then(|k| st.idempotency.get(k)).copied() {
                let stored = st.jobs.get(&existing).map(|e| &e.record.spec);
                return match stored {
                    Some(stored) => same_job(JobId::from(existing), stored, &spec),
                    None => Ok(Pushed::Existing(JobId::from(existing))),
                };
            }
            st.next_id += 1;
            let id = st.next_id;
            if let Some(key) = &spec.idempotency_key {
                st.idempotency.insert(key.clone(), id);
            }
            let record = JobRecord::new(JobId::from(id), spec, Timestamp::now());
            st.jobs.insert(id, Entry { record, token: None, expires_at: None, log: String::new(), log_start: 0 });
            id
        };
        self.inner.pushed.notify_waiters();
        Ok(Pushed::New(JobId::from(id)))
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<Option<Lease>> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let notified = self.inner.pushed.notified();
            if let Some(lease) = self.try_reserve(req) {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let nap = (deadline - now).min(EXPIRY_POLL);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    /// The first as `reserve` gives it, then the next ones while the batch
    /// admits them, all under one lock.
    async fn reserve_many(&self, req: &ReserveRequest, max: usize) -> Result<Vec<Lease>> {
        let Some(first) = self.reserve(req).await? else { return Ok(Vec::new()) };
        let mut batch = crate::Batch::new(req, max);
        batch.admit(first.job.spec.gpus_needed(req.gpu_host));
        let mut leases = vec![first];
        let now = Timestamp::now();
        let mut st = self.lock();
        while let Some(id) = st.next_for(req, now) {
            let need = st.jobs.get(&id).map_or(0, |e| e.record.spec.gpus_needed(req.gpu_host));
            if !batch.admit(need) {
                break;
            }
            let Some(lease) = st.lease(id, req, now) else { break };
            leases.push(lease);
        }
        Ok(leases)
    }

    async fn heartbeat(&self, lease: &Lease, extend: Duration) -> Result<Heartbeat> {
        self.with_held(lease, |e, _| {
            e.expires_at = Some(Timestamp::now().plus(extend));
            if e.record.cancel_requested { Heartbeat::CancelRequested } else { Heartbeat::Extended }
        })
    }

    async fn started(&self, lease: &Lease, info: &RunInfo) -> Result<()> {
        self.with_held(lease, |e, _| {
            e.record.commit.clone_from(&info.commit);
            e.record.gpu_ids = Some(info.gpu_ids.clone());
        })
    }

    async fn complete(&self, lease: &Lease, mut done: Completion) -> Result<()> {
        done.record_first(self, lease).await?;
        self.with_held(lease, |e, _| {
            e.finish(JobState::Succeeded, Some(done.output_tail));
            e.record.exit_code = Some(0);
            e.record.result = done.result;
        })
    }

    async fn fail(&self, lease: &Lease, failure: Failure) -> Result<FailOutcome> {
        let outcome = self.with_held(lease, |e, errors| {
            let requeue = failure.requeues(&e.record.spec, e.record.attempt, e.record.attempt_limit);
            let now = Timestamp::now();
            errors.push(failed_attempt(&failure, e.record.id.clone(), e.record.attempt, now));
            if requeue {
                e.record.not_before = failure.retry_at(&e.record.spec, e.record.attempt, now);
            }
            e.finish(if requeue { JobState::Queued } else { JobState::Failed }, Some(failure.output_tail));
            e.record.exit_code = failure.exit_code;
            e.record.signal = failure.signal;
            if requeue { FailOutcome::Requeued } else { FailOutcome::Failed }
        })?;
        if outcome == FailOutcome::Requeued {
            self.inner.pushed.notify_waiters();
        }
        Ok(outcome)
    }

    async fn report_cancelled(&self, lease: &Lease, output_tail: String) -> Result<()> {
        self.with_held(lease, |e, _| e.finish(JobState::Cancelled, Some(output_tail)))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.with_held(lease, |e, _| {
            e.finish(JobState::Queued, None);
            e.record.attempt = e.record.attempt.saturating_sub(1);
        })?;
        self.inner.pushed.notify_waiters();
        Ok(())
    }

    async fn defer(&self, lease: &Lease, pause: Duration) -> Result<()> {
        let until = Timestamp::now().plus(pause);
        self.with_held(lease, |e, _| {
            e.finish(JobState::Queued, None);
            e.record.attempt = e.record.attempt.saturating_sub(1);
            e.record.not_before = Some(until);
        })
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome> {
        let mut st = self.lock();
        let (_, e) = Self::entry(&mut st, id)?;
        Ok(match e.record.state {
            JobState::Queued => {
                e.record.state = JobState::Cancelled;
                e.record.finished_at = Some(Timestamp::now());
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                e.record.cancel_requested = true;
                CancelOutcome::Requested
            }
            ended => CancelOutcome::AlreadyEnded(ended),
        })
    }

    async fn retry(&self, id: &JobId) -> Result<()> {
        {
            let mut st = self.lock();
            let (_, e) = Self::entry(&mut st, id)?;
            match e.record.state {
                JobState::Failed | JobState::Cancelled => {
                    e.record.state = JobState::Queued;
                    e.record.cancel_requested = false;
                    e.record.finished_at = None;
                    e.record.not_before = None;
                    e.record.attempt_limit = e.record.attempt.saturating_add(e.record.spec.attempts());
                }
                state => {
                    return Err(Error::not_retryable(id, state));
                }
            }
        }
        self.inner.pushed.notify_waiters();
        Ok(())
    }

    async fn get(&self, id: &JobId) -> Result<JobRecord> {
        let mut st = self.lock();
        let (n, e) = Self::entry(&mut st, id)?;
        let mut record = e.record.clone();
        record.errors = st.errors_of(n);
        Ok(record)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>> {
        let st = self.lock();
        Ok(st
            .jobs
            .values()
            .rev()
            .filter(|e| filter.state.is_none_or(|s| e.record.state == s))
            .filter(|e| filter.queue.as_ref().is_none_or(|q| &e.record.spec.queue == q))
            .skip(usize::try_from(filter.offset).unwrap_or(usize::MAX))
            .take(filter.limit as usize)
            .map(|e| e.record.clone())
            .collect())
    }

    async fn errors(&self, job: Option<&JobId>, limit: u32) -> Result<Vec<AttemptError>> {
        let st = self.lock();
        Ok(st
            .errors
            .iter()
            .rev()
            .filter(|e| job.is_none_or(|j| &e.job_id == j))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn record_artifacts(&self, id: &JobId, artifacts: &crate::Artifacts) -> Result<()> {
        let mut st = self.lock();
        let (_, e) = Self::entry(&mut st, id)?;
        if artifacts.replaces(e.record.artifacts.as_ref()) {
            e.record.artifacts = Some(artifacts.clone());
        }
        Ok(())
    }

    async fn park(&self, lease: &Lease, _gpus: u32) -> Result<()> {
        // Reserve filters by GPUs: a smaller worker is never offered the job.
        self.release(lease).await
    }

    async fn stop_reserving(&self, _worker: &str) -> Result<()> {
        // Reserve keeps nothing between calls.
        Ok(())
    }

    fn worker_registry(&self) -> Option<&dyn WorkerRegistry> {
        Some(self)
    }

    fn run_logs(&self) -> Option<&dyn crate::RunLogs> {
        Some(self)
    }

    fn blobs(&self) -> Option<&dyn crate::Blobs> {
        Some(self)
    }
}

#[async_trait]
impl crate::Blobs for MemoryQueue {
    async fn put_blob(&self, hash: &str, bytes: &[u8]) -> Result<()> {
        self.lock().blobs.entry(hash.to_owned()).or_insert_with(|| bytes.to_vec());
        Ok(())
    }

    async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().blobs.get(hash).cloned())
    }
}

#[async_trait]
impl WorkerRegistry for MemoryQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let mut info = info.clone();
        info.seen_at = Timestamp::now();
        self.lock().workers.insert(info.name.clone(), info);
        Ok(())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        self.lock().workers.remove(name);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let now = Timestamp::now();
        let mut st = self.lock();
        st.workers.retain(|_, w| !w.gone_at(now));
        Ok(st.workers.values().map(|w| WorkerInfo { lost: w.lost_at(now), ..w.clone() }).collect())
    }
}

/// The conformance suite on [`MemoryQueue`]: every plain `cargo test` runs it.
#[cfg(test)]
mod conformance_tests {
    use std::sync::Arc;

    use super::MemoryQueue;
    use crate::Queue;

    async fn setup() -> Option<((), Arc<dyn Queue>)> {
        Some(((), Arc::new(MemoryQueue::new())))
    }

    async fn teardown(_: (), _: Arc<dyn Queue>) {}

    crate::conformance_tests!(setup, teardown);
}
