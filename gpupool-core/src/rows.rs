//! Jobs as a SQL backend stores them: the plain column values of a job row
//! ([`JobRow`]) and of a failed-attempt row ([`ErrorRow`]), the one way each
//! becomes a [`JobRecord`] or an [`AttemptError`], and the rules a backend
//! writes by: a statement fenced by a lease token ([`fenced`]), the record
//! of a failed attempt ([`failed_attempt`]) and what an expired lease leaves
//! behind ([`ExpiredLease`]).
//!
//! Nothing here knows a driver. Column names and SQL types differ between
//! dialects (`signal` or `term_signal`, a BIGINT of milliseconds or a
//! DATETIME read back as one, a boolean or a TINYINT), so each backend
//! decodes its own row into these plain values and leaves the parsing, the
//! range checks and the error messages to this module. The SQLite and MySQL
//! backends use it (the memory and RabbitMQ backends use its expiry rule and
//! attempt record); a backend of your own can too. Statements, transactions
//! and locks stay in the backends.
//!
//! ```
//! use gpupool_core::rows::JobRow;
//! use gpupool_core::{JobSpec, JobState};
//!
//! # fn main() -> gpupool_core::Result<()> {
//! // What a driver decoded from `SELECT id, state, attempt, spec, … FROM jobs`.
//! let row = JobRow {
//!     id: 7,
//!     state: "running".into(),
//!     attempt: 1,
//!     spec: JobSpec::new("main", "train.py").validated_json()?,
//!     gpu_ids: Some("[0, 1]".into()),
//!     created_at: 1_700_000_000_000,
//!     started_at: Some(1_700_000_060_000),
//!     ..JobRow::default()
//! };
//! let job = row.into_record("mybackend")?;
//! assert_eq!((job.id.as_str(), job.state, job.gpu_ids), ("7", JobState::Running, Some(vec![0, 1])));
//! # Ok(())
//! # }
//! ```

use serde::de::DeserializeOwned;

use crate::{
    AttemptError, Error, Failure, FailureKind, JobId, JobRecord, JobSpec, JobState, Lease, Pushed, Result, Timestamp,
    WorkerInfo,
};

/// A job's row, decoded into plain values: what [`JobRow::into_record`]
/// turns into a [`JobRecord`] (without its errors).
///
/// Times are milliseconds since the Unix epoch; JSON columns hold the text
/// `serde_json` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRow {
    /// The job's id.
    pub id: i64,
    /// The state's name (`queued`, `running`, …; [`JobState::as_str`]).
    pub state: String,
    /// Runs started so far.
    pub attempt: i64,
    /// The attempt after which a failure ends the job; `None` (a backend
    /// that does not read it): the spec's `max_attempts`.
    pub attempt_limit: Option<i64>,
    /// The pushed job as the JSON text of [`JobSpec::validated_json`].
    pub spec: String,
    /// The commit the ref resolved to on the last run.
    pub commit: Option<String>,
    /// The worker running it or that ran it last.
    pub worker: Option<String>,
    /// The GPUs given to the last run, as a JSON array.
    pub gpu_ids: Option<String>,
    /// Exit code of the last run that exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the last run.
    pub signal: Option<i32>,
    /// End of the last run's output.
    pub output_tail: Option<String>,
    /// The result a successful run reported, as JSON.
    pub result: Option<String>,
    /// Where the last run's files are, as the JSON of
    /// [`crate::Artifacts`].
    pub artifacts: Option<String>,
    /// Whether a cancel was asked for while it ran.
    pub cancel_requested: bool,
    /// When it was pushed.
    pub created_at: i64,
    /// When its last run started.
    pub started_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
    /// The earliest start while it is held back (`not_before`, a retry's
    /// backoff, a wait for `after`); `None`: none.
    pub not_before: Option<i64>,
}

