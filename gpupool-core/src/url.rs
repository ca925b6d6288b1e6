//! Splitting a queue URL for its backend: the scheme, the part the driver
//! gets, and the query parameters, of which a backend takes its own
//! (`prefix`, …) and passes the rest on to its driver.

/// A queue URL in parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrl<'a> {
    /// `mysql`, `redis`, `amqp`, …
    pub scheme: &'a str,
    /// What follows `scheme://`, without the query.
    pub base: &'a str,
    /// The query parameters, in order, as `(key, value)`.
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> QueueUrl<'a> {
    /// Splits `url` if its scheme is one of `schemes`.
    pub fn parse(url: &'a str, schemes: &[&str]) -> Option<Self> {
        let (scheme, rest) = url.split_once("://").filter(|(s, _)| schemes.contains(s))?;
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let params = query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
        Some(QueueUrl { scheme, base, params })
    }

    /// `host:port` of the authority, with `default_port` when it names none.
    pub fn endpoint(&self, default_port: u16) -> String {
        let authority = self.base.split('/').next().unwrap_or(self.base);
        let host_port = authority.rsplit('@').next().unwrap_or(authority);
        if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:{default_port}") }
    }

    /// The URL for the driver: `scheme://base` and only the parameters
    /// whose keys are not in `ours`.
    pub fn driver_url(&self, scheme: &str, ours: &[&str]) -> String {
        let rest: Vec<String> =
            self.params.iter().filter(|(k, _)| !ours.contains(k)).map(|(k, v)| format!("{k}={v}")).collect();
        if rest.is_empty() {
            format!("{scheme}://{}", self.base)
        } else {
            format!("{scheme}://{}?{}", self.base, rest.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts() {
        let u = QueueUrl::parse("redis://:pw@h:6380/2?prefix=a:&x=1", &["redis"]).unwrap();
        assert_eq!((u.scheme, u.base), ("redis", ":pw@h:6380/2"));
        assert_eq!(u.params, [("prefix", "a:"), ("x", "1")]);
        assert_eq!(u.endpoint(6379), "h:6380");
        assert_eq!(u.driver_url("redis", &["prefix"]), "redis://:pw@h:6380/2?x=1");
        assert_eq!(QueueUrl::parse("redis://h", &["redis"]).unwrap().endpoint(6379), "h:6379");
        assert!(QueueUrl::parse("mysql://h", &["redis"]).is_none());
    }
}
