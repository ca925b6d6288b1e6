//! Parsing `redis://` and `rediss://` URLs into [`RedisOptions`].
//!
//! `redis://:pass@host:6379/0?prefix=gpupool:&reclaim_idle=30s`. Our own
//! parameters are taken out; the rest of the URL goes to the driver.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use gpupool_core::Error;
use gpupool_core::redact::redact_url;
use gpupool_core::url::QueueUrl;

/// The URL schemes this backend serves.
pub const SCHEMES: [&str; 2] = ["redis", "rediss"];

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "gpupool:";

/// How to reach Redis and name the keys.
#[derive(Clone)]
pub struct RedisOptions {
    /// The URL for the driver, without our parameters.
    pub driver_url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// The longest a stream entry sits unheartbeated before another worker
    /// looks at its lease: an entry is looked at once idle for its own
    /// lease or for this, whichever is shorter. The lease decides.
    pub reclaim_idle: Duration,
    /// How long connecting may take before it is an error.
    pub connect_timeout: Duration,
    /// `host:port`, for messages.
    pub endpoint: String,
    /// The URL with its password replaced by `***`.
    pub redacted_url: String,
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("reclaim_idle", &self.reclaim_idle)
            .finish_non_exhaustive()
    }
}

impl RedisOptions {
    /// Parses a `redis://` or `rediss://` URL.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let redacted_url = redact_url(url);
        let Some(parts) = QueueUrl::parse(url, &SCHEMES) else {
            return Err(Error::Config(format!("`{redacted_url}` is not a redis:// or rediss:// URL")));
        };
        let mut prefix = DEFAULT_PREFIX.to_owned();
        let mut reclaim_idle = Duration::from_secs(30);
        let mut connect_timeout = Duration::from_secs(4);
        for &(k, v) in &parts.params {
            match k {
                "prefix" => {
                    if v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(Error::Config(format!(
                            "key prefix `{v}` is not allowed; use 1 to 64 printable characters"
                        )));
                    }
                    prefix = v.to_owned();
                }
                "reclaim_idle" => {
                    reclaim_idle = humantime::parse_duration(v)
                        .map_err(|_| Error::Config(format!("reclaim_idle `{v}` is not a duration such as 30s")))?;
                }
                "connect_timeout" => {
                    connect_timeout = humantime::parse_duration(v)
                        .map_err(|_| Error::Config(format!("connect_timeout `{v}` is not a duration such as 4s")))?;
                }
                _ => {}
            }
        }
        let driver_url = parts.driver_url(parts.scheme, &["prefix", "reclaim_idle", "connect_timeout"]);
        let endpoint = parts.endpoint(6379);
        Ok(RedisOptions { driver_url, prefix, reclaim_idle, connect_timeout, endpoint, redacted_url })
    }
}

impl FromStr for RedisOptions {
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
        let o = RedisOptions::from_url("redis://:s3cret@cache:6380/2?prefix=team1:&reclaim_idle=5s").unwrap();
        assert_eq!(o.driver_url, "redis://:s3cret@cache:6380/2");
        assert_eq!((o.prefix.as_str(), o.reclaim_idle), ("team1:", Duration::from_secs(5)));
        assert_eq!(o.endpoint, "cache:6380");
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!(RedisOptions::from_url("rediss://h").unwrap().endpoint, "h:6379");
        assert!(RedisOptions::from_url("mysql://h").is_err());
        assert!(RedisOptions::from_url("redis://h?reclaim_idle=soon").is_err());
    }
}