impl JobRow {
    /// The record this row stores, with no errors (a backend reads those
    /// from its own table and sets [`JobRecord::errors`]).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (naming `backend`) if the spec, the state, the
    /// attempt count or a JSON column does not read back: the row was
    /// written by something else or is damaged.
    pub fn into_record(self, backend: &'static str) -> Result<JobRecord> {
        let spec = JobSpec::from_stored_json(&self.spec)?;
        let mut r = JobRecord::new(JobId::from(self.id), spec, Timestamp(self.created_at));
        r.state = state_column(backend, &self.state)?;
        r.attempt = u32_column(backend, "attempt", self.attempt)?;
        if let Some(limit) = self.attempt_limit {
            r.attempt_limit = u32_column(backend, "attempt_limit", limit)?;
        }
        r.commit = self.commit;
        r.worker = self.worker;
        r.gpu_ids = self.gpu_ids.map(|text| json_column(backend, "gpu_ids", &text)).transpose()?;
        r.exit_code = self.exit_code;
        r.signal = self.signal;
        r.output_tail = self.output_tail;
        r.result = self.result.map(|text| json_column(backend, "result", &text)).transpose()?;
        r.artifacts = self.artifacts.map(|text| json_column(backend, "artifacts", &text)).transpose()?;
        r.cancel_requested = self.cancel_requested;
        r.started_at = self.started_at.map(Timestamp);
        r.finished_at = self.finished_at.map(Timestamp);
        r.not_before = self.not_before.map(Timestamp);
        Ok(r)
    }
}

/// Why a job read back for running must not run: its stored spec fails
/// the checks of push (whoever can write to the backend must not get past
/// them: an `LD_PRELOAD` written straight into the store runs nowhere).
/// Backends check this as they lease a job, end one that fails `failed`
/// (kind `invalid`, with this message) and go on to the jobs behind it; the
/// worker checks again before it runs one.
pub fn unfit(spec: &JobSpec) -> Option<String> {
    spec.validate().err().map(|e| {
        let why = match e {
            Error::InvalidJob(m) => m,
            other => other.to_string(),
        };
        format!("the stored job fails the checks of push: {why}")
    })
}

/// A job read back for running, checked: its record, or why it must not
/// run (it does not read: [`unreadable`]; it fails the checks of push:
/// [`unfit`]). The SQL backends end such a job `failed`, kind `invalid`,
/// with this message, and go on to the jobs behind it.
pub fn runnable(read: Result<JobRecord>) -> std::result::Result<JobRecord, String> {
    let job = read.map_err(|e| unreadable(&e))?;
    match unfit(&job.spec) {
        Some(why) => Err(why),
        None => Ok(job),
    }
}

/// The message of a stored job that does not read (edited by hand, or
/// written by a newer gpupool).
pub fn unreadable(why: &dyn std::fmt::Display) -> String {
    format!("the stored job does not read: {why}")
}

/// A failed attempt's row, decoded into plain values: what
/// [`ErrorRow::into_error`] turns into an [`AttemptError`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorRow {
    /// The job.
    pub job_id: i64,
    /// Which attempt failed.
    pub attempt: i64,
    /// The kind's name (`exit`, `lease_lost`, …; [`FailureKind::as_str`]).
    pub kind: String,
    /// The exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// The signal, if one killed the process.
    pub signal: Option<i32>,
    /// A readable reason.
    pub message: String,
    /// The end of the output.
    pub output_tail: String,
    /// When the failure was recorded, in milliseconds since the Unix epoch.
    pub at: i64,
}

impl ErrorRow {
    /// The failed attempt this row stores.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (naming `backend`) if the attempt count is out of
    /// range, and the error of [`FailureKind`]'s `FromStr` for an unknown
    /// kind.
    pub fn into_error(self, backend: &'static str) -> Result<AttemptError> {
        Ok(AttemptError {
            job_id: JobId::from(self.job_id),
            attempt: u32_column(backend, "attempt", self.attempt)?,
            kind: self.kind.parse::<FailureKind>()?,
            exit_code: self.exit_code,
            signal: self.signal,
            message: self.message,
            output_tail: self.output_tail,
            at: Timestamp(self.at),
        })
    }
}

/// A stored state's name as a [`JobState`].
///
/// # Errors
///
/// [`Error::Backend`] (naming `backend`) for a name no state has.
pub fn state_column(backend: &'static str, text: &str) -> Result<JobState> {
    text.parse().map_err(|_| Error::backend(backend, format!("unknown state `{text}` in the jobs table")))
}

