//! The job model: what is pushed ([`JobSpec`]), what is stored
//! ([`JobRecord`]), its states and the record of each failed attempt.
//!
//! Parsing of the two JSON forms lives in [`crate::message`]; turning a spec
//! into argv lives in [`crate::argv`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Job arguments: an ordered map from name to JSON value. The order is the
/// order of the pushed file and is the order of the argv items.
pub type Args = serde_json::Map<String, serde_json::Value>;

/// The queue a job goes to when it names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Attempts before a job is `failed`, when it names no `max_attempts`. Such
/// a job retries only failures that are not its own code's
/// ([`FailureKind::retried_by_default`]): a traceback or a timeout is not
/// run again unless the job asks.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A job's id: short and typeable (`gpupool jobs --id 42`). Backends with a
/// sequence use its number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// An id from its text form.
    pub fn new(id: impl Into<String>) -> Self {
        JobId(id.into())
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a number, for backends whose ids come from a sequence.
    /// A non-numeric id is [`Error::NotFound`] in such a backend.
    pub fn as_i64(&self) -> crate::Result<i64> {
        self.0.parse().map_err(|_| Error::NotFound { id: self.0.clone() })
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<i64> for JobId {
    fn from(n: i64) -> Self {
        JobId(n.to_string())
    }
}

impl FromStr for JobId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.is_empty() || s.len() > 64 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::InvalidJob(format!("`{s}` is not a job id")));
        }
        Ok(JobId(s.to_owned()))
    }
}

/// A point in time, as milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time of this host.
    pub fn now() -> Self {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    /// RFC 3339 in UTC with milliseconds, such as `2026-11-26T11:48:33.120Z`.
    pub fn to_rfc3339(self) -> String {
        let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(self.0).unwrap_or(0));
        humantime::format_rfc3339_millis(t).to_string()
    }

    /// This time plus a duration.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    /// Reads RFC 3339: `2026-12-01T18:00:00Z`, with or without fractions
    /// of a second, in UTC (`Z`) or at an offset (`+09:00`, `-05:00`).
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "`{text}` is not an RFC 3339 time ({why}); write it like 2026-12-01T18:00:00Z or 2026-12-02T03:00:00+09:00"
            )
        };
        let split = text.len().checked_sub(6).filter(|i| text.is_char_boundary(*i)).map(|i| text.split_at(i));
        let (utc, offset_min) = match split {
            Some((head, tail)) if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes()[3] == b':' => {
                let hours: i64 = tail[1..3].parse().map_err(|_| bad("the offset is not ±HH:MM"))?;
                let minutes: i64 = tail[4..].parse().map_err(|_| bad("the offset is not ±HH:MM"))?;
                let sign = if tail.starts_with('-') { -1 } else { 1 };
                (format!("{head}Z"), sign * (hours * 60 + minutes))
            }
            _ => (text.to_owned(), 0),
        };
        let t = humantime::parse_rfc3339_weak(&utc).map_err(|e| bad(&e.to_string()))?;
        if !utc.ends_with('Z') {
            return Err(bad("it names no zone: end it with Z or an offset"));
        }
        let ms = t.duration_since(UNIX_EPOCH).map_err(|_| bad("it is before 1970"))?.as_millis();
        let ms = i64::try_from(ms).map_err(|_| bad("it is too far ahead"))?;
        Ok(Timestamp(ms - offset_min * 60_000))
    }
}

/// Where a job is in its life.
///
/// `queued → running → succeeded | failed | cancelled`; `running → queued` on
/// a lost lease, a failed attempt with attempts left, or a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Leased by a worker.
    Running,
    /// Its process exited 0.
    Succeeded,
    /// Its last attempt failed and it will not be retried by itself.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// All states, in life order.
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    /// The lower-case name used in JSON, SQL and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended (succeeded, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            Error::Config(format!("unknown state `{s}`; use one of queued, running, succeeded, failed, cancelled"))
        })
    }
}

