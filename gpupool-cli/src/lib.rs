//! The `gpupool` command as a library: [`main_with`] runs every command
//! over a [`Registry`](gpupool::Registry) of backends, so a team's own
//! binary with its own backend is a few lines; and the pieces other programs
//! reuse: reading `gpupool.toml` ([`FileConfig`]) and the tables people read
//! ([`jobs_table`], [`errors_table`], [`status`] and [`status_report`]).
//!
//! A team binary that adds a PostgreSQL backend of its own (the whole of
//! `examples/custom_backend/src/main.rs`):
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     let mut registry = gpupool::Registry::with_defaults();
//!     registry.add::<gpupool_postgres_example::PgQueue>(); // postgres://…
//!     gpupool_cli::main_with(registry)
//! }
//! ```
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> gpupool::Result<()> {
//! let queue = gpupool::connect("memory://").await?; // or sqlite://.gpupool/queue.db, mysql://…
//! queue.push(gpupool::JobSpec::new("main", "train.py").arg("lr", 0.01)).await?;
//! let jobs = queue.list(&Default::default()).await?;
//! assert!(gpupool_cli::jobs_table(&jobs).contains("train.py"));
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use gpupool::redact::redact_url;
use gpupool::{AttemptError, Error, JobRecord, JobState, ListFilter, Queue, Result, Timestamp, WorkerInfo};
use serde::Deserialize;

mod cli;
mod sweeps;
mod ui;

pub use cli::main_with;

/// The queue used when no flag, variable or config file names one.
pub const DEFAULT_QUEUE_URL: &str = "sqlite://.gpupool/queue.db";

/// The config file read from the working directory.
pub const CONFIG_FILE: &str = "gpupool.toml";

/// `gpupool.toml`: the seed's `env.py`, as a file. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Queue URL.
    pub queue: Option<String>,
    /// Data directory (mirrors, checkouts, logs, setup cache).
    pub data_dir: Option<PathBuf>,
    /// The repository for jobs that name none.
    pub repo: Option<String>,
    /// Other repositories jobs may name.
    #[serde(default)]
    pub allowed_repos: Vec<String>,
    /// The command template before the entrypoint.
    pub command: Option<Vec<String>>,
    /// The setup step, as argv.
    pub setup: Option<Vec<String>>,
    /// Files whose hash decides whether setup runs again.
    pub setup_inputs: Option<Vec<String>>,
    /// The artifact store runs' files are uploaded to and pulled from
    /// (`file:///dir`, `s3://bucket/prefix`, `gs://…`, `az://…`).
    pub artifacts: Option<String>,
    /// Worker settings.
    #[serde(default)]
    pub worker: WorkerFileConfig,
}

/// The `[worker]` table of `gpupool.toml`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerFileConfig {
    /// `auto`, `none` or a list such as `"0,2"`.
    pub gpus: Option<String>,
    /// Parallel runs without GPUs.
    pub slots: Option<usize>,
    /// Jobs per GPU.
    pub slots_per_gpu: Option<usize>,
    /// Percentage of a GPU's memory that must be free for it to count as
    /// free when none of this worker's jobs holds it (default 90).
    pub gpu_free_memory: Option<f64>,
    /// Queues served, in order.
    pub queues: Option<Vec<String>>,
    /// Lease, such as `60s`.
    pub lease: Option<String>,
    /// Heartbeat interval, such as `10s`.
    pub heartbeat: Option<String>,
    /// Drain timeout, such as `10m`.
    pub drain_timeout: Option<String>,
    /// Kept outputs unchanged for this long are removed, such as `30d`.
    pub outputs_max_age: Option<String>,
    /// Keep the local copy of files uploaded to the artifact store.
    pub keep_outputs: Option<bool>,
}

impl FileConfig {
    /// Reads `gpupool.toml` from `dir` if it exists.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
            Err(e) => Err(Error::Config(format!("cannot read {}: {e}", path.display()))),
        }
    }
}

