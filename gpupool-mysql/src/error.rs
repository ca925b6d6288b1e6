//! Turning sqlx errors into [`gpupool_core::Error`].

use gpupool_core::Error;
use gpupool_core::redact::redact_url;

pub(crate) const BACKEND: &str = "mysql";

/// The server's error number (1213 for a deadlock, …).
fn number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number()),
        _ => None,
    }
}

/// ER_LOCK_DEADLOCK (1213) and ER_LOCK_WAIT_TIMEOUT (1205): the transaction
/// may simply be run again.
pub(crate) fn is_lock_conflict(e: &sqlx::Error) -> bool {
    matches!(number(e), Some(1213 | 1205))
}

/// ER_DUP_ENTRY (1062).
pub(crate) fn is_duplicate(e: &sqlx::Error) -> bool {
    number(e) == Some(1062)
}

pub(crate) fn map(e: sqlx::Error) -> Error {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // Server shutting down (1053), too many connections (1040), lost
        // connection (2013), read-only after a failover (1290), lock conflicts.
        sqlx::Error::Database(_) => matches!(number(&e), Some(1053 | 1040 | 2013 | 1290 | 1213 | 1205)),
        _ => false,
    };
    let source: gpupool_core::BoxError = redact_url(&e.to_string()).into();
    if unavailable {
        Error::Unavailable { backend: BACKEND, source }
    } else {
        Error::Backend { backend: BACKEND, source }
    }
}