/// Why an attempt failed. Stored with every failed attempt and shown by
/// `gpupool errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The process exited with a non-zero code.
    Exit,
    /// The process was killed by a signal.
    Signal,
    /// The job ran past its `timeout`.
    Timeout,
    /// The worker's setup step failed. Not retried.
    Setup,
    /// The ref does not exist in the repository. Not retried.
    Ref,
    /// The repository cannot be reached or is not allowed. Not retried.
    Repo,
    /// The worker died or went silent and its lease expired.
    LeaseLost,
    /// The process ran out of GPU memory.
    Oom,
    /// The stored job fails the checks of push when it is read for running
    /// (written behind push's back, by hand or by a newer gpupool). Not
    /// retried: it is the same job next time.
    Invalid,
    /// A fault of the worker's environment, not of the job: its command or
    /// setup step cannot start, it cannot write a checkout or a log, it has
    /// no git credentials, the git host is unreachable. The worker gives the
    /// job back without charging an attempt, so another worker runs it, and
    /// pauses itself (`gpupool status` shows it unhealthy).
    Worker,
}

impl FailureKind {
    /// All kinds.
    pub const ALL: [FailureKind; 10] = [
        FailureKind::Exit,
        FailureKind::Signal,
        FailureKind::Timeout,
        FailureKind::Setup,
        FailureKind::Ref,
        FailureKind::Repo,
        FailureKind::LeaseLost,
        FailureKind::Oom,
        FailureKind::Invalid,
        FailureKind::Worker,
    ];

    /// The snake-case name used in JSON, SQL and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Exit => "exit",
            FailureKind::Signal => "signal",
            FailureKind::Timeout => "timeout",
            FailureKind::Setup => "setup",
            FailureKind::Ref => "ref",
            FailureKind::Repo => "repo",
            FailureKind::LeaseLost => "lease_lost",
            FailureKind::Oom => "oom",
            FailureKind::Invalid => "invalid",
            FailureKind::Worker => "worker",
        }
    }

    /// Whether another attempt can help. A bad ref, an unreachable or
    /// disallowed repository and a failing setup step fail the same way
    /// every time, so they end the job at once.
    pub fn is_retryable(self) -> bool {
        !matches!(self, FailureKind::Ref | FailureKind::Repo | FailureKind::Setup | FailureKind::Invalid)
    }

    /// Whether a job that names no `max_attempts` is run again after this
    /// kind: a fault of the host or the moment (`signal`, `lease_lost`,
    /// `oom`) is; the job's own code failing (`exit`: a traceback, an
    /// argparse error) or running past its `timeout` is not, since running
    /// it again mostly fails again and costs the same GPU hours.
    pub fn retried_by_default(self) -> bool {
        self.is_retryable() && !matches!(self, FailureKind::Exit | FailureKind::Timeout)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        FailureKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::backend("core", format!("unknown failure kind `{s}`")))
    }
}

/// What is pushed: the code to run, how, and on how many GPUs.
///
/// Build one with [`JobSpec::new`] or parse one with
/// [`crate::message::parse_jobs`]; check it with [`JobSpec::validate`]
/// (every backend's `push` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Branch, tag or commit (full or abbreviated sha).
    pub git_ref: String,
    /// Path of the script inside the repository.
    pub entrypoint: String,
    /// Arguments, in order; see [`crate::argv`].
    #[serde(default)]
    pub args: Args,
    /// The repository (URL or path); `None` means the worker's `--repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The queue that routes the job.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// `None`: one GPU where the worker has any, else the CPU. `Some(0)`:
    /// CPU only. `Some(n)`: exactly `n` GPUs.
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Higher runs first, within a queue.
    #[serde(default)]
    pub priority: i32,
    /// Attempts before the job is `failed`; `None`:
    /// [`DEFAULT_MAX_ATTEMPTS`], and failures of kind `exit` and `timeout`
    /// are not retried (see [`JobSpec::retries`]). Naming it asks for every
    /// retryable kind to be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Least free memory, in MiB, each GPU given to this job must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<u64>,
    /// Longest one attempt may run, as `90s` or `2h` in JSON.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Extra environment for the process (loader variables are refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A second push with the same key returns the first job's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The sweep this job is a run of (`gpupool sweep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<crate::sweep::SweepRef>,
    /// Which failures are run again, and how often ([`RetryPolicy`]);
    /// instead of `max_attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// The earliest time the job may start (`not_before`, RFC 3339 in
    /// JSON, as `2026-12-01T18:00:00Z` or with an offset, `+09:00`).
    #[serde(default, with = "opt_rfc3339", skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// Jobs that must succeed before this one starts ([`After`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<After>,
    /// Start once every job in `after` has ended, however it ended (by
    /// default one that fails or is cancelled cancels this job).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_any: bool,
    /// Uncommitted code to run (`gpupool push --snapshot`): applied on top
    /// of `git_ref`, which is its base commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRef>,
}

