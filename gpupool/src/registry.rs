//! [`Registry`]: opens a queue from a URL by its scheme, over the backends
//! compiled in and any a program adds.
//!
//! Each backend declares its schemes ([`Connect::SCHEMES`]); the registry is
//! built from those declarations, the way sqlx's `Any` driver picks a
//! driver by `url.scheme()`. A custom backend joins with
//! [`Registry::add`] (a type that implements [`Connect`]) or
//! [`Registry::register`] (a scheme and a function).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gpupool_core::redact::redact_url;
use gpupool_core::{Connect, Error, MemoryQueue, Queue, Result};

type Opening = Pin<Box<dyn Future<Output = Result<Arc<dyn Queue>>> + Send>>;
type Factory = Arc<dyn Fn(String) -> Opening + Send + Sync>;

/// The in-tree backends, by scheme, with the feature of this crate that
/// brings each in and whether it is on: named in the error for a URL whose
/// backend is not compiled in.
const IN_TREE: [(&str, &str, bool); 7] = [
    ("sqlite", "sqlite", cfg!(feature = "sqlite")),
    ("mysql", "mysql", cfg!(feature = "mysql")),
    ("mariadb", "mysql", cfg!(feature = "mysql")),
    ("redis", "redis", cfg!(feature = "redis")),
    ("rediss", "redis", cfg!(feature = "redis")),
    ("amqp", "amqp", cfg!(feature = "amqp")),
    ("amqps", "amqp", cfg!(feature = "amqp")),
];

/// URL schemes and the backends that open them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> gpupool::Result<()> {
/// use gpupool::{MemoryQueue, Registry};
///
/// let mut registry = Registry::with_defaults();
/// // A custom backend: a scheme and a function from the URL to a queue.
/// registry.register("scratch", |_url| async { Ok(MemoryQueue::new()) });
/// let queue = registry.connect("scratch://anything").await?;
/// assert!(queue.capabilities().priority);
/// assert!(registry.schemes().any(|s| s == "sqlite"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Registry {
    schemes: BTreeMap<String, Factory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("schemes", &self.schemes.keys().collect::<Vec<_>>()).finish()
    }
}

impl Registry {
    /// A registry that knows no scheme.
    pub fn empty() -> Self {
        Registry { schemes: BTreeMap::new() }
    }

    /// `memory://` and every backend compiled in through this crate's
    /// features (`sqlite` by default; `mysql`, `redis`, `amqp`).
    pub fn with_defaults() -> Self {
        let mut r = Self::empty();
        r.register("memory", |_url| async { Ok(MemoryQueue::new()) });
        #[cfg(feature = "sqlite")]
        r.add::<gpupool_sqlite::SqliteQueue>();
        #[cfg(feature = "mysql")]
        r.add::<gpupool_mysql::MysqlQueue>();
        #[cfg(feature = "redis")]
        r.add::<gpupool_redis::RedisQueue>();
        #[cfg(feature = "amqp")]
        r.add::<gpupool_amqp::AmqpQueue>();
        r
    }

    /// Adds a backend under each scheme it declares. A scheme already
    /// registered is taken over by the later one.
    pub fn add<B: Connect>(&mut self) -> &mut Self {
        for scheme in B::SCHEMES {
            self.register(scheme, |url: String| async move { B::connect(&url).await });
        }
        self
    }

    /// Adds one scheme, opened by `open` from the whole URL. A scheme
    /// already registered is taken over.
    pub fn register<F, Fut, Q>(&mut self, scheme: &str, open: F) -> &mut Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Q>> + Send + 'static,
        Q: Queue + 'static,
    {
        let factory: Factory = Arc::new(move |url: String| {
            let opening = open(url);
            Box::pin(async move { Ok(Arc::new(opening.await?) as Arc<dyn Queue>) })
        });
        self.schemes.insert(scheme.to_owned(), factory);
        self
    }

