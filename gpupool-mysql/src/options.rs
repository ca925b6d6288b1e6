//! Parsing `mysql://` and `mariadb://` URLs into [`MysqlOptions`].
//!
//! `mysql://user:pass@host:3306/db?prefix=gpupool_&max_connections=4`.
//! Our own parameters (`prefix`, `max_connections`, `connect_timeout`) are
//! taken out; the rest go to the driver (for example `ssl-mode`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use gpupool_core::Error;
use gpupool_core::redact::redact_url;
use gpupool_core::url::QueueUrl;
use sqlx::mysql::MySqlConnectOptions;

/// The URL schemes this backend serves.
pub const SCHEMES: [&str; 2] = ["mysql", "mariadb"];

/// The table prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "gpupool_";

/// How to reach the database and name the tables.
#[derive(Clone)]
pub struct MysqlOptions {
    /// The driver's options (host, port, user, password, database).
    pub connect: MySqlConnectOptions,
    /// Prefix of every table: `[A-Za-z0-9_]{0,32}`.
    pub prefix: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long connecting may take before it is an error.
    pub connect_timeout: Duration,
    /// `host:port`, for messages.
    pub endpoint: String,
    /// The URL with its password replaced by `***`.
    pub redacted_url: String,
}

impl fmt::Debug for MysqlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlOptions")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Whether a table prefix is safe to put into SQL.
pub fn valid_prefix(p: &str) -> bool {
    p.len() <= 32 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl MysqlOptions {
    /// Parses a `mysql://` or `mariadb://` URL.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let redacted_url = redact_url(url);
        let parts = QueueUrl::parse(url, &SCHEMES)
            .ok_or_else(|| Error::Config(format!("`{redacted_url}` is not a mysql:// or mariadb:// URL")))?;
        let mut prefix = DEFAULT_PREFIX.to_owned();
        let mut max_connections = 4;
        let mut connect_timeout = Duration::from_secs(4);
        for &(k, v) in &parts.params {
            match k {
                "prefix" => {
                    if !valid_prefix(v) {
                        return Err(Error::Config(format!(
                            "table prefix `{v}` is not allowed; use up to 32 of A-Z a-z 0-9 _"
                        )));
                    }
                    prefix = v.to_owned();
                }
                "max_connections" => {
                    max_connections = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| Error::Config(format!("max_connections `{v}` is not a positive number")))?;
                }
                "connect_timeout" => {
                    connect_timeout = v
                        .parse::<u64>()
                        .map(Duration::from_secs)
                        .map_err(|_| Error::Config(format!("connect_timeout `{v}` is not a number of seconds")))?;
                }
                _ => {}
            }
        }
        let driver_url = parts.driver_url("mysql", &["prefix", "max_connections", "connect_timeout"]);
        let connect = MySqlConnectOptions::from_str(&driver_url)
            .map_err(|e| Error::Config(format!("`{redacted_url}`: {}", redact_url(&e.to_string()))))?
            .timezone(Some("+00:00".into()));
        let endpoint = parts.endpoint(3306);
        Ok(MysqlOptions { connect, prefix, max_connections, connect_timeout, endpoint, redacted_url })
    }
}

impl FromStr for MysqlOptions {
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
        let o = MysqlOptions::from_url("mysql://u:s3cret@db.example:3307/pool?prefix=t1_&max_connections=2").unwrap();
        assert_eq!(o.prefix, "t1_");
        assert_eq!(o.max_connections, 2);
        assert_eq!(o.endpoint, "db.example:3307");
        assert_eq!(o.redacted_url, "mysql://u:***@db.example:3307/pool?prefix=t1_&max_connections=2");
        assert!(!format!("{o:?}").contains("s3cret"));
        let o = MysqlOptions::from_url("mariadb://u@localhost/pool").unwrap();
        assert_eq!((o.prefix.as_str(), o.endpoint.as_str()), (DEFAULT_PREFIX, "localhost:3306"));
        let bad = MysqlOptions::from_url("mysql://u:p@h/db?prefix=x;DROP").unwrap_err().to_string();
        assert!(bad.contains("prefix") && !bad.contains(":p@"), "{bad}");
        assert!(MysqlOptions::from_url("redis://h").is_err());
    }
}