/// A stored count (an attempt, an attempt limit) as a `u32`; `column`
/// names it in the error.
///
/// # Errors
///
/// [`Error::Backend`] (naming `backend`) if the value is negative or too
/// large.
pub fn u32_column(backend: &'static str, column: &str, value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::backend(backend, format!("{column} {value} is out of range")))
}

/// A stored JSON text as a `T`; `column` names it in the error.
///
/// # Errors
///
/// [`Error::Backend`] (naming `backend`) if the text is not JSON of a `T`.
pub fn json_column<T: DeserializeOwned>(backend: &'static str, column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::backend(backend, format!("{column}: {e}")))
}

/// A worker's stored registration (the JSON text of its [`WorkerInfo`]) as
/// last seen at `seen_at`, with [`WorkerInfo::lost`] decided at `now` (the
/// clock the backend keeps time by).
///
/// # Errors
///
/// [`Error::Backend`] (naming `backend`) if the text is not a worker record.
pub fn worker_info(backend: &'static str, text: &str, seen_at: Timestamp, now: Timestamp) -> Result<WorkerInfo> {
    let mut w: WorkerInfo = json_column(backend, "worker record", text)?;
    w.seen_at = seen_at;
    w.lost = w.lost_at(now);
    Ok(w)
}

/// What [`Queue::add`](crate::Queue::add) answers when the pushed job's
/// `idempotency_key` is already taken by job `existing`, whose stored spec
/// is `stored`: [`Pushed::Existing`] when it is the pushed job, else
/// [`Error::IdempotencyConflict`] naming the key (a key means "this run",
/// so reusing it for other arguments is a mistake to report, not to hide).
///
/// # Errors
///
/// [`Error::IdempotencyConflict`] when `stored` differs from `pushed`.
pub fn same_job(existing: JobId, stored: &JobSpec, pushed: &JobSpec) -> Result<Pushed> {
    if stored == pushed {
        return Ok(Pushed::Existing(existing));
    }
    Err(Error::IdempotencyConflict {
        key: pushed.idempotency_key.clone().unwrap_or_default(),
        id: existing.to_string(),
    })
}

/// Splits registered workers into those [`WorkerRegistry::workers`]
/// shows and those gone ([`WorkerInfo::gone_at`]), which it deletes: by
/// name and `seen_at`, so that a worker that reported again meanwhile stays.
///
/// [`WorkerRegistry::workers`]: crate::WorkerRegistry::workers
pub fn split_gone(workers: Vec<WorkerInfo>, now: Timestamp) -> (Vec<WorkerInfo>, Vec<WorkerInfo>) {
    workers.into_iter().partition(|w| !w.gone_at(now))
}

/// The outcome of a statement fenced by `lease`, one that matches the job's
/// row only while the lease holds it (`… WHERE id = ? AND lease_token = ?
/// AND state = 'running'`), from the number of rows it matched.
///
/// # Errors
///
/// [`Error::LeaseLost`] unless exactly one row matched.
pub fn fenced(rows_matched: u64, lease: &Lease) -> Result<()> {
    if rows_matched == 1 { Ok(()) } else { Err(Error::lease_lost(lease.id())) }
}

/// The record of `failure` on `attempt` of job `job_id`, at `at`: what
/// [`Queue::fail`](crate::Queue::fail) and an expired lease add to the
/// job's errors.
pub fn failed_attempt(failure: &Failure, job_id: JobId, attempt: u32, at: Timestamp) -> AttemptError {
    AttemptError {
        job_id,
        attempt,
        kind: failure.kind,
        exit_code: failure.exit_code,
        signal: failure.signal,
        message: failure.message.clone(),
        output_tail: failure.output_tail.clone(),
        at,
    }
}

/// What ending an expired lease writes: the lost attempt, and where the job
/// goes next. Every backend applies this rule; a SQL backend may apply it
/// in one set-based statement, as long as it writes the same.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiredLease {
    /// The attempt's failure: kind [`FailureKind::LeaseLost`], a message
    /// naming the worker, no exit code, signal or output.
    pub failure: Failure,
    /// `cancelled` if a cancel was asked for, else `queued` while attempts
    /// are left ([`Failure::requeues`]), else `failed`.
    pub state: JobState,
}

