//! Turning redis errors into [`gpupool_core::Error`].

use gpupool_core::Error;
use gpupool_core::redact::redact_url;

pub(crate) const BACKEND: &str = "redis";

/// The stream or its consumer group is gone (Redis restarted without
/// keeping them, or the key was deleted).
pub(crate) fn is_no_group(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

pub(crate) fn map(e: redis::RedisError) -> Error {
    let unavailable = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY"));
    let source: gpupool_core::BoxError = redact_url(&e.to_string()).into();
    if unavailable {
        Error::Unavailable { backend: BACKEND, source }
    } else {
        Error::Backend { backend: BACKEND, source }
    }
}
