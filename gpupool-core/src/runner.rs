//! The [`Runner`] trait: how a prepared job's process runs, and the values
//! that cross it.
//!
//! What lives here: the contract, [`RunSpec`], [`Outcome`] and the
//! [`Stopper`] a run is stopped through. What does not: any implementation
//! (the process one is `ProcessRunner` in `gpupool-worker`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// Bytes of output kept as the tail, by default.
pub const DEFAULT_TAIL_BYTES: usize = 64 * 1024;

/// Why a run was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// A user cancelled the job.
    Cancel,
    /// The worker lost the job's lease.
    LeaseLost,
    /// The worker is shutting down and gives the job back.
    Shutdown,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Cancel => "a cancel",
            StopReason::LeaseLost => "a lost lease",
            StopReason::Shutdown => "the worker's shutdown",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Variables set on top of the inherited environment.
    pub env: Vec<(String, String)>,
    /// Variables removed from the inherited environment (secrets).
    pub env_remove: Vec<String>,
    /// Where stdout and stderr go (appended).
    pub log_path: PathBuf,
    /// Longest the run may take.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Bytes of output to keep as the tail.
    pub tail_bytes: usize,
    /// Strings replaced by `***` in the tail (tokens the worker holds).
    pub secrets: Vec<String>,
    /// Where the output goes as it comes, besides the log: the worker reads
    /// `GPUPOOL_RESULT` lines from it (and ships it to the backend). A
    /// runner sends every chunk it writes to the log, in order; `None`:
    /// nobody listens.
    pub output: Option<OutputSink>,
}

/// The receiving end a runner sends its output to ([`RunSpec::output`]),
/// chunk by chunk as read from the process.
pub type OutputSink = tokio::sync::mpsc::Sender<Vec<u8>>;

/// Output as a terminal would leave it: a line redrawn with `\r` (a tqdm or
/// Keras progress bar) is kept as its last state, and `\r\n` ends a line.
/// 3,000 updates of one bar are one line.
///
/// ```
/// assert_eq!(gpupool_core::runner::collapse_redraws("a\r10%\r100%\nb\r\n"), "100%\nb\n");
/// ```
pub fn collapse_redraws(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        out.push_str(line.rsplit('\r').next().unwrap_or(line));
        if lines.peek().is_some() {
            out.push('\n');
        }
    }
    out
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The process exited with this code.
    Exited(i32),
    /// The process was killed by this signal (not by us).
    Signaled(i32),
    /// It ran past its timeout and was stopped.
    TimedOut,
    /// It was stopped from outside for this reason.
    Stopped(StopReason),
}

/// As the end of a sentence about the run: "exited with code 3".
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "exited with code {code}"),
            Outcome::Signaled(sig) => write!(f, "was killed by signal {sig}"),
            Outcome::TimedOut => f.write_str("ran past its timeout"),
            Outcome::Stopped(why) => write!(f, "was stopped by {why}"),
        }
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// How it ended.
    pub outcome: Outcome,
    /// The last `tail_bytes` of its output, secrets replaced.
    pub tail: String,
    /// Its process id, while it ran.
    pub pid: Option<u32>,
}

/// A stop request: the token is cancelled once `reason` is set.
#[derive(Debug, Clone, Default)]
pub struct Stopper {
    token: CancellationToken,
    reason: std::sync::Arc<std::sync::Mutex<Option<StopReason>>>,
}

impl Stopper {
    /// A stopper that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop. The first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let mut r = crate::sync::lock(&self.reason);
        r.get_or_insert(reason);
        self.token.cancel();
    }

    /// The reason, once stopped.
    pub fn reason(&self) -> Option<StopReason> {
        *crate::sync::lock(&self.reason)
    }

    /// Resolves once a stop was asked for.
    pub async fn stopped(&self) -> StopReason {
        self.token.cancelled().await;
        self.reason().unwrap_or(StopReason::Shutdown)
    }
}

/// Runs one prepared job and reports how it ended.
///
/// # Overview
///
/// The worker builds a [`RunSpec`] (argv, working directory, environment,
/// log file, timeout) and calls [`run`](Runner::run); the call returns when
/// the job has ended and nothing it started is left running. The worker
/// calls it for the setup step and for the entrypoint, several runs at once
/// on one runner.
///
/// ```
/// use gpupool_core::async_trait;
/// use gpupool_core::runner::{Outcome, RunResult, RunSpec, Runner, Stopper};
/// use tokio_util::sync::CancellationToken;
///
/// /// Runs nothing and reports success: a dry run of a pool.
/// #[derive(Debug)]
/// struct DryRun;
///
/// #[async_trait]
/// impl Runner for DryRun {
///     async fn run(&self, spec: &RunSpec, _stop: &Stopper, launched: &CancellationToken)
///         -> Result<RunResult, String> {
///         launched.cancel();
///         Ok(RunResult { outcome: Outcome::Exited(0), tail: format!("{:?}\n", spec.argv), pid: None })
///     }
/// }
/// ```
///
/// # Implementing
///
/// - argv is a vector: never join it into a shell string, never run a shell.
/// - The run gets the worker's environment less `env_remove`, with `env` on
///   top; `CUDA_VISIBLE_DEVICES` in `env` is the GPUs it was given.
/// - stdout and stderr are appended to `log_path`; the last `tail_bytes`
///   come back in [`RunResult::tail`], with the strings of `secrets`
///   replaced by `***` (`ProcessRunner` replaces those of 4 characters or
///   more; shorter ones would blank out ordinary output).
/// - `launched` is cancelled as soon as the run has started (the worker
///   waits for it before asking for its next job).
/// - When `stop` fires or `timeout` passes, the run is asked to stop
///   (SIGTERM), given `grace`, then killed, with everything it started; the
///   outcome is [`Outcome::Stopped`] or [`Outcome::TimedOut`].
///
/// # Errors
///
/// `Err` when the run could not start (no such program, no such directory,
/// the log cannot be opened) or could not be watched (waiting for the
/// process failed), with a message that says which; the worker records it
/// as a `setup` failure. A run that started and failed is `Ok` with its
/// [`Outcome`].
///
/// # Cancellation safety
///
/// Not cancellation safe: dropping the future must still end the process
/// (for example through `kill_on_drop`), but the worker never drops it; it
/// stops a run through `stop`.
#[async_trait]
pub trait Runner: Send + Sync + fmt::Debug {
    /// Runs `spec` until it exits, times out or `stop` fires, cancelling
    /// `launched` once it has started.
    async fn run(&self, spec: &RunSpec, stop: &Stopper, launched: &CancellationToken) -> Result<RunResult, String>;
}
