//! The backend under test: its URL, the proxy in front of it, and how it
//! is restarted when it runs on this host.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Mysql,
    Redis,
    Amqp,
}

/// The backend under test.
#[derive(Debug)]
pub(crate) struct Backend {
    /// `SQLite`, `MariaDB`, `Redis` or `RabbitMQ`.
    pub(crate) name: &'static str,
    /// The queue's URL, with the run's own prefix.
    pub(crate) url: String,
    kind: Kind,
    /// `host:port` of a server backend.
    authority: Option<(String, u16)>,
    /// Redis's `appendonly` before the run, restored at the end.
    redis_aof: std::sync::Mutex<Option<String>>,
}

impl Backend {
    /// The backend `queue` names (`sqlite` alone: a file in `dir`), under a
    /// prefix of its own.
    pub(crate) fn from_url(queue: &str, dir: &Path, seed: u64) -> Result<Backend, String> {
        let id = format!("{:08x}", seed & 0xffff_ffff);
        let scheme = queue.split_once("://").map_or(queue, |(s, _)| s);
        let (kind, name, default_port) = match scheme {
            "sqlite" => (Kind::Sqlite, "SQLite", 0),
            "mysql" | "mariadb" => (Kind::Mysql, "MariaDB", 3306),
            "redis" => (Kind::Redis, "Redis", 6379),
            "amqp" => (Kind::Amqp, "RabbitMQ", 5672),
            other => return Err(format!("the chaos suite knows no backend {other:?} (sqlite, mysql, redis, amqp)")),
        };
        let sep = if queue.contains('?') { '&' } else { '?' };
        let url = match kind {
            Kind::Sqlite if queue == "sqlite" => format!("sqlite://{}/queue.db", dir.display()),
            Kind::Sqlite => queue.to_owned(),
            Kind::Mysql => format!("{queue}{sep}prefix=chaos{id}_"),
            Kind::Redis => format!("{queue}{sep}prefix=chaos:{id}:"),
            Kind::Amqp => format!("{queue}{sep}prefix=chaos.{id}.&ledger_max_age=1D"),
        };
        let authority = (kind != Kind::Sqlite).then(|| authority(&url, default_port)).transpose()?;
        Ok(Backend { name, url, kind, authority, redis_aof: std::sync::Mutex::new(None) })
    }

    /// A server backend's `host:port`, for the proxy.
    pub(crate) fn upstream(&self) -> Option<String> {
        self.authority.as_ref().map(|(h, p)| format!("{h}:{p}"))
    }

    pub(crate) fn proxied(&self) -> bool {
        self.authority.is_some()
    }

    /// A server on this host can be restarted (with its own tools, as
    /// root: `mariadb-admin`, `redis-cli`, `rabbitmqctl`).
    pub(crate) fn can_restart(&self) -> bool {
        self.authority.as_ref().is_some_and(|(h, _)| matches!(h.as_str(), "127.0.0.1" | "localhost" | "[::1]"))
    }

    /// The URL with the proxy's port in place of the server's.
    pub(crate) fn url_through(&self, port: u16) -> String {
        let Some((host, p)) = &self.authority else { return self.url.clone() };
        let from = format!("{host}:{p}");
        if self.url.contains(&from) {
            self.url.replacen(&from, &format!("127.0.0.1:{port}"), 1)
        } else {
            // No port written: the default one.
            self.url.replacen(host.as_str(), &format!("127.0.0.1:{port}"), 1)
        }
    }

    /// Before the run: Redis gets an append-only file, so that a restart
    /// keeps its data.
    pub(crate) fn prepare(&self) -> Result<(), String> {
        if self.kind == Kind::Redis && self.can_restart() {
            let before = self.redis_cli(&["CONFIG", "GET", "appendonly"])?;
            *gpupool::sync::lock(&self.redis_aof) = before.lines().nth(1).map(str::to_owned);
            self.redis_cli(&["CONFIG", "SET", "appendonly", "yes"])?;
            wait(Duration::from_secs(60), "Redis to write its append-only file", || {
                self.redis_cli(&["INFO", "persistence"])
                    .is_ok_and(|i| i.contains("aof_rewrite_in_progress:0") && i.contains("aof_rewrite_scheduled:0"))
            })?;
        }
        Ok(())
    }

    /// After the run: Redis's `appendonly` as it was.
    pub(crate) fn finish(&self) {
        if let Some(before) = gpupool::sync::lock(&self.redis_aof).take() {
            let _ = self.redis_cli(&["CONFIG", "SET", "appendonly", &before]);
        }
    }