/// A snapshot of a working tree that a job runs (`snapshot` in the job
/// JSON): the files that differ from its base commit, stored once in the
/// queue ([`crate::Blobs`]) under their hash. The job's `git_ref` is the
/// base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// The commit it applies to (full sha): the newest commit the remote
    /// had when it was taken.
    pub base: String,
    /// The stored snapshot's id: git's blob hash of its bytes (40 hex).
    pub hash: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The largest snapshot a job may name (`gpupool push --snapshot` stops at
/// 16 MiB unless told otherwise).
pub const MAX_SNAPSHOT_BYTES: u64 = 256 << 20;

/// The jobs a job waits for (`after` in the job JSON): a list of ids,
/// `["12", "13"]`, or every run of a sweep, `{"sweep": "ID"}`. `gpupool
/// push` turns the sweep form into the list of its runs, so the stored job
/// names exactly the jobs it waits for. The wait itself is
/// [`crate::after::gate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum After {
    /// These jobs.
    Jobs(Vec<JobId>),
    /// Every run of this sweep.
    Sweep {
        /// The sweep's id.
        sweep: String,
    },
}

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let shape = || D::Error::custom("after must be a list of job ids, [\"12\", \"13\"], or {\"sweep\": \"ID\"}");
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => Ok(JobId::new(s)),
                    serde_json::Value::Number(n) if n.is_u64() => Ok(JobId::new(n.to_string())),
                    _ => Err(shape()),
                })
                .collect::<Result<_, _>>()
                .map(After::Jobs),
            serde_json::Value::Object(map) => match (map.len(), map.get("sweep")) {
                (1, Some(serde_json::Value::String(s))) => Ok(After::Sweep { sweep: s.clone() }),
                _ => Err(shape()),
            },
            _ => Err(shape()),
        }
    }
}

/// Which failed attempts are run again (`retry` in the job JSON):
/// `{"on": ["oom", "signal"], "max": 2}`. A lost lease (the worker died)
/// is always retried while retries are left, and a fault of the worker's
/// own environment never costs one. Failures that fail the same way every
/// time (`setup`, `ref`, `repo`, `invalid`) are never retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// The kinds retried, of `exit`, `oom`, `signal`, `timeout` and
    /// `lease_lost`; by default `oom`, `signal` and `lease_lost` (a
    /// Python error, `exit`, is not retried unless named).
    #[serde(default = "RetryPolicy::default_on")]
    pub on: Vec<FailureKind>,
    /// Retries after the first attempt (so `max + 1` attempts); default 2.
    #[serde(default = "RetryPolicy::default_max")]
    pub max: u32,
    /// How long after a failed attempt the next may start (`"30s"`);
    /// none: at once. `gpupool jobs` shows the earliest start.
    #[serde(default, with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    /// Each wait is this many times the last (default 1): `backoff: 30s,
    /// factor: 2` waits 30 s, 60 s, 120 s, … up to [`MAX_BACKOFF`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

/// The longest a retry's backoff waits, however many attempts came before.
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

impl RetryPolicy {
    fn default_on() -> Vec<FailureKind> {
        vec![FailureKind::Oom, FailureKind::Signal, FailureKind::LeaseLost]
    }

    fn default_max() -> u32 {
        2
    }
}

fn default_queue() -> String {
    DEFAULT_QUEUE.to_owned()
}