    /// The schemes this registry opens, in order.
    pub fn schemes(&self) -> impl Iterator<Item = &str> {
        self.schemes.keys().map(String::as_str)
    }

    /// Opens the queue `url` names, by its scheme (`sqlite://…`,
    /// `mysql://…`; `sqlite:PATH` and `memory:` too). An unknown scheme is
    /// an [`Error::Config`] that lists the known ones and, for an in-tree
    /// backend left out of this build, the feature that brings it in.
    /// Passwords never appear in an error.
    pub async fn connect(&self, url: &str) -> Result<Arc<dyn Queue>> {
        match scheme_of(url).and_then(|s| self.schemes.get(s)) {
            Some(open) => open(url.to_owned()).await,
            None => Err(self.unknown(url)),
        }
    }

    fn unknown(&self, url: &str) -> Error {
        let known = self.schemes().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ");
        let shown = redact_url(url);
        // Only `SCHEME://` names a scheme; `host:port` or `C:\x` is not a URL.
        let scheme = url.split_once("://").map(|(s, _)| s).filter(|s| valid_scheme(s));
        Error::Config(match scheme {
            Some(s) => match IN_TREE.iter().find(|(name, _, _)| *name == s) {
                Some((_, feature, false)) => format!(
                    "`{shown}`: the {s}:// backend is not compiled into this program; build it with feature \
                     `{feature}` of the gpupool crate (known here: {known})"
                ),
                _ => format!("`{shown}`: no backend for {s}:// is registered here; known: {known}"),
            },
            None => format!(
                "`{shown}` is not a queue URL; write it like sqlite://.gpupool/queue.db (known schemes: {known})"
            ),
        })
    }
}

/// The scheme of a URL: `sqlite` for `sqlite://x`, and for `sqlite:x` (the
/// part before the first `:`, when it is a valid scheme). Compared exactly,
/// as every backend parses its URL.
fn scheme_of(url: &str) -> Option<&str> {
    let scheme = url.split_once("://").or_else(|| url.split_once(':')).map(|(s, _)| s)?;
    valid_scheme(scheme).then_some(scheme)
}

fn valid_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// Opens the queue `url` names with [`Registry::with_defaults`]: the
/// backends compiled in through this crate's features, and `memory://`.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> gpupool::Result<()> {
/// let queue = gpupool::connect("sqlite://.gpupool/queue.db").await?;
/// queue.init().await?;
/// # Ok(())
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn Queue>> {
    Registry::with_defaults().connect(url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_read_like_urls() {
        assert_eq!(scheme_of("sqlite://x.db"), Some("sqlite"));
        assert_eq!(scheme_of("sqlite:x.db"), Some("sqlite"));
        assert_eq!(scheme_of("SQLite://x.db"), Some("SQLite"), "compared exactly, as the backends do");
        assert_eq!(scheme_of("queue.db"), None);
        assert_eq!(scheme_of("/tmp/a:b"), None);
    }

    #[tokio::test]
    async fn an_unknown_scheme_names_the_known_ones_and_hides_the_password() {
        let err = Registry::with_defaults().connect("nosuch://u:hunter22@h/db").await.unwrap_err().to_string();
        assert!(err.contains("memory://") && err.contains("no backend for nosuch://"), "{err}");
        assert!(!err.contains("hunter22"), "{err}");
        let err = Registry::empty().connect("mysql://u:p@h/db").await.unwrap_err().to_string();
        if cfg!(feature = "mysql") {
            assert!(err.contains("no backend for mysql:// is registered"), "{err}");
        } else {
            assert!(err.contains("feature `mysql`"), "{err}");
        }
        for not_a_url in ["queue.db", "C:\\q.db", "SQLite://x.db"] {
            let err = Registry::with_defaults().connect(not_a_url).await.unwrap_err().to_string();
            assert!(err.contains("not a queue URL") || err.contains("no backend for SQLite://"), "{err}");
        }
    }
}
