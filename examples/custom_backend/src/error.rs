//! Turning sqlx errors into [`gpupool_core::Error`] by meaning: what a caller
//! may retry later (`Unavailable`) and what it may not (`Backend`).

use gpupool_core::redact::redact_url;
use gpupool_core::{Error, Lease};

/// The backend's name in messages.
pub(crate) const BACKEND: &str = "postgres";

/// SQLSTATEs after which the same call may work later: the server is
/// starting, stopping or full (57P01–57P03, 53300), a failover left it
/// read-only (25006), a transaction lost a race (40001, 40P01), or any
/// connection exception (class 08).
fn transient(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "25006" | "40001" | "40P01")
}

/// What went wrong, in one line: the server's message and SQLSTATE, with a
/// hint where one helps. Never a password.
pub(crate) fn describe(e: &sqlx::Error) -> String {
    let text = match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let hint = if code == "42P01" { "; run `gpupool init` to create the tables" } else { "" };
            format!("{} (SQLSTATE {code}){hint}", db.message())
        }
        e => e.to_string(),
    };
    redact_url(&text)
}

/// The error a call returns when sqlx fails.
pub(crate) fn map(e: sqlx::Error) -> Error {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| transient(&c)),
        _ => false,
    };
    let source = describe(&e).into();
    if unavailable {
        Error::Unavailable { backend: BACKEND, source }
    } else {
        Error::Backend { backend: BACKEND, source }
    }
}

/// The error of a call whose lease no longer holds the job.
pub(crate) fn lost(lease: &Lease) -> Error {
    Error::lease_lost(lease.id())
}