impl JobSpec {
    /// A job on the default queue with no args.
    pub fn new(git_ref: impl Into<String>, entrypoint: impl Into<String>) -> Self {
        JobSpec {
            git_ref: git_ref.into(),
            entrypoint: entrypoint.into(),
            args: Args::new(),
            repo: None,
            queue: default_queue(),
            gpus: None,
            gpu_memory: None,
            priority: 0,
            max_attempts: None,
            timeout: None,
            env: BTreeMap::new(),
            name: None,
            idempotency_key: None,
            sweep: None,
            retry: None,
            not_before: None,
            after: None,
            after_any: false,
            snapshot: None,
        }
    }

    /// Builder: `max_attempts` (which also asks for `exit` and `timeout`
    /// failures to be retried).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Attempts this job gets before it is `failed`: `max_attempts`, or
    /// [`DEFAULT_MAX_ATTEMPTS`].
    pub fn attempts(&self) -> u32 {
        match &self.retry {
            Some(policy) => policy.max.saturating_add(1),
            None => self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        }
    }

    /// Whether a failure of `kind` may be run again (attempts left aside):
    /// every retryable kind when the job names `max_attempts`, else only
    /// those [`FailureKind::retried_by_default`].
    pub fn retries(&self, kind: FailureKind) -> bool {
        match &self.retry {
            Some(policy) => kind.is_retryable() && (kind == FailureKind::LeaseLost || policy.on.contains(&kind)),
            None if self.max_attempts.is_some() => kind.is_retryable(),
            None => kind.retried_by_default(),
        }
    }

    /// How long after its failed attempt number `attempt` (1 for the first
    /// run) the job waits before it may run again: `backoff ×
    /// factor^(attempt − 1)`, at most [`MAX_BACKOFF`]; `None` for no wait.
    /// A lost lease and a fault of the worker are never the job's doing,
    /// so they are retried at once.
    pub fn retry_delay(&self, kind: FailureKind, attempt: u32) -> Option<Duration> {
        if matches!(kind, FailureKind::LeaseLost | FailureKind::Worker) {
            return None;
        }
        let policy = self.retry.as_ref()?;
        let base = policy.backoff?.as_secs_f64();
        let times = policy.factor.unwrap_or(1.0).powi(i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX));
        let secs = (base * times).min(MAX_BACKOFF.as_secs_f64());
        (secs > 0.0).then(|| Duration::from_secs_f64(secs))
    }

    /// The same job on another queue.
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Adds one argument at the end.
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.args.insert(key.into(), value.into());
        self
    }

    /// The display name: `name`, else none.
    pub fn display_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// How many GPUs this job needs on a worker that has GPUs (`gpu_host`)
    /// or not: an unset `gpus` takes one GPU where there are any.
    pub fn gpus_needed(&self, gpu_host: bool) -> u32 {
        self.gpus.unwrap_or(u32::from(gpu_host))
    }

    /// The JSON text a backend stores.
    pub fn to_json(&self) -> crate::Result<String> {
        serde_json::to_string(self).map_err(|e| Error::InvalidJob(format!("cannot encode job: {e}")))
    }

    /// Reads back what [`JobSpec::to_json`] wrote.
    pub fn from_stored_json(text: &str) -> crate::Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::backend("core", format!("stored job is not valid: {e}")))
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!("timeout `{t}` is not a duration ({e}); write it like `90s` or `2h`"))
            })
        })
        .transpose()
    }
}

/// `Option<Timestamp>` as RFC 3339 text: written in UTC with
/// milliseconds; read with `Z` or an offset such as `+09:00`.
mod opt_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Timestamp;

    pub(super) fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| Timestamp::parse_rfc3339(&t).map_err(serde::de::Error::custom)).transpose()
    }
}

/// One failed attempt of a job: the seed's error table, `gpupool errors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The job.
    pub job_id: JobId,
    /// Which attempt failed (1 for the first run).
    pub attempt: u32,
    /// Why.
    pub kind: FailureKind,
    /// The exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// The signal, if the process was killed by one.
    pub signal: Option<i32>,
    /// A readable reason.
    pub message: String,
    /// The end of the output (stdout and stderr together).
    pub output_tail: String,
    /// When the failure was recorded.
    pub at: Timestamp,
}

