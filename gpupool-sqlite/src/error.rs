//! Turning sqlx errors into [`gpupool_core::Error`].

use gpupool_core::Error;

pub(crate) const BACKEND: &str = "sqlite";

/// SQLite's primary result codes that mean "try again": BUSY and LOCKED
/// (extended codes carry the primary code in their low byte).
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// Whether SQLite answered BUSY or LOCKED: another connection holds the lock.
pub(crate) fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED)),
        _ => false,
    }
}

pub(crate) fn map(e: sqlx::Error) -> Error {
    let unavailable = matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed
    ) || is_busy(&e);
    if unavailable {
        Error::Unavailable { backend: BACKEND, source: Box::new(e) }
    } else {
        Error::Backend { backend: BACKEND, source: Box::new(e) }
    }
}