/// The config file in force for a command run in `dir`: `gpupool.toml` in
/// `dir` or the nearest folder above it, up to and including the git root
/// (a folder holding `.git`); else `$XDG_CONFIG_HOME/gpupool/config.toml`
/// (`~/.config/gpupool/config.toml`). A relative `sqlite://` queue path or
/// `data_dir` in a file outside `dir` is taken from that file's folder, so
/// every folder of a project reaches the same queue. `None` when there is
/// no file.
pub fn find_config(dir: &Path) -> Result<(FileConfig, Option<PathBuf>)> {
    let mut at = Some(dir);
    while let Some(folder) = at {
        let path = folder.join(CONFIG_FILE);
        if path.is_file() {
            return Ok((anchored(FileConfig::load(folder)?, folder, dir), Some(path)));
        }
        if folder.join(".git").exists() {
            break;
        }
        at = folder.parent();
    }
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".config")));
    if let Some(path) = xdg.map(|x| x.join("gpupool").join("config.toml")).filter(|p| p.is_file()) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok((anchored(file, &folder, dir), Some(path)));
    }
    Ok((FileConfig::default(), None))
}

/// Relative paths of a config file found in `folder` (not `cwd`), made
/// relative to `folder`.
fn anchored(mut file: FileConfig, folder: &Path, cwd: &Path) -> FileConfig {
    if folder == cwd {
        return file;
    }
    if let Some(rest) = file.queue.as_deref().and_then(|q| q.strip_prefix("sqlite://"))
        && !rest.starts_with('/')
        && !rest.is_empty()
    {
        file.queue = Some(format!("sqlite://{}", folder.join(rest).display()));
    }
    if let Some(d) = file.data_dir.as_mut()
        && d.is_relative()
    {
        *d = folder.join(&*d);
    }
    let local = |r: &str| !r.contains("://") && !r.contains('@') && Path::new(r).is_relative();
    if let Some(r) = file.repo.as_mut().filter(|r| local(r)) {
        *r = folder.join(&*r).display().to_string();
    }
    for r in file.allowed_repos.iter_mut().filter(|r| local(r)) {
        *r = folder.join(&*r).display().to_string();
    }
    file
}

/// The default data directory: `$XDG_DATA_HOME/gpupool`, else
/// `~/.local/share/gpupool`, else `.gpupool/data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("gpupool");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/gpupool"),
        None => PathBuf::from(".gpupool/data"),
    }
}

/// Parses a duration such as `90s`, `2m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(text)
        .map_err(|e| Error::Config(format!("`{text}` is not a duration ({e}); write it like 30s, 5m or 2h")))
}

fn short(ts: Option<Timestamp>) -> String {
    ts.map(|t| t.to_rfc3339().chars().take(19).collect::<String>().replace('T', " ")).unwrap_or_default()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

/// Lays rows out in columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The `gpupool jobs` table. A running job whose cancel was asked for shows
/// as `cancelling`; a queued job shows no exit code (its last run's is in
/// `gpupool errors`); WORKER is the host that ran or runs it, DURATION how
/// long its last run took (or has taken so far). ATTEMPT reads `5 (limit 6)`.
/// After DURATION come the results the listed jobs reported, one column per
/// key (`GPUPOOL_RESULT` lines; `-` where a job has none).
pub fn jobs_table(jobs: &[JobRecord]) -> String {
    jobs_table_with(jobs, &result_keys(jobs))
}

/// [`jobs_table`] as wide as `width` allows for its result columns: the
/// keys reported last are left out until the header fits (the other
/// columns are cut by [`fit_width`]).
pub fn jobs_table_within(jobs: &[JobRecord], width: usize) -> String {
    let mut keys = result_keys(jobs);
    loop {
        let table = jobs_table_with(jobs, &keys);
        let header = table.lines().next().map_or(0, |l| l.chars().count());
        if header <= width || keys.is_empty() {
            return table;
        }
        keys.pop();
    }
}

/// The result keys the jobs report, in the order first seen.
pub fn result_keys<'a>(jobs: impl IntoIterator<Item = &'a JobRecord>) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for job in jobs {
        if let Some(serde_json::Value::Object(map)) = &job.result {
            for key in map.keys() {
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
        }
    }
    keys
}

