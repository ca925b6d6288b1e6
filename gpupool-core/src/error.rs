//! The one error type of gpupool: variants by meaning, not by backend.
//!
//! Backends keep their own private error types and convert into [`Error`];
//! callers match on the meaning (`LeaseLost`, `Unavailable`, …) and never on a
//! backend's driver type.

use std::fmt;

/// The result type used across gpupool.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a backend driver or the operating system.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in gpupool, by meaning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No job with this id exists in the queue.
    #[error("job {id} not found")]
    NotFound {
        /// The id that was asked for.
        id: String,
    },

    /// The caller no longer holds the job's lease: it expired and was taken
    /// over, the job was released, or it already finished. The caller must
    /// stop working on the job; whatever it reports is not recorded.
    #[error("lease on job {id} was lost (it expired or another worker holds the job now)")]
    LeaseLost {
        /// The job whose lease was lost.
        id: String,
    },

    /// A job was refused at push: the message names the field and the value.
    #[error("invalid job: {0}")]
    InvalidJob(String),

    /// A push named an `idempotency_key` that an earlier push used for a
    /// different job. Nothing was added; the earlier job is untouched.
    #[error(
        "idempotency_key `{key}` was already used by job {id}, a different job; push the same job to get {id} \
         back, or use a new key"
    )]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The job pushed first with it.
        id: String,
    },

    /// The request does not fit the job's current state, such as retrying a
    /// job that is still queued.
    #[error("job {id} is {state}: {message}")]
    InvalidState {
        /// The job.
        id: String,
        /// Its current state.
        state: crate::JobState,
        /// What cannot be done and why.
        message: String,
    },

    /// A configuration value (queue URL, flag, config file) is wrong.
    #[error("configuration: {0}")]
    Config(String),

    /// The backend cannot be reached right now (connection refused or lost,
    /// server restarting). Retryable: the worker backs off and tries again.
    #[error("{backend} backend unavailable: {source}")]
    Unavailable {
        /// Which backend (`sqlite`, `mysql`, …).
        backend: &'static str,
        /// What the driver said; passwords are never part of it.
        source: BoxError,
    },

    /// Any other backend failure (a constraint, a corrupt row, a bug).
    #[error("{backend} backend error: {source}")]
    Backend {
        /// Which backend (`sqlite`, `mysql`, …).
        backend: &'static str,
        /// What the driver said; passwords are never part of it.
        source: BoxError,
    },
}

impl Error {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// The [`Error::InvalidState`] of `retry` on a job that is neither
    /// failed nor cancelled.
    pub fn not_retryable(id: impl fmt::Display, state: crate::JobState) -> Self {
        Error::InvalidState {
            id: id.to_string(),
            state,
            message: "only a failed or cancelled job can be retried".into(),
        }
    }

    /// The [`Error::LeaseLost`] of a call about job `id` whose lease no
    /// longer holds the job.
    pub fn lease_lost(id: impl fmt::Display) -> Self {
        Error::LeaseLost { id: id.to_string() }
    }

    /// A [`Error::Backend`] from any displayable message.
    pub fn backend(backend: &'static str, message: impl fmt::Display) -> Self {
        Error::Backend { backend, source: message.to_string().into() }
    }
}