impl ExpiredLease {
    /// The rule for a job whose lease expired, from its columns: the
    /// `worker` that held it (`unknown` if none was recorded), whether a
    /// cancel was requested, and its attempt count and limit.
    pub fn new(worker: Option<&str>, cancel_requested: bool, attempt: u32, attempt_limit: u32) -> Self {
        let failure = Failure::new(
            FailureKind::LeaseLost,
            format!("lease expired: worker {} stopped heartbeating", worker.unwrap_or("unknown")),
        );
        let state = if cancel_requested {
            JobState::Cancelled
        } else if attempt < attempt_limit {
            // `lease_lost` is never the job's fault: retried whether or not
            // the job names `max_attempts`.
            JobState::Queued
        } else {
            JobState::Failed
        };
        ExpiredLease { failure, state }
    }
}

/// A [`crate::LogPage`] from `from` on, out of stored log pieces
/// (`start`, `len`, `text`) in order, the first of which ends after
/// `from`: what every SQL backend's `read_log` returns.
pub fn log_page(from: u64, pieces: &[(i64, i64, String)]) -> crate::LogPage {
    let mut page = crate::LogPage { next: from, ..crate::LogPage::default() };
    for (i, (start, len, text)) in pieces.iter().enumerate() {
        let (start, len) = (u64::try_from(*start).unwrap_or(0), u64::try_from(*len).unwrap_or(0));
        if i == 0 {
            page.dropped = start.saturating_sub(from);
        }
        let mut skip = usize::try_from(from.saturating_sub(start)).unwrap_or(usize::MAX).min(text.len());
        while !text.is_char_boundary(skip) {
            skip += 1;
        }
        page.text.push_str(&text[skip..]);
        page.next = start + len;
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> JobRow {
        JobRow {
            id: 3,
            state: "failed".into(),
            attempt: 2,
            attempt_limit: Some(5),
            spec: JobSpec::new("main", "train.py").validated_json().unwrap(),
            commit: Some("abc".into()),
            worker: Some("gpu1:42".into()),
            gpu_ids: Some("[1,3]".into()),
            exit_code: Some(1),
            signal: None,
            output_tail: Some("boom".into()),
            result: Some(r#"{"loss":0.5}"#.into()),
            artifacts: Some(r#"{"attempt":2,"location":"h:/o","stored":false,"files":[]}"#.into()),
            cancel_requested: true,
            created_at: 10,
            started_at: Some(20),
            finished_at: Some(30),
            not_before: None,
        }
    }

    #[test]
    fn a_job_row_reads_back_every_column() {
        let r = row().into_record("test").unwrap();
        assert_eq!(r.id, JobId::from(3));
        assert_eq!((r.state, r.attempt, r.attempt_limit), (JobState::Failed, 2, 5));
        assert_eq!((r.commit.as_deref(), r.worker.as_deref()), (Some("abc"), Some("gpu1:42")));
        assert_eq!(r.gpu_ids, Some(vec![1, 3]));
        assert_eq!((r.exit_code, r.signal, r.output_tail.as_deref()), (Some(1), None, Some("boom")));
        assert_eq!(r.result, Some(serde_json::json!({"loss": 0.5})));
        assert_eq!(r.artifacts.map(|a| (a.attempt, a.location)), Some((2, "h:/o".to_owned())));
        assert!(r.cancel_requested);
        assert_eq!(
            (r.created_at, r.started_at, r.finished_at),
            (Timestamp(10), Some(Timestamp(20)), Some(Timestamp(30)))
        );
        assert_eq!(r.spec, JobSpec::new("main", "train.py"));
        assert!(r.errors.is_empty());
    }

    #[test]
    fn a_damaged_job_row_names_the_backend_and_the_column() {
        let cases = [
            (JobRow { state: "lost".into(), ..row() }, "test backend error: unknown state `lost` in the jobs table"),
            (JobRow { attempt: -1, ..row() }, "test backend error: attempt -1 is out of range"),
            (JobRow { gpu_ids: Some("[-1]".into()), ..row() }, "test backend error: gpu_ids: "),
            (JobRow { result: Some("{".into()), ..row() }, "test backend error: result: "),
            (JobRow { artifacts: Some("[]".into()), ..row() }, "test backend error: artifacts: "),
        ];
        for (bad, message) in cases {
            let e = bad.into_record("test").unwrap_err();
            assert!(matches!(e, Error::Backend { backend: "test", .. }), "{e:?}");
            assert!(e.to_string().starts_with(message), "{e} should start with {message}");
        }
        assert!(JobRow { spec: "{".into(), ..row() }.into_record("test").is_err());
    }

    #[test]
    fn an_error_row_reads_back_every_column() {
        let row = ErrorRow {
            job_id: 3,
            attempt: 1,
            kind: "signal".into(),
            exit_code: None,
            signal: Some(9),
            message: "killed".into(),
            output_tail: "tail".into(),
            at: 40,
        };
        let e = row.clone().into_error("test").unwrap();
        let failure =
            Failure { signal: Some(9), output_tail: "tail".into(), ..Failure::new(FailureKind::Signal, "killed") };
        assert_eq!(e, failed_attempt(&failure, JobId::from(3), 1, Timestamp(40)));
        assert_eq!(
            (e.exit_code, e.signal, e.message.as_str(), e.output_tail.as_str()),
            (None, Some(9), "killed", "tail")
        );
        assert!(ErrorRow { kind: "bogus".into(), ..row.clone() }.into_error("test").is_err());
        let e = ErrorRow { attempt: i64::from(u32::MAX) + 1, ..row }.into_error("test").unwrap_err();
        assert_eq!(e.to_string(), "test backend error: attempt 4294967296 is out of range");
    }

    #[test]
    fn a_worker_record_is_lost_after_three_silent_heartbeats() {
        let text = r#"{"name": "gpu1:42", "host": "gpu1", "queues": ["default"], "slots": 1, "gpus": [],
                       "running": [], "heartbeat_ms": 1000, "started_at": 0}"#;
        let w = worker_info("test", text, Timestamp(5000), Timestamp(8000)).unwrap();
        assert_eq!((w.seen_at, w.lost), (Timestamp(5000), false));
        assert!(worker_info("test", text, Timestamp(5000), Timestamp(8001)).unwrap().lost);
        let e = worker_info("test", "[]", Timestamp(0), Timestamp(0)).unwrap_err();
        assert!(e.to_string().starts_with("test backend error: worker record: "), "{e}");
    }

    #[test]
    fn only_one_matched_row_means_the_lease_held() {
        let lease = Lease {
            job: JobRecord::new(JobId::from(5), JobSpec::new("main", "train.py"), Timestamp(0)),
            token: "t".into(),
            expires_at: Timestamp(0),
        };
        assert!(fenced(1, &lease).is_ok());
        for n in [0, 2] {
            assert!(matches!(fenced(n, &lease), Err(Error::LeaseLost { id }) if id == "5"));
        }
    }

    #[test]
    fn an_expired_lease_is_a_lease_lost_attempt_then_cancelled_queued_or_failed() {
        let lost = ExpiredLease::new(Some("gpu1:42"), false, 1, 3);
        assert_eq!(
            lost.failure,
            Failure::new(FailureKind::LeaseLost, "lease expired: worker gpu1:42 stopped heartbeating")
        );
        assert_eq!(lost.state, JobState::Queued);
        assert_eq!(
            ExpiredLease::new(None, false, 1, 3).failure.message,
            "lease expired: worker unknown stopped heartbeating"
        );
        assert_eq!(ExpiredLease::new(None, false, 3, 3).state, JobState::Failed);
        assert_eq!(ExpiredLease::new(None, true, 1, 3).state, JobState::Cancelled);
        assert_eq!(ExpiredLease::new(None, true, 3, 3).state, JobState::Cancelled);
    }

    #[test]
    fn a_log_page_starts_inside_a_piece_and_counts_what_was_dropped() {
        let pieces = vec![(10, 6, "ab\nçd".to_owned()), (16, 3, "ef\n".to_owned())];
        let page = log_page(12, &pieces);
        assert_eq!((page.text.as_str(), page.next, page.dropped), ("\nçdef\n", 19, 0));
        let page = log_page(4, &pieces);
        assert_eq!(
            (page.text.as_str(), page.next, page.dropped),
            ("ab\nçdef\n", 19, 6),
            "6 bytes before the first piece went"
        );
        // An offset inside a character moves on to the next one.
        let page = log_page(14, &pieces);
        assert_eq!(page.text, "def\n");
    }
}