    /// Restarts the server; returns how long it was away.
    pub(crate) fn restart(&self) -> Result<Duration, String> {
        let began = Instant::now();
        let (host, port) = self.authority.clone().ok_or("SQLite has no server to restart")?;
        match self.kind {
            Kind::Mysql => {
                run("mariadb-admin", &["shutdown"])?;
                wait(Duration::from_secs(60), "MariaDB to stop", || !listening(&host, port) && !running("mariadbd"))?;
                run(
                    "start-stop-daemon",
                    &["--start", "--oknodo", "--background", "--exec", "/usr/sbin/mariadbd", "--", "--user=mysql"],
                )?;
                wait(Duration::from_secs(60), "MariaDB to start", || {
                    run("mariadb-admin", &["--silent", "ping"]).is_ok()
                })?;
            }
            Kind::Redis => {
                let dir = self.redis_cli(&["CONFIG", "GET", "dir"])?;
                let dir = dir.lines().nth(1).ok_or("Redis did not say its dir")?.to_owned();
                let bind = self.redis_cli(&["CONFIG", "GET", "bind"])?;
                let bind: Vec<String> =
                    bind.lines().nth(1).unwrap_or("127.0.0.1").split_whitespace().map(str::to_owned).collect();
                let _ = self.redis_cli(&["SHUTDOWN"]);
                wait(Duration::from_secs(60), "Redis to stop", || !listening(&host, port))?;
                let port = port.to_string();
                let mut args = vec!["--daemonize", "yes", "--port", &port, "--save", "", "--appendonly", "yes"];
                args.extend(["--dir", &dir, "--bind"]);
                args.extend(bind.iter().map(String::as_str));
                run("redis-server", &args)?;
                wait(Duration::from_secs(60), "Redis to start", || {
                    self.redis_cli(&["PING"]).is_ok_and(|p| p.trim() == "PONG")
                })?;
            }
            Kind::Amqp => {
                run("rabbitmqctl", &["stop_app"])?;
                run("rabbitmqctl", &["start_app"])?;
            }
            Kind::Sqlite => {}
        }
        Ok(began.elapsed())
    }

    fn redis_cli(&self, args: &[&str]) -> Result<String, String> {
        let (host, port) = self.authority.clone().ok_or("not Redis")?;
        let port = port.to_string();
        let mut all = vec!["-h", host.trim_matches(['[', ']']), "-p", &port];
        all.extend(args);
        run("redis-cli", &all)
    }

    /// Removes the run's queue from the server.
    pub(crate) async fn remove(&self) -> Result<(), String> {
        let url = &self.url;
        let removed = match self.kind {
            Kind::Sqlite => Ok(()),
            Kind::Mysql => async { gpupool::mysql::MysqlQueue::connect(url).await?.drop_tables().await }.await,
            Kind::Amqp => async { gpupool::amqp::AmqpQueue::connect(url).await?.delete_queues().await }.await,
            Kind::Redis => {
                let q = gpupool::redis::RedisQueue::connect(url).await.map_err(|e| e.to_string())?;
                let mut c = q.connection();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}*", q.options().prefix))
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                if !keys.is_empty() {
                    let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut c).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        };
        removed.map_err(|e| format!("cannot remove the run's queue: {e}"))
    }
}

/// `host` and port of a URL's authority (`scheme://[user[:pass]@]host[:port]/…`).
fn authority(url: &str, default_port: u16) -> Result<(String, u16), String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let auth = &rest[..end];
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => {
            (h.to_owned(), p.parse().map_err(|_| format!("the URL's port {p:?} is not a number"))?)
        }
        _ => (hostport.to_owned(), default_port),
    };
    if host.is_empty() {
        return Err("the URL names no host".into());
    }
    Ok((host, port))
}

/// Runs a program (never a shell) and returns its stdout.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn listening(host: &str, port: u16) -> bool {
    let host = host.trim_matches(['[', ']']);
    std::net::TcpStream::connect_timeout(
        &match format!("{host}:{port}").parse() {
            Ok(a) => a,
            Err(_) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        },
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Whether a process named `comm` runs.
fn running(comm: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("waited {limit:?} for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_is_read_from_every_url_form() {
        assert_eq!(authority("mysql://u:p@127.0.0.1:3306/db", 1), Ok(("127.0.0.1".into(), 3306)));
        assert_eq!(authority("redis://127.0.0.1", 6379), Ok(("127.0.0.1".into(), 6379)));
        assert_eq!(authority("amqp://g:g@localhost:5672/%2f?prefix=a", 1), Ok(("localhost".into(), 5672)));
        assert_eq!(authority("redis://[::1]:6380/0", 1), Ok(("[::1]".into(), 6380)));
        let b = Backend::from_url("mysql://u:p@127.0.0.1:3306/db", Path::new("/tmp"), 0xabc).unwrap();
        assert_eq!(b.url_through(4000), "mysql://u:p@127.0.0.1:4000/db?prefix=chaos00000abc_");
    }
}