/// A result value as a table shows it: numbers with at most 4 decimals,
/// strings as they are, anything else as JSON.
pub fn result_cell(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => "-".to_owned(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_f64() => {
            let v = n.as_f64().unwrap_or_default();
            let text = format!("{v:.4}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            if text.is_empty() || text == "-" { "0".to_owned() } else { text.to_owned() }
        }
        Some(other) => other.to_string(),
    }
}

/// Orders jobs by a result key: `KEY` ascending, `-KEY` descending; jobs
/// without it come last.
pub fn sort_by_result(jobs: &mut [JobRecord], key: &str) {
    let (key, descending) = match key.strip_prefix('-') {
        Some(k) => (k, true),
        None => (key, false),
    };
    let value = |j: &JobRecord| j.result.as_ref().and_then(|r| r.get(key)).cloned();
    jobs.sort_by(|a, b| {
        use std::cmp::Ordering;
        match (value(a), value(b)) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let order = match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
                    _ => result_cell(Some(&x)).cmp(&result_cell(Some(&y))),
                };
                if descending { order.reverse() } else { order }
            }
        }
    });
}

fn jobs_table_with(jobs: &[JobRecord], keys: &[String]) -> String {
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let mut row = vec![
                j.id.to_string(),
                state_cell(j, now),
                j.spec.queue.clone(),
                j.spec.name.clone().unwrap_or_else(|| "-".into()),
                j.spec.git_ref.clone(),
                j.commit.as_deref().map_or_else(|| "-".to_owned(), |c| c[..c.len().min(10)].to_owned()),
                // Runs so far, and the attempt after which a failure ends
                // the job (raised by each `retry`).
                format!("{} (limit {})", j.attempt, j.attempt_limit),
                // The GPUs given, "cpu" for a run on the CPU, else what was asked.
                match &j.gpu_ids {
                    Some(g) if g.is_empty() => "cpu".to_owned(),
                    Some(g) => g.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                    None => j.spec.gpus.map_or_else(|| "-".to_owned(), |n| format!("({n})")),
                },
                if j.state == JobState::Queued { "-".to_owned() } else { opt(j.exit_code) },
                j.worker
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |w| w.rsplit_once(':').map_or(w, |(h, _)| h).to_owned()),
                duration(j, now),
            ];
            row.extend(keys.iter().map(|k| result_cell(j.result.as_ref().and_then(|r| r.get(k)))));
            row.extend([short(Some(j.created_at)), j.spec.entrypoint.clone()]);
            row
        })
        .collect();
    let mut header =
        vec!["ID", "STATE", "QUEUE", "NAME", "REF", "COMMIT", "ATTEMPT", "GPUS", "EXIT", "WORKER", "DURATION"];
    let upper: Vec<String> = keys.iter().map(|k| k.to_uppercase()).collect();
    header.extend(upper.iter().map(String::as_str));
    header.extend(["CREATED", "ENTRYPOINT"]);
    table(&header, &rows)
}

/// A job's state as the table shows it: a running job asked to stop is
/// `cancelling`; a queued one held back says what for.
fn state_cell(j: &JobRecord, now: Timestamp) -> String {
    match (j.state, &j.spec.after, j.waits_until().filter(|t| *t > now)) {
        (JobState::Running, _, _) if j.cancel_requested => "cancelling".to_owned(),
        (JobState::Queued, Some(gpupool::After::Jobs(ids)), _) if ids.len() <= 3 => {
            format!("queued after {}", ids.iter().map(gpupool::JobId::as_str).collect::<Vec<_>>().join(","))
        }
        (JobState::Queued, Some(gpupool::After::Jobs(ids)), _) => format!("queued after {} jobs", ids.len()),
        (JobState::Queued, Some(gpupool::After::Sweep { sweep }), _) => format!("queued after sweep {sweep}"),
        (JobState::Queued, None, Some(start)) => format!("queued until {}", short(Some(start))),
        (state, _, _) => state.to_string(),
    }
}