/// What is stored: the spec plus everything that happened to it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// What was pushed.
    pub spec: JobSpec,
    /// Where it is now.
    pub state: JobState,
    /// Runs started so far (1 for the first run).
    pub attempt: u32,
    /// The attempt after which a failure ends the job: `max_attempts` at
    /// push, raised by `max_attempts` at each `retry` (so after a retry it
    /// reads `attempt + max_attempts`, shown as `5 (limit 6)`).
    pub attempt_limit: u32,
    /// The commit the ref resolved to on the last run.
    pub commit: Option<String>,
    /// The worker running it or that ran it last (`host:pid`).
    pub worker: Option<String>,
    /// The GPUs given to the last run.
    pub gpu_ids: Option<Vec<u32>>,
    /// Exit code of the last run that exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the last run, if any.
    pub signal: Option<i32>,
    /// End of the last run's output.
    pub output_tail: Option<String>,
    /// Optional result a successful run reported.
    pub result: Option<serde_json::Value>,
    /// Where the files its last run produced are, and what they are
    /// ([`crate::Queue::record_artifacts`]); `None` until a run kept some.
    pub artifacts: Option<crate::Artifacts>,
    /// A cancel was asked for while it ran.
    pub cancel_requested: bool,
    /// When it was pushed.
    pub created_at: Timestamp,
    /// When its last run started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// While it is queued: the earliest time a worker may take it, if
    /// later than its push: its `not_before`, a retry's backoff, or the
    /// next look at the jobs it waits for (`after`).
    pub not_before: Option<Timestamp>,
    /// Every failed attempt, oldest first. Filled by [`crate::Queue::get`];
    /// [`crate::Queue::list`] leaves it empty (use [`crate::Queue::errors`]).
    pub errors: Vec<AttemptError>,
}

impl JobRecord {
    /// A freshly pushed record, as every backend stores it.
    pub fn new(id: JobId, spec: JobSpec, created_at: Timestamp) -> Self {
        let attempt_limit = spec.attempts();
        let spec_not_before = spec.not_before;
        JobRecord {
            id,
            spec,
            state: JobState::Queued,
            attempt: 0,
            attempt_limit,
            commit: None,
            worker: None,
            gpu_ids: None,
            exit_code: None,
            signal: None,
            output_tail: None,
            result: None,
            artifacts: None,
            cancel_requested: false,
            created_at,
            started_at: None,
            finished_at: None,
            not_before: spec_not_before,
            errors: Vec::new(),
        }
    }

    /// The JSON object that `gpupool jobs --json` prints (INTERFACE.md).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id.as_str(),
            "state": self.state.as_str(),
            "queue": self.spec.queue,
            "name": self.spec.name,
            "repo": self.spec.repo,
            "git_ref": self.spec.git_ref,
            "commit": self.commit,
            "entrypoint": self.spec.entrypoint,
            "args": self.spec.args,
            "gpus": self.spec.gpus,
            "gpu_ids": self.gpu_ids,
            "priority": self.spec.priority,
            "attempt": self.attempt,
            "max_attempts": self.spec.attempts(),
            "attempt_limit": self.attempt_limit,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "worker": self.worker,
            "cancel_requested": self.cancel_requested,
            "result": self.result,
            "artifacts": self.artifacts,
            "sweep": self.spec.sweep,
            "created_at": self.created_at.to_rfc3339(),
            "started_at": self.started_at.map(Timestamp::to_rfc3339),
            "finished_at": self.finished_at.map(Timestamp::to_rfc3339),
            "not_before": self.waits_until().map(Timestamp::to_rfc3339),
            "after": self.spec.after,
            "snapshot": self.spec.snapshot,
        })
    }

    /// The earliest start of a queued job held back (by `not_before`, a
    /// backoff or a wait for `after`); `None` for any other.
    pub fn waits_until(&self) -> Option<Timestamp> {
        self.not_before.filter(|_| self.state == JobState::Queued)
    }
}

impl AttemptError {
    /// The JSON object that `gpupool errors --json` prints (INTERFACE.md).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "job_id": self.job_id.as_str(),
            "attempt": self.attempt,
            "kind": self.kind.as_str(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "message": self.message,
            "output_tail": self.output_tail,
            "at": self.at.to_rfc3339(),
        })
    }
}
