//! Parsing `sqlite://` URLs into [`SqliteOptions`].
//!
//! `sqlite://.gpupool/queue.db` is relative to the working directory,
//! `sqlite:///var/lib/gpupool/q.db` absolute. Query parameters:
//! `busy_timeout` (a duration, default `10s`) and `max_connections`
//! (default 4).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use gpupool_core::Error;

/// The URL schemes this backend serves.
pub const SCHEMES: [&str; 1] = ["sqlite"];

/// Where the queue file is and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The database file; created with its folder if missing.
    pub path: PathBuf,
    /// How long a statement waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Connections in the pool.
    pub max_connections: u32,
}

impl SqliteOptions {
    /// Options for a file with the defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteOptions { path: path.into(), busy_timeout: Duration::from_secs(10), max_connections: 4 }
    }

    /// Parses `sqlite://PATH[?busy_timeout=10s&max_connections=4]`.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| Error::Config(format!("`{url}` is not a sqlite:// URL")))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(Error::Config(format!(
                "`{url}` names no file; write sqlite://.gpupool/queue.db or sqlite:///abs/path.db"
            )));
        }
        let mut opts = SqliteOptions::new(path);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "busy_timeout" => {
                    opts.busy_timeout = humantime::parse_duration(value).map_err(|_| {
                        Error::Config(format!("busy_timeout `{value}` is not a duration such as `10s`"))
                    })?;
                }
                "max_connections" => {
                    opts.max_connections =
                        value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            Error::Config(format!("max_connections `{value}` is not a positive number"))
                        })?;
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown sqlite URL parameter `{other}`; known: busy_timeout, max_connections"
                    )));
                }
            }
        }
        Ok(opts)
    }
}

impl FromStr for SqliteOptions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_url(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let o = SqliteOptions::from_url("sqlite://.gpupool/queue.db").unwrap();
        assert_eq!(o.path, PathBuf::from(".gpupool/queue.db"));
        let o = SqliteOptions::from_url("sqlite:///var/lib/gpupool/q.db?busy_timeout=2s&max_connections=2").unwrap();
        assert_eq!(o.path, PathBuf::from("/var/lib/gpupool/q.db"));
        assert_eq!(o.busy_timeout, Duration::from_secs(2));
        assert_eq!(o.max_connections, 2);
        assert!(SqliteOptions::from_url("mysql://x").is_err());
        assert!(SqliteOptions::from_url("sqlite://").is_err());
        assert!(SqliteOptions::from_url("sqlite://q.db?colour=1").is_err());
    }
}
