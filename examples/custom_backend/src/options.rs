//! Parsing `postgres://` URLs into [`PgOptions`], in one place.
//!
//! `postgres://user:pass@host:5432/db?prefix=gpupool_&max_connections=5`.
//! Our own parameters are taken out; the rest (`sslmode`, `application_name`,
//! …) go to the driver. No error ever shows the password.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use gpupool_core::redact::redact_url;
use gpupool_core::url::QueueUrl;
use gpupool_core::{Error, Result};
use sqlx::postgres::PgConnectOptions;

/// The URL schemes this backend opens.
pub const SCHEMES: [&str; 2] = ["postgres", "postgresql"];

/// The table prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "gpupool_";

/// Our parameters, which the driver must not see.
const OURS: [&str; 3] = ["prefix", "max_connections", "connect_timeout"];

/// How to reach the database and name the tables.
#[derive(Clone)]
pub struct PgOptions {
    /// The driver's options (host, port, user, password, database, TLS).
    pub connect: PgConnectOptions,
    /// Prefix of every table, index and the NOTIFY channel (`?prefix=`).
    pub prefix: String,
    /// Connections in the pool (`?max_connections=`, default 5); one of
    /// them LISTENs while a `reserve` waits.
    pub max_connections: u32,
    /// How long connecting may take (`?connect_timeout=` seconds, default 5).
    pub connect_timeout: Duration,
    /// `host:port`, for messages.
    pub endpoint: String,
    /// The URL with its password replaced by `***`.
    pub redacted_url: String,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Whether a table prefix is safe to paste into SQL as part of an unquoted
/// identifier: up to 32 of `A-Z a-z 0-9 _`, not starting with a digit.
pub fn valid_prefix(p: &str) -> bool {
    p.len() <= 32
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !p.starts_with(|c: char| c.is_ascii_digit())
}

impl PgOptions {
    /// Parses a `postgres://` or `postgresql://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let redacted_url = redact_url(url);
        let parts = QueueUrl::parse(url, &SCHEMES)
            .ok_or_else(|| Error::Config(format!("`{redacted_url}` is not a postgres:// URL")))?;
        let mut opts = PgOptions {
            connect: PgConnectOptions::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            max_connections: 5,
            connect_timeout: Duration::from_secs(5),
            endpoint: parts.endpoint(5432),
            redacted_url: redacted_url.clone(),
        };
        for &(key, value) in &parts.params {
            match key {
                "prefix" if valid_prefix(value) => opts.prefix = value.to_owned(),
                "prefix" => {
                    return Err(Error::Config(format!(
                        "table prefix `{value}` is not allowed; use up to 32 of A-Z a-z 0-9 _, not starting with a digit"
                    )));
                }
                "max_connections" => {
                    opts.max_connections =
                        value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            Error::Config(format!("max_connections `{value}` is not a positive number"))
                        })?;
                }
                "connect_timeout" => {
                    opts.connect_timeout = value
                        .parse()
                        .map(Duration::from_secs)
                        .map_err(|_| Error::Config(format!("connect_timeout `{value}` is not a number of seconds")))?;
                }
                _ => {}
            }
        }
        opts.connect = PgConnectOptions::from_str(&parts.driver_url("postgres", &OURS))
            .map_err(|e| Error::Config(format!("`{redacted_url}`: {}", redact_url(&e.to_string()))))?;
        Ok(opts)
    }
}

impl FromStr for PgOptions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_url(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let o = PgOptions::from_url("postgres://u:s3cret@db.example:5433/pool?prefix=t1_&max_connections=2").unwrap();
        assert_eq!((o.prefix.as_str(), o.max_connections, o.endpoint.as_str()), ("t1_", 2, "db.example:5433"));
        assert_eq!(o.redacted_url, "postgres://u:***@db.example:5433/pool?prefix=t1_&max_connections=2");
        assert!(!format!("{o:?}").contains("s3cret"));
        let o = PgOptions::from_url("postgresql://u@localhost/pool?sslmode=disable").unwrap();
        assert_eq!((o.prefix.as_str(), o.endpoint.as_str()), (DEFAULT_PREFIX, "localhost:5432"));
        for bad in ["x;DROP", "1abc", "a-b", &"a".repeat(33)] {
            let err = PgOptions::from_url(&format!("postgres://u:pw@h/db?prefix={bad}")).unwrap_err().to_string();
            assert!(err.contains("prefix") && !err.contains(":pw@"), "{err}");
        }
        assert!(PgOptions::from_url("mysql://h/db").is_err());
        let err = PgOptions::from_url("postgres://u:pw@h/db?max_connections=0").unwrap_err().to_string();
        assert!(err.contains("max_connections") && !err.contains("pw"), "{err}");
    }
}
