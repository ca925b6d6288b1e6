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
    let source: gpupool_core::BoxError = plain(&e).into();
    if unavailable {
        Error::Unavailable { backend: BACKEND, source }
    } else {
        Error::Backend { backend: BACKEND, source }
    }
}

/// What the driver said, in words: its own text names a general error's
/// kind in Debug form (`Missing hostname - InvalidClientConfig`), which is
/// left out; passwords are masked.
pub(crate) fn plain(e: &redis::RedisError) -> String {
    let text = e.to_string();
    let kind = format!(" - {:?}", e.kind());
    let text = match text.split_once(&kind) {
        Some((said, _)) => match e.detail() {
            Some(detail) => format!("{said}: {detail}"),
            None => said.to_owned(),
        },
        None => text,
    };
    redact_url(&text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn driver_errors_read_as_words() {
        let e = redis::Client::open("redis://").unwrap_err();
        assert_eq!(super::plain(&e), "Missing hostname");
        let e = redis::RedisError::from((redis::ErrorKind::Io, "connection lost", "to h:1".to_owned()));
        assert_eq!(super::plain(&e), "connection lost: to h:1");
    }
}