/// How long a job's last run took, or has taken so far: `1h02m`, `3m05s`,
/// `12s`; `-` before any run.
fn duration(j: &JobRecord, now: Timestamp) -> String {
    let Some(start) = j.started_at else { return "-".to_owned() };
    let end = match (j.state, j.finished_at) {
        (JobState::Running, _) => now,
        (_, Some(end)) => end,
        (_, None) => return "-".to_owned(),
    };
    let secs = (end.0 - start.0).max(0) / 1000;
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Cuts each line of `text` to `width` characters, ending a cut one with `…`.
pub fn fit_width(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.chars().count() > width && width > 1 {
            out.extend(line.chars().take(width - 1));
            out.push('…');
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The `gpupool errors` table; with `tails`, each record's output tail
/// follows the table.
pub fn errors_table(errors: &[AttemptError], tails: bool) -> String {
    let rows: Vec<Vec<String>> = errors
        .iter()
        .map(|e| {
            vec![
                e.job_id.to_string(),
                e.attempt.to_string(),
                e.kind.to_string(),
                opt(e.exit_code),
                opt(e.signal),
                short(Some(e.at)),
                e.message.clone(),
            ]
        })
        .collect();
    let mut out = table(&["JOB", "ATTEMPT", "KIND", "EXIT", "SIGNAL", "AT", "MESSAGE"], &rows);
    if tails {
        for e in errors.iter().filter(|e| !e.output_tail.is_empty()) {
            out.push_str(&format!("\n--- job {} attempt {} output (tail) ---\n", e.job_id, e.attempt));
            out.push_str(e.output_tail.trim_end());
            out.push('\n');
        }
    }
    out
}

fn yes(v: bool) -> &'static str {
    if v { "yes" } else { "no" }
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// Why queued jobs cannot start on the live workers, one line per reason
/// with the jobs it holds, in order of the jobs' ids. Jobs a live worker can
/// take are not listed; without a worker registry, nothing is known of
/// workers and only the size rule applies.
fn waiting_groups(queued: &[JobRecord], workers: &[WorkerInfo], tracked: bool) -> Vec<(String, Vec<String>)> {
    let largest = workers.iter().filter(|w| !w.lost).map(|w| w.gpus.len()).max();
    let mut groups: std::collections::BTreeMap<(u32, u8), (String, Vec<String>)> = std::collections::BTreeMap::new();
    let mut add = |key: (u32, u8), reason: String, id: &str| {
        groups.entry(key).or_insert_with(|| (reason, Vec::new())).1.push(id.to_owned());
    };
    let mut sorted: Vec<&JobRecord> = queued.iter().collect();
    sorted.sort_by_key(|j| (j.id.as_str().len(), j.id.as_str().to_owned()));
    for job in sorted {
        let id = job.id.as_str();
        match (job.spec.gpus, largest) {
            (Some(n), Some(max)) if n as usize > max => {
                let gpus = if n == 1 { "1 GPU".to_owned() } else { format!("{n} GPUs") };
                add((n, 0), format!("need {gpus}; the largest live worker has {max}"), id);
            }
            (_, Some(_)) => {}
            (_, None) if !tracked => {}
            (Some(0), None) => add((0, 1), "CPU jobs; no worker is live".to_owned(), id),
            (None, None) => {
                add((0, 2), "need a GPU where a worker has one, else the CPU; no worker is live".to_owned(), id);
            }
            (Some(n), None) => {
                let gpus = if n == 1 { "1 GPU".to_owned() } else { format!("{n} GPUs") };
                add((n, 3), format!("need {gpus}; no worker is live"), id);
            }
        }
    }
    groups.into_values().collect()
}

/// "4,998 jobs: REASON".
fn group_title(reason: &str, n: usize) -> String {
    let jobs = if n == 1 { "1 job".to_owned() } else { format!("{} jobs", thousands(n)) };
    format!("{jobs}: {reason}")
}

/// Up to five ids, then how many more.
fn some_ids(ids: &[String]) -> String {
    let shown = ids.iter().take(5).map(|i| format!("job {i}")).collect::<Vec<_>>().join(", ");
    match ids.len() {
        n if n > 5 => format!("{shown} and {} more", thousands(n - 5)),
        _ => shown,
    }
}

/// `4998` as `4,998`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What `gpupool status` shows, read once and printed as a report
/// ([`Status::report`]) or as JSON ([`Status::to_json`]) with the same facts.
#[derive(Debug, Clone)]
pub struct Status {
    /// The queue's URL, password hidden.
    pub url: String,
    /// What the backend declares.
    pub capabilities: gpupool::Capabilities,
    /// Whether workers register (the backend keeps a registry).
    pub tracked: bool,
    /// How many jobs are in each state, in [`JobState::ALL`] order.
    pub counts: Vec<(JobState, usize)>,
    /// The registered workers, lost and draining ones marked.
    pub workers: Vec<WorkerInfo>,
    /// Queued jobs no live worker can take: the reason, and every id.
    pub waiting: Vec<(String, Vec<String>)>,
}

/// A worker's state as `status` names it: `lost`, `draining`,
/// `unhealthy` (a fault of its own environment; why is in `unhealthy`) or
/// `ok`.
pub fn worker_state(w: &WorkerInfo) -> &'static str {
    match (w.lost, w.draining, w.unhealthy.is_some()) {
        (true, _, _) => "lost",
        (false, true, _) => "draining",
        (false, false, true) => "unhealthy",
        (false, false, false) => "ok",
    }
}

/// Reads what `gpupool status` shows: job counts by state, the queued jobs
/// no live worker can take (grouped by why) and the workers given.
pub async fn status(queue: &dyn Queue, url: &str, workers: Vec<WorkerInfo>) -> Result<Status> {
    let mut counts = Vec::new();
    let mut queued = Vec::new();
    for state in JobState::ALL {
        let jobs = queue.list(&ListFilter { state: Some(state), queue: None, limit: 100_000, offset: 0 }).await?;
        counts.push((state, jobs.len()));
        if state == JobState::Queued {
            queued = jobs;
        }
    }
    let tracked = queue.worker_registry().is_some();
    let waiting = waiting_groups(&queued, &workers, tracked);
    Ok(Status { url: redact_url(url), capabilities: queue.capabilities(), tracked, counts, workers, waiting })
}

/// The `gpupool status` report of [`status`].
pub async fn status_report(queue: &dyn Queue, url: &str, workers: &[WorkerInfo]) -> Result<String> {
    Ok(status(queue, url, workers.to_vec()).await?.report())
}

impl Status {
    /// The report: the queue (password hidden), job counts, each worker
    /// with its GPUs and running jobs (lost and draining ones marked), and
    /// the queued jobs no live worker can ever run, with why.
    pub fn report(&self) -> String {
        let caps = self.capabilities;
        let mut out = format!(
            "queue: {}\npriority: {}   GPU-fitting reserve: {}   worker registry: {}\n",
            self.url,
            yes(caps.priority),
            yes(caps.gpu_filter),
            yes(self.tracked)
        );
        let counts: Vec<String> = self.counts.iter().map(|(state, n)| format!("{} {state}", thousands(*n))).collect();
        out.push_str(&format!("jobs: {}\n", counts.join(", ")));

        let now = Timestamp::now();
        let rows: Vec<Vec<String>> = self
            .workers
            .iter()
            .map(|w| {
                let ago = (now.0 - w.seen_at.0).max(0) / 1000;
                vec![
                    w.name.clone(),
                    if w.lost { "LOST".into() } else { worker_state(w).into() },
                    format!("{ago}s ago"),
                    w.queues.join(","),
                    w.gpus.len().to_string(),
                    w.running.iter().map(|r| r.id.to_string()).collect::<Vec<_>>().join(" "),
                ]
            })
            .collect();
        out.push('\n');
        if rows.is_empty() {
            out.push_str(if self.tracked {
                "no worker has registered\n"
            } else {
                "workers are not tracked by this backend\n"
            });
        } else {
            out.push_str(&table(&["WORKER", "STATE", "LAST SEEN", "QUEUES", "GPUS", "RUNNING"], &rows));
        }
        for w in self.workers.iter().filter(|w| !w.gpus.is_empty()) {
            let gpu_rows: Vec<Vec<String>> = w
                .gpus
                .iter()
                .map(|g| {
                    let holder: Vec<String> =
                        w.running.iter().filter(|r| r.gpus.contains(&g.index)).map(|r| r.id.to_string()).collect();
                    vec![
                        g.index.to_string(),
                        if g.name.is_empty() { "-".into() } else { g.name.clone() },
                        if g.memory_total == 0 {
                            "-".into()
                        } else {
                            format!("{}/{} GiB", gib(g.memory_used), gib(g.memory_total))
                        },
                        g.utilization.map_or_else(|| "-".into(), |u| format!("{u}%")),
                        if holder.is_empty() { "-".into() } else { holder.join(" ") },
                    ]
                })
                .collect();
            let note = match worker_state(w) {
                "lost" => " (lost: its jobs return when their leases expire)",
                "draining" => " (draining: takes no new job, waits for its running ones)",
                _ => "",
            };
            out.push_str(&format!("\n{}{note}\n", w.name));
            for line in table(&["GPU", "NAME", "MEMORY", "UTIL", "JOB"], &gpu_rows).lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
        for w in &self.workers {
            if let (Some(why), false) = (&w.unhealthy, w.lost) {
                out.push_str(&format!("\n{} is unhealthy: {why}\n", w.name));
            }
        }
        for (reason, ids) in &self.waiting {
            out.push_str(&format!("\nwaiting: {} ({})\n", group_title(reason, ids.len()), some_ids(ids)));
        }
        out
    }

    /// The same facts as JSON: `queue`, `capabilities`, `jobs` (a count per
    /// state), `workers` (each with `state`: `ok`, `draining` or `lost`, its
    /// GPUs and running jobs) and `waiting` (each group's `reason`, `count`
    /// and every job id).
    pub fn to_json(&self) -> serde_json::Value {
        let jobs: serde_json::Map<String, serde_json::Value> =
            self.counts.iter().map(|(state, n)| (state.as_str().to_owned(), (*n).into())).collect();
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|w| {
                let mut v = serde_json::to_value(w).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("state".into(), worker_state(w).into());
                    obj.insert("seen_at".into(), w.seen_at.to_rfc3339().into());
                    obj.insert("started_at".into(), w.started_at.to_rfc3339().into());
                }
                v
            })
            .collect();
        let waiting: Vec<serde_json::Value> = self
            .waiting
            .iter()
            .map(|(reason, ids)| serde_json::json!({"reason": reason, "count": ids.len(), "jobs": ids}))
            .collect();
        serde_json::json!({
            "queue": self.url,
            "capabilities": {
                "priority": self.capabilities.priority,
                "gpu_filter": self.capabilities.gpu_filter,
                "worker_registry": self.tracked,
            },
            "jobs": jobs,
            "workers": workers,
            "waiting": waiting,
        })
    }
}
