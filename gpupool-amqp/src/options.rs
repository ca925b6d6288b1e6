//! Parsing `amqp://` and `amqps://` URLs into [`AmqpOptions`].
//!
//! `amqp://user:pass@host:5672/%2f?prefix=gpupool.&ledger_max_age=30D`.
//! Our own parameters are taken out; the rest goes to the driver.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use gpupool_core::Error;
use gpupool_core::redact::redact_url;
use gpupool_core::url::QueueUrl;

/// The URL schemes this backend serves.
pub const SCHEMES: [&str; 2] = ["amqp", "amqps"];

/// The name prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "gpupool.";

/// How to reach RabbitMQ and name what gpupool declares.
#[derive(Clone)]
pub struct AmqpOptions {
    /// The URL for the driver, without our parameters.
    pub driver_url: String,
    /// Prefix of every queue name.
    pub prefix: String,
    /// The ledger stream's `x-max-age` (such as `30D`, `12h`).
    pub ledger_max_age: String,
    /// The ledger stream's `x-max-length-bytes`.
    pub ledger_max_bytes: i64,
    /// The ledger's segment size (`ledger_segment_bytes`, RabbitMQ's
    /// `x-stream-max-segment-size-bytes`; RabbitMQ's default, 500 MB, when
    /// unset). Retention drops whole segments, so small segments make it
    /// act sooner (tests use 1 MB).
    pub ledger_segment_bytes: Option<i64>,
    /// How long a piece of a shipped log is kept after it was sent
    /// (`log_max_age`, such as `7D`; default 7 days): the log stream's
    /// `x-max-age`.
    pub log_max_age: Duration,
    /// At most how many bytes of shipped logs the pool keeps
    /// (`log_max_bytes`; default 8 GiB): the log stream's
    /// `x-max-length-bytes`.
    pub log_max_bytes: i64,
    /// How long connecting may take before it is an error.
    pub connect_timeout: Duration,
    /// `host:port`, for messages.
    pub endpoint: String,
    /// The URL with its password replaced by `***`.
    pub redacted_url: String,
}

impl fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("url", &self.redacted_url)
            .field("prefix", &self.prefix)
            .field("ledger_max_age", &self.ledger_max_age)
            .field("ledger_max_bytes", &self.ledger_max_bytes)
            .finish_non_exhaustive()
    }
}

/// An age in RabbitMQ's form (`30D`, `12h`, `90m`; `Y` is 365 days, `M` 30).
pub(crate) fn age(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "Y" => 365 * 86_400,
        "M" => 30 * 86_400,
        "D" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return None,
    };
    Some(Duration::from_secs(n.saturating_mul(secs)))
}

impl AmqpOptions {
    /// Parses an `amqp://` or `amqps://` URL.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let redacted_url = redact_url(url);
        let Some(parts) = QueueUrl::parse(url, &SCHEMES) else {
            return Err(Error::Config(format!("`{redacted_url}` is not an amqp:// or amqps:// URL")));
        };
        let mut opts = AmqpOptions {
            driver_url: String::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            ledger_max_age: "30D".to_owned(),
            ledger_max_bytes: 1 << 30,
            ledger_segment_bytes: None,
            log_max_age: Duration::from_secs(7 * 86_400),
            log_max_bytes: 8 << 30,
            connect_timeout: Duration::from_secs(4),
            endpoint: String::new(),
            redacted_url,
        };
        for &(k, v) in &parts.params {
            match k {
                "prefix" => {
                    let ok = !v.is_empty()
                        && v.len() <= 64
                        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
                    if !ok {
                        return Err(Error::Config(format!(
                            "prefix `{v}` is not allowed; use 1 to 64 of A-Z a-z 0-9 . _ - :"
                        )));
                    }
                    v.clone_into(&mut opts.prefix);
                }
                "ledger_max_age" => {
                    if age(v).is_none() {
                        return Err(Error::Config(format!(
                            "ledger_max_age `{v}` is not an age such as 30D, 12h or 90m"
                        )));
                    }
                    v.clone_into(&mut opts.ledger_max_age);
                }
                "log_max_age" => {
                    opts.log_max_age = age(v).ok_or_else(|| {
                        Error::Config(format!("log_max_age `{v}` is not an age such as 7D, 12h or 90m"))
                    })?;
                }
                "ledger_max_bytes" => {
                    opts.ledger_max_bytes = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| Error::Config(format!("ledger_max_bytes `{v}` is not a positive number")))?;
                }
                "log_max_bytes" => {
                    opts.log_max_bytes = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| Error::Config(format!("log_max_bytes `{v}` is not a positive number")))?;
                }
                "ledger_segment_bytes" => {
                    opts.ledger_segment_bytes = Some(v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::Config(format!("ledger_segment_bytes `{v}` is not a positive number"))
                    })?);
                }
                "connect_timeout" => {
                    opts.connect_timeout = v
                        .parse::<u64>()
                        .map(Duration::from_secs)
                        .map_err(|_| Error::Config(format!("connect_timeout `{v}` is not a number of seconds")))?;
                }
                _ => {}
            }
        }
        opts.driver_url = parts.driver_url(
            parts.scheme,
            &[
                "prefix",
                "ledger_max_age",
                "ledger_max_bytes",
                "ledger_segment_bytes",
                "log_max_age",
                "log_max_bytes",
                "connect_timeout",
            ],
        );
        opts.endpoint = parts.endpoint(if parts.scheme == "amqps" { 5671 } else { 5672 });
        Ok(opts)
    }
}

impl FromStr for AmqpOptions {
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
        let o =
            AmqpOptions::from_url("amqp://u:s3cret@mq:5673/%2f?prefix=team.&ledger_max_age=7D&heartbeat=10").unwrap();
        assert_eq!(o.driver_url, "amqp://u:s3cret@mq:5673/%2f?heartbeat=10");
        assert_eq!((o.prefix.as_str(), o.ledger_max_age.as_str()), ("team.", "7D"));
        assert_eq!(o.endpoint, "mq:5673");
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!(AmqpOptions::from_url("amqps://h/v").unwrap().endpoint, "h:5671");
        assert!(AmqpOptions::from_url("amqp://h/?ledger_max_age=forever").is_err());
        assert_eq!(
            AmqpOptions::from_url("amqp://h/?log_max_age=2D").unwrap().log_max_age,
            Duration::from_secs(172_800)
        );
        assert!(AmqpOptions::from_url("amqp://h/?log_max_age=7").is_err());
        assert_eq!(AmqpOptions::from_url("amqp://h/?log_max_bytes=1000").unwrap().log_max_bytes, 1000);
        assert!(AmqpOptions::from_url("amqp://h/?log_max_bytes=-1").is_err());
        assert_eq!(
            AmqpOptions::from_url("amqp://h/?ledger_segment_bytes=1000000").unwrap().ledger_segment_bytes,
            Some(1_000_000)
        );
        assert!(AmqpOptions::from_url("amqp://h/?ledger_segment_bytes=0").is_err());
        assert!(AmqpOptions::from_url("redis://h").is_err());
    }
}
