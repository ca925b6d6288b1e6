//! The `gpupool` command line: parsing, settings, and one function per
//! command, run over a [`Registry`] so that a team's own binary with its own
//! backend gets every command ([`main_with`]).
//!
//! The original tool's command names work as aliases: `server` (init),
//! `client` (worker), `message` (jobs), `error` (errors), and `-id N`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gpupool::gpu::GpuSelection;
use gpupool::redact::redact_url;
use gpupool::{
    CancelOutcome, CredentialPrompt, Credentials, Error, GitWorkspace, JobId, JobSpec, JobState, ListFilter, Pushed,
    Queue, Registry, Result, Worker, WorkerConfig, message,
};

use crate::{FileConfig, errors_table, jobs_table, parse_duration};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "gpupool", version, about = "A git-aware job queue for a pool of GPU servers")]
struct Cli {
    /// Queue URL, such as sqlite://.gpupool/queue.db (env GPUPOOL_QUEUE).
    #[arg(long, global = true, value_name = "URL")]
    queue: Option<String>,
    /// Folder for mirrors, checkouts, logs and the setup cache (env GPUPOOL_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Print only the results: no line on stderr naming the queue read.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or migrate the queue's schema (idempotent).
    #[command(alias = "server")]
    Init,
    /// Push jobs from JSON files (default ./message.json).
    Push {
        /// Files holding one job object or an array of them; `-` reads
        /// standard input.
        files: Vec<PathBuf>,
        /// Set an arg on every job: --set lr=0.01 (JSON values, else strings).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Create the queue first if there is none (as `gpupool init`).
        #[arg(long)]
        init: bool,
        /// Run the code of this git working tree as it is now: what differs
        /// from the newest commit the remote has (unpushed commits, staged
        /// and unstaged changes, untracked files that are not ignored) is
        /// stored with the jobs and applied over that commit.
        #[arg(long)]
        snapshot: bool,
        /// The largest snapshot, in MiB.
        #[arg(long, value_name = "MIB", default_value_t = 16, requires = "snapshot")]
        snapshot_limit: u64,
    },
    /// List jobs, newest first, or show one.
    #[command(alias = "message")]
    Jobs {
        /// Show this job.
        #[arg(long)]
        id: Option<String>,
        /// Only jobs of this queue name (such as `high`; the backend is --queue).
        #[arg(long = "in", value_name = "NAME")]
        in_queue: Option<String>,
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Skip this many (the page start).
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Order the listed jobs by a result key: `KEY` ascending, `-KEY`
        /// descending (jobs without it last).
        #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
        sort: Option<String>,
        /// The runs of this sweep, best first by its metric, with their
        /// swept args (all of them: not with --id, --in, --state, --sort).
        #[arg(long, value_name = "ID", conflicts_with_all = ["id", "in_queue", "state", "sort"])]
        sweep: Option<String>,
    },
    /// Push the runs of a sweep: a file in W&B's sweep format (YAML or
    /// JSON) with gpupool's job fields (git_ref, gpus, queue, …). Pushing
    /// the same file again adds nothing.
    Sweep {
        /// The sweep file.
        file: PathBuf,
        /// Print the jobs; push nothing.
        #[arg(long)]
        dry_run: bool,
        /// Create the queue first if there is none (as `gpupool init`).
        #[arg(long)]
        init: bool,
    },
    /// List the sweeps: each one's progress and its best run so far.
    Sweeps,
    /// Serve the dashboard: jobs, one job with its live log, workers and
    /// sweeps, in a browser.
    Ui {
        /// Where to listen (loopback by default).
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: std::net::SocketAddr,
        /// The token actions (cancel, retry) need; made and printed at
        /// start when not given.
        #[arg(long, env = "GPUPOOL_UI_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// List failed attempts, newest first, with their output tails.
    #[command(alias = "error")]
    Errors {
        /// Only this job's.
        #[arg(long)]
        id: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Run a worker on this host's GPUs.
    #[command(alias = "client")]
    Worker(WorkerArgs),
    /// Cancel jobs: queued ones at once, running ones through their worker.
    Cancel {
        /// Job ids.
        ids: Vec<String>,
        #[command(flatten)]
        select: Select,
    },
    /// Put failed or cancelled jobs back in the queue.
    Retry {
        /// Job ids.
        ids: Vec<String>,
        #[command(flatten)]
        select: Select,
    },
    /// Print a job's log (the local file if this host ran it, else the stored tail).
    Logs {
        /// Job id.
        id: String,
        /// Print output as it arrives until the job ends; exit 0 if it
        /// succeeded, 1 otherwise.
        #[arg(short, long)]
        follow: bool,
    },
    /// List the files a job's run kept, and where they are.
    Artifacts {
        /// Job id.
        id: String,
    },
    /// Download the files a job's run kept into DEST (default ./runs/ID/).
    Pull {
        /// Job id.
        id: String,
        /// Where to put them.
        dest: Option<PathBuf>,
        /// The artifact store whose options (endpoint, region, keys) apply
        /// when it names the files' bucket (env GPUPOOL_ARTIFACTS).
        #[arg(long, env = "GPUPOOL_ARTIFACTS", hide_env_values = true, value_name = "URL")]
        artifacts: Option<String>,
    },
    /// Show the queue, its workers with their GPUs, and jobs that cannot start.
    Status,
    /// Print the settings in force and where each came from.
    Config,
}

/// Jobs chosen by what they are rather than by id (`cancel`, `retry`).
#[derive(Debug, Clone, Default, clap::Args)]
struct Select {
    /// Also every job in this state.
    #[arg(long)]
    state: Option<String>,
    /// Also every job of this queue name (with --state or --name: only those).
    #[arg(long = "in", value_name = "NAME")]
    in_queue: Option<String>,
    /// Also every job whose name matches this pattern (`*` and `?`).
    #[arg(long, value_name = "GLOB")]
    name: Option<String>,
    /// Act on more than 10 jobs.
    #[arg(long)]
    yes: bool,
}

/// More jobs than this need `--yes`.
const BULK_CONFIRM: usize = 10;

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Create the queue first if there is none (as `gpupool init`).
    #[arg(long)]
    init: bool,
    /// Repository for jobs that name none (env GPUPOOL_REPO).
    #[arg(long, env = "GPUPOOL_REPO", hide_env_values = true)]
    repo: Option<String>,
    /// Queues to serve, in priority order (env GPUPOOL_QUEUES).
    #[arg(long, env = "GPUPOOL_QUEUES", hide_env_values = true, value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// auto, none, or GPU indices such as 0,2 (env GPUPOOL_GPUS).
    #[arg(long, env = "GPUPOOL_GPUS", hide_env_values = true)]
    gpus: Option<String>,
    /// Parallel runs on a host without GPUs.
    #[arg(long, env = "GPUPOOL_SLOTS", hide_env_values = true)]
    slots: Option<usize>,
    /// Jobs sharing one GPU.
    #[arg(long, env = "GPUPOOL_SLOTS_PER_GPU", hide_env_values = true)]
    slots_per_gpu: Option<usize>,
    /// A GPU none of this worker's jobs holds counts as free only while at
    /// least this percentage of its memory is free (default 90).
    #[arg(long, env = "GPUPOOL_GPU_FREE_MEMORY", hide_env_values = true, value_name = "PCT")]
    gpu_free_memory: Option<f64>,
    /// Lease length, such as 60s.
    #[arg(long, env = "GPUPOOL_LEASE", hide_env_values = true)]
    lease: Option<String>,
    /// Heartbeat interval, such as 10s.
    #[arg(long, env = "GPUPOOL_HEARTBEAT", hide_env_values = true)]
    heartbeat: Option<String>,
    /// How long shutdown waits for running jobs, such as 10m.
    #[arg(long, env = "GPUPOOL_DRAIN_TIMEOUT", hide_env_values = true)]
    drain_timeout: Option<String>,
    /// Setup step run in the checkout before each job, such as "pip install -r requirements.txt".
    #[arg(long, env = "GPUPOOL_SETUP", hide_env_values = true)]
    setup: Option<String>,
    /// Command before the entrypoint (default python3); {gpus} expands.
    #[arg(long, env = "GPUPOOL_COMMAND", hide_env_values = true)]
    command: Option<String>,
    /// Remove kept outputs (DATA_DIR/outputs) unchanged for this long, such
    /// as 30d; by default they stay until you remove them.
    #[arg(long, env = "GPUPOOL_OUTPUTS_MAX_AGE", hide_env_values = true)]
    outputs_max_age: Option<String>,
    /// Upload each run's files, once it ends, to this store: file:///dir,
    /// s3://bucket/prefix, gs://bucket/prefix or az://container/prefix
    /// (env GPUPOOL_ARTIFACTS).
    #[arg(long, env = "GPUPOOL_ARTIFACTS", hide_env_values = true, value_name = "URL")]
    artifacts: Option<String>,
    /// Keep the local copy of uploaded files too (by default it is removed
    /// once the upload is verified).
    #[arg(long)]
    keep_outputs: bool,
    /// Exit once nothing runs here and nothing can be reserved.
    #[arg(long)]
    burst: bool,
}

/// The seed wrote `message -id 2`; clap reads `--id`.
fn seed_args() -> Vec<String> {
    std::env::args().map(|a| if a == "-id" { "--id".to_owned() } else { a }).collect()
}

/// Runs the `gpupool` command with the backends of `registry`: what the
/// `gpupool` binary does with [`Registry::with_defaults`], and what a team's
/// own binary does with its backend added.
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     let mut registry = gpupool::Registry::with_defaults();
///     // registry.add::<my_backend::MyQueue>();
///     gpupool_cli::main_with(registry)
/// }
/// ```
pub fn main_with(registry: Registry) -> ExitCode {
    // Started as a run's supervisor: supervise and exit (gpupool_worker::supervisor).
    gpupool::worker::supervisor::run_if_asked();
    let cli = Cli::parse_from(seed_args());
    let default_level = if matches!(cli.command, Command::Worker(_)) { "info" } else { "warn" };
    // A program that set up tracing itself keeps its own.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GPUPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(own_logs(default_level))),
        )
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli, &registry)) {
        Ok(code) => code,
        Err(e) => {
            say(&redact_url(&e.to_string()));
            ExitCode::FAILURE
        }
    };
    // A git fetch abandoned in a silent socket (gpupool_worker::git) must
    // not keep a stopped worker from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// The default log filter: gpupool's own crates at `level`, every library
/// (drivers, lapin, sqlx) off; `GPUPOOL_LOG=warn` or `GPUPOOL_LOG=lapin=debug`
/// shows them. Their errors reach the user through gpupool's own message.
fn own_logs(level: &str) -> String {
    let ours = [
        "gpupool",
        "gpupool_cli",
        "gpupool_core",
        "gpupool_worker",
        "gpupool_sqlite",
        "gpupool_mysql",
        "gpupool_redis",
        "gpupool_amqp",
    ];
    let mut filter = String::from("off");
    for target in ours {
        filter.push_str(&format!(",{target}={level}"));
    }
    filter
}

/// Writes to standard output. A reader that went away (`gpupool jobs |
/// head`) ends the command quietly with status 141 (128 + SIGPIPE), as a
/// shell reports for `ls | head`; any other write error ends it with one
/// line on stderr. Never panics, unlike `print!`.
pub(crate) fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        say(&format!("cannot write to standard output: {e}"));
        std::process::exit(1);
    }
}

/// The width tables are cut to: `COLUMNS` when set, else the terminal's
/// when standard output is one; `None` (no cut) into a pipe or a file.
fn terminal_width() -> Option<usize> {
    if let Some(cols) = std::env::var("COLUMNS").ok().and_then(|c| c.parse::<usize>().ok()).filter(|c| *c > 0) {
        return Some(cols);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    terminal_size::terminal_size().map(|(terminal_size::Width(w), _)| usize::from(w))
}

/// One line to stderr, prefixed `gpupool: `; a closed stderr is ignored.
pub(crate) fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "gpupool: {text}");
}

/// Settings after flags, environment, `gpupool.toml` and defaults.
struct Settings {
    url: String,
    data_dir: PathBuf,
    file: FileConfig,
    /// Where `url` and `data_dir` came from, and the config file read.
    sources: Sources,
}

/// Where each setting came from (`gpupool config`).
struct Sources {
    url: String,
    data_dir: String,
    file: Option<PathBuf>,
}

fn is_url(v: &str) -> bool {
    v.contains("://") || v.starts_with("sqlite:") || v.starts_with("memory:")
}

fn settings(cli: &Cli) -> Result<Settings> {
    let (file, file_path) = crate::find_config(&std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")))?;
    let from_file = file_path.as_ref().map_or_else(String::new, |p| p.display().to_string());
    // `--queue` is always the URL; a queue name for `jobs` is `--in NAME`.
    let flag_url = match &cli.queue {
        Some(v) if is_url(v) => Some(v.clone()),
        Some(v) => {
            let hint = if matches!(cli.command, Command::Jobs { .. }) {
                format!("; to list the jobs of queue `{v}`, use `gpupool jobs --in {v}`")
            } else {
                String::new()
            };
            return Err(Error::Config(format!(
                "--queue `{v}` is not a queue URL; write it like sqlite://.gpupool/queue.db{hint}"
            )));
        }
        None => None,
    };
    let (url, url_from) = flag_url
        .map(|u| (u, "--queue".to_owned()))
        .or_else(|| std::env::var("GPUPOOL_QUEUE").ok().filter(|v| !v.is_empty()).map(|u| (u, "GPUPOOL_QUEUE".into())))
        .or_else(|| file.queue.clone().map(|u| (u, from_file.clone())))
        .unwrap_or_else(|| (crate::DEFAULT_QUEUE_URL.to_owned(), "default".into()));
    let (data_dir, data_dir_from) = cli
        .data_dir
        .clone()
        .map(|d| (d, "--data-dir".to_owned()))
        .or_else(|| {
            std::env::var_os("GPUPOOL_DATA_DIR")
                .filter(|v| !v.is_empty())
                .map(|d| (PathBuf::from(d), "GPUPOOL_DATA_DIR".into()))
        })
        .or_else(|| file.data_dir.clone().map(|d| (d, from_file.clone())))
        .unwrap_or_else(|| (crate::default_data_dir(), "default".into()));
    let sources = Sources { url: url_from, data_dir: data_dir_from, file: file_path };
    Ok(Settings { url, data_dir, file, sources })
}

fn job_id(s: &str) -> Result<JobId> {
    s.parse()
}

pub(crate) fn print_json(v: &serde_json::Value) {
    out(&(serde_json::to_string_pretty(v).unwrap_or_else(|_| "[]".to_owned()) + "\n"));
}

async fn run(cli: Cli, registry: &Registry) -> Result<ExitCode> {
    let s = settings(&cli)?;
    if matches!(cli.command, Command::Config) {
        config(&s, cli.json);
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Sweep { file, dry_run: true, .. } = &cli.command {
        crate::sweeps::dry_run(file, cli.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let creates = match &cli.command {
        Command::Init => true,
        Command::Push { init, .. } | Command::Sweep { init, .. } => *init,
        Command::Worker(args) => args.init,
        _ => false,
    };
    if !creates {
        no_queue_is_created(&s.url)?;
    }
    let queue = if matches!(cli.command, Command::Worker(_)) {
        connect_waiting(registry, &s.url).await?
    } else {
        registry.connect(&s.url).await?
    };
    if creates && !matches!(cli.command, Command::Init) {
        queue.init().await?;
    }
    // A server database, Redis prefix or RabbitMQ vhost that init never set
    // up: said so, rather than a driver's "table doesn't exist" or an empty
    // table for a mistyped URL.
    if !creates && !queue.exists().await? {
        return Err(no_queue(&s.url));
    }
    let json = cli.json;
    let reads = matches!(
        cli.command,
        Command::Jobs { .. } | Command::Errors { .. } | Command::Status | Command::Logs { .. } | Command::Sweeps
    );
    if reads && !json && !cli.quiet {
        // Which queue a table came from, so that an empty one is not a mystery.
        say(&format!("reading {}", redact_url(&s.url)));
    }
    match cli.command {
        Command::Init => {
            queue.init().await?;
            out(&format!("queue ready: {}\n", redact_url(&s.url)));
        }
        Command::Push { files, set, snapshot, snapshot_limit, .. } => {
            let snapshot = snapshot.then(|| snapshot_limit.saturating_mul(1 << 20));
            push(queue.as_ref(), files, &set, snapshot, json).await?;
        }
        Command::Jobs { sweep: Some(sweep), .. } => crate::sweeps::runs(queue.as_ref(), &sweep, json).await?,
        Command::Jobs { id, in_queue, state, limit, offset, sort, sweep: None } => {
            let page = ListPage { queue: in_queue, limit, offset };
            jobs(queue.as_ref(), id, state, page, sort.as_deref(), json).await?;
        }
        Command::Sweep { file, .. } => crate::sweeps::push(queue.as_ref(), &file, json).await?,
        Command::Sweeps => crate::sweeps::list(queue.as_ref(), json).await?,
        Command::Ui { listen, token } => {
            let store = s.file.artifacts.clone();
            crate::ui::serve(Arc::clone(&queue), redact_url(&s.url), listen, token, store).await?;
        }
        Command::Errors { id, limit } => errors(queue.as_ref(), id, limit, json).await?,
        Command::Worker(args) => return worker(queue, &s, args).await,
        Command::Cancel { ids, select } => {
            let ids = selected(queue.as_ref(), ids, &select, "cancel").await?;
            return cancel(queue.as_ref(), &ids).await;
        }
        Command::Retry { ids, select } => {
            let ids = selected(queue.as_ref(), ids, &select, "retry").await?;
            return retry(queue.as_ref(), &ids).await;
        }
        Command::Status => status(queue.as_ref(), &s.url, json).await?,
        Command::Artifacts { id } => artifacts(queue.as_ref(), &id, json).await?,
        Command::Pull { id, dest, artifacts } => {
            let store = artifacts.or_else(|| s.file.artifacts.clone());
            pull(queue.as_ref(), &id, dest, store.as_deref(), json).await?;
        }
        Command::Logs { id, follow: false } => logs(queue.as_ref(), &s, &id).await?,
        Command::Logs { id, follow: true } => return follow_log(queue.as_ref(), &id).await,
        Command::Config => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// A worker waits for its backend: a host that boots before its database,
/// or a worker restarted during a backend outage, starts work when the
/// backend is back instead of exiting. Retries with backoff (1 s doubling
/// to 30 s) while the backend is unavailable; SIGTERM or Ctrl-C gives up.
/// Any other error (a bad URL, a refused password) ends at once.
async fn connect_waiting(registry: &Registry, url: &str) -> Result<Arc<dyn Queue>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut pause = std::time::Duration::from_secs(1);
    let mut term = signal(SignalKind::terminate()).ok();
    loop {
        let err = match registry.connect(url).await {
            Ok(queue) => match queue.exists().await {
                Ok(_) => return Ok(queue),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !err.is_retryable() {
            return Err(err);
        }
        tracing::warn!("{}; trying again in {pause:?}", redact_url(&err.to_string()));
        let term = async {
            match &mut term {
                Some(t) => drop(t.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = tokio::signal::ctrl_c() => return Err(err),
            () = term => return Err(err),
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(30));
    }
}

/// Which page of which queue `jobs` lists.
struct ListPage {
    queue: Option<String>,
    limit: u32,
    offset: u64,
}

/// A config value as written: strings without their JSON quotes.
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Only `init` (and `worker`/`push` with `--init`) creates a queue: an
/// embedded queue file that is not there is an error naming the command that
/// makes it, and nothing is created. (A typo in a folder or a path must not
/// give an empty queue that looks real.)
fn no_queue_is_created(url: &str) -> Result<()> {
    // Opening a SQLite file creates it, so this one is looked for first;
    // every other backend answers `Queue::exists` once connected.
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        let opts = gpupool::sqlite::SqliteOptions::from_url(url)?;
        if !opts.path.exists() {
            return Err(no_queue(url));
        }
    }
    let _ = url;
    Ok(())
}

/// The error for a URL where no queue was set up.
fn no_queue(url: &str) -> Error {
    let shown = redact_url(url);
    Error::Config(format!(
        "no gpupool queue at {shown}; create it with `gpupool init --queue {shown}` (or give --queue the queue you \
         meant)"
    ))
}

/// `gpupool config`: each setting in force and where it came from.
fn config(s: &Settings, json: bool) {
    let file = s.sources.file.as_ref().map_or_else(|| "none".to_owned(), |p| p.display().to_string());
    let mut rows: Vec<(String, String, String)> = vec![
        ("queue".into(), redact_url(&s.url), s.sources.url.clone()),
        ("data_dir".into(), s.data_dir.display().to_string(), s.sources.data_dir.clone()),
    ];
    // Every other key the file sets, as the file gives it.
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(&s.file) {
        for (key, value) in map {
            match (key.as_str(), value) {
                ("queue" | "data_dir", _) | (_, serde_json::Value::Null) => {}
                ("artifacts", serde_json::Value::String(url)) => {
                    rows.push((key, gpupool::worker::store::shown(&url), file.clone()));
                }
                ("worker", serde_json::Value::Object(worker)) => {
                    for (k, v) in worker.into_iter().filter(|(_, v)| !v.is_null()) {
                        rows.push((format!("worker.{k}"), plain(&v), file.clone()));
                    }
                }
                (_, serde_json::Value::Array(a)) if a.is_empty() => {}
                (_, value) => rows.push((key, redact_url(&plain(&value)), file.clone())),
            }
        }
    }
    if json {
        let items = rows.iter().map(|(k, v, from)| serde_json::json!({"key": k, "value": v, "from": from})).collect();
        print_json(&serde_json::Value::Array(items));
        return;
    }
    let table_rows: Vec<Vec<String>> = rows.into_iter().map(|(k, v, from)| vec![k, v, from]).collect();
    out(&format!("config file: {file}\n{}", crate::table(&["SETTING", "VALUE", "FROM"], &table_rows)));
}

async fn jobs(
    queue: &dyn Queue,
    id: Option<String>,
    state: Option<String>,
    page: ListPage,
    sort: Option<&str>,
    json: bool,
) -> Result<()> {
    let mut jobs = match id {
        Some(id) => vec![queue.get(&job_id(&id)?).await?],
        None => {
            let state = state.map(|s| s.parse::<JobState>()).transpose()?;
            let filter = ListFilter { state, queue: page.queue, limit: page.limit, offset: page.offset };
            queue.list(&filter).await?
        }
    };
    if let Some(key) = sort {
        if key.trim_start_matches('-').is_empty() {
            return Err(Error::Config("--sort needs a result key, such as `--sort -val_acc`".to_owned()));
        }
        crate::sort_by_result(&mut jobs, key);
    }
    if json {
        print_json(&serde_json::Value::Array(jobs.iter().map(|j| j.to_json()).collect()));
        return Ok(());
    }
    match terminal_width() {
        Some(width) => out(&crate::fit_width(&crate::jobs_table_within(&jobs, width), width)),
        None => out(&jobs_table(&jobs)),
    }
    if let [job] = jobs.as_slice() {
        out(&format!("\nargs: {}\n", serde_json::Value::Object(job.spec.args.clone())));
        if !job.errors.is_empty() {
            out(&format!("failed attempts: {} (gpupool errors --id {})\n", job.errors.len(), job.id));
        }
        if let Some(a) = &job.artifacts {
            let size = gpupool::artifacts::human_size(a.total_bytes());
            out(&format!("files: {} ({size}) at {} (gpupool artifacts {})\n", a.files.len(), a.location, job.id));
        }
    }
    Ok(())
}

async fn errors(queue: &dyn Queue, id: Option<String>, limit: u32, json: bool) -> Result<()> {
    let id = id.map(|i| job_id(&i)).transpose()?;
    if let Some(id) = &id {
        queue.get(id).await?; // an unknown id is an error, not an empty list
    }
    let errors = queue.errors(id.as_ref(), limit).await?;
    if json {
        print_json(&serde_json::Value::Array(errors.iter().map(|e| e.to_json()).collect()));
    } else {
        out(&errors_table(&errors, id.is_some()));
    }
    Ok(())
}

/// The ids given, and the jobs `select` picks (state, queue name, name
/// pattern; together they narrow), each once. Says how many; refuses more
/// than [`BULK_CONFIRM`] without `--yes`.
async fn selected(queue: &dyn Queue, mut ids: Vec<String>, select: &Select, verb: &str) -> Result<Vec<String>> {
    let by_filter = select.state.is_some() || select.in_queue.is_some() || select.name.is_some();
    if by_filter {
        let state = select.state.as_deref().map(str::parse::<JobState>).transpose()?;
        for job in all_jobs(queue, state, select.in_queue.clone()).await? {
            let named = select.name.as_deref().is_none_or(|g| job.spec.name.as_deref().is_some_and(|n| glob(g, n)));
            if named && !ids.contains(&job.id.to_string()) {
                ids.push(job.id.to_string());
            }
        }
    }
    if ids.is_empty() {
        return Err(Error::Config(if by_filter {
            format!("no job matches; nothing to {verb}")
        } else {
            format!("name the jobs to {verb}: ids, or --state, --in, --name")
        }));
    }
    if ids.len() > BULK_CONFIRM && !select.yes {
        return Err(Error::Config(format!(
            "this would {verb} {} jobs; add --yes to go ahead (more than {BULK_CONFIRM} need it)",
            ids.len()
        )));
    }
    if by_filter {
        say(&format!("{verb}: {} job(s)", ids.len()));
    }
    Ok(ids)
}

/// Every job in `state` and queue `in_queue` (each when given), newest
/// first, read page by page.
pub(crate) async fn all_jobs(
    queue: &dyn Queue,
    state: Option<JobState>,
    in_queue: Option<String>,
) -> Result<Vec<gpupool::JobRecord>> {
    gpupool::all_jobs(queue, &ListFilter { state, queue: in_queue, ..ListFilter::default() }).await
}

/// Whether `text` matches `pattern`, where `*` is any run of characters and
/// `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

async fn cancel(queue: &dyn Queue, ids: &[String]) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match queue.request_cancel(&job_id(id)?).await {
            Ok(CancelOutcome::Cancelled) => out(&format!("job {id}: cancelled\n")),
            Ok(CancelOutcome::Requested) => {
                out(&format!("job {id}: cancel requested; its worker stops it at its next heartbeat\n"))
            }
            Ok(CancelOutcome::AlreadyEnded(state)) => out(&format!("job {id}: already {state}\n")),
            Ok(_) => out(&format!("job {id}: done\n")),
            Err(e) => {
                say(&e.to_string());
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn retry(queue: &dyn Queue, ids: &[String]) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match queue.retry(&job_id(id)?).await {
            Ok(()) => out(&format!("job {id}: queued again\n")),
            Err(e) => {
                say(&e.to_string());
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn status(queue: &dyn Queue, url: &str, json: bool) -> Result<()> {
    let workers = match queue.worker_registry() {
        Some(registry) => registry.workers().await?,
        None => Vec::new(),
    };
    let status = crate::status(queue, url, workers).await?;
    if json {
        print_json(&status.to_json());
    } else {
        out(&status.report());
    }
    Ok(())
}

/// The local log file if this host ran the job, else the stored tail.
async fn logs(queue: &dyn Queue, s: &Settings, id: &str) -> Result<()> {
    let id = job_id(id)?;
    let job = queue.get(&id).await?;
    // This host ran it: its own file is the whole log. Kept per queue:
    // another queue's job with the same id is another file.
    let local = gpupool::worker::log_path(&s.data_dir, &redact_url(&s.url), &id);
    if let Ok(text) = std::fs::read_to_string(&local) {
        out(&text);
        return Ok(());
    }
    // Another host ran it: the log its worker shipped, where the backend
    // keeps one.
    if let Some(logs) = queue.run_logs()
        && print_shipped(logs, &id, 0).await? > 0
    {
        return Ok(());
    }
    let tail = job.output_tail.clone().or_else(|| job.errors.last().map(|e| e.output_tail.clone()));
    match tail {
        Some(t) if !t.is_empty() => out(&t),
        _ => say(&format!("no log for job {id} on this host and no stored output yet")),
    }
    Ok(())
}

/// `gpupool artifacts ID`: the files a job's run kept and where they are.
async fn artifacts(queue: &dyn Queue, id: &str, json: bool) -> Result<()> {
    let id = job_id(id)?;
    let job = queue.get(&id).await?;
    if json {
        print_json(&serde_json::to_value(&job.artifacts).unwrap_or_default());
        return Ok(());
    }
    let Some(a) = job.artifacts else {
        out(&format!(
            "job {id} kept no files{}
",
            if job.state.is_terminal() { "" } else { " yet" }
        ));
        return Ok(());
    };
    let size = gpupool::artifacts::human_size(a.total_bytes());
    let place = if a.stored { "in the artifact store".to_owned() } else { "on the worker's disk".to_owned() };
    let mut text = format!(
        "job {id} attempt {}: {} file(s), {size}, {place}
{}
",
        a.attempt,
        a.files.len(),
        a.location
    );
    if let Some(e) = &a.error {
        text.push_str(&format!(
            "note: {e}
"
        ));
    }
    let rows: Vec<Vec<String>> =
        a.files.iter().map(|f| vec![f.path.clone(), gpupool::artifacts::human_size(f.size)]).collect();
    text.push_str(&crate::table(&["FILE", "SIZE"], &rows));
    out(&text);
    Ok(())
}

/// `gpupool pull ID [DEST]`: the files a job's run kept, from the artifact
/// store (or this host's disk) into DEST.
async fn pull(queue: &dyn Queue, id: &str, dest: Option<PathBuf>, store: Option<&str>, json: bool) -> Result<()> {
    use gpupool::worker::ArtifactStore;
    let id = job_id(id)?;
    let job = queue.get(&id).await?;
    let Some(a) = job.artifacts else {
        let when = if job.state.is_terminal() { "" } else { " yet (it has not ended)" };
        return Err(Error::Config(format!("job {id} kept no files{when}; nothing to pull")));
    };
    let dest = dest.unwrap_or_else(|| PathBuf::from("runs").join(id.as_str()));
    let from = if a.stored {
        ArtifactStore::at_location(&a.location, store).map_err(Error::Config)?
    } else {
        // On a worker's disk: readable here only if this is that host.
        let (host, path) = a.location.split_once(':').unwrap_or(("", a.location.as_str()));
        let this_host = gpupool::default_worker_name().rsplit_once(':').map(|(h, _)| h.to_owned()).unwrap_or_default();
        let why = a.error.as_deref().map_or_else(String::new, |e| format!(" ({e})"));
        if host != this_host || !std::path::Path::new(path).is_dir() {
            return Err(Error::Config(format!(
                "job {id}'s files are not in an artifact store: they are on host {host} at {path}{why}; \
                 copy them from there, such as `scp -r {host}:{path} {}`",
                dest.display()
            )));
        }
        ArtifactStore::at_location(&format!("file://{path}"), None).map_err(Error::Config)?
    };
    let bytes = from.download(&a.files, &dest).await.map_err(|e| Error::Config(format!("pull of job {id}: {e}")))?;
    if json {
        let files: Vec<String> = a.files.iter().map(|f| f.path.clone()).collect();
        print_json(
            &serde_json::json!({"job": id.as_str(), "dest": dest.display().to_string(), "files": files, "bytes": bytes}),
        );
    } else {
        out(&format!(
            "pulled {} file(s), {}, of job {id} into {}\n",
            a.files.len(),
            gpupool::artifacts::human_size(bytes),
            dest.display()
        ));
    }
    Ok(())
}

/// Prints job `id`'s shipped log from byte `from` to its end so far, and
/// what the cap dropped before it; returns the offset to go on from (`from`
/// when nothing was printed).
async fn print_shipped(logs: &dyn gpupool::RunLogs, id: &JobId, mut from: u64) -> Result<u64> {
    loop {
        let page = logs.read_log(id, from).await?;
        if page.dropped > 0 {
            out(&format!(
                "== gpupool: {} bytes of earlier output dropped (the log keeps the last 16 MiB)\n",
                page.dropped
            ));
        }
        if page.text.is_empty() {
            return Ok(from);
        }
        out(&page.text);
        from = page.next;
    }
}

/// `gpupool logs -f`: the shipped log as it arrives, each line once and in
/// order, until the job ends; exit 0 if it succeeded, 1 otherwise.
async fn follow_log(queue: &dyn Queue, id: &str) -> Result<ExitCode> {
    let id = job_id(id)?;
    let Some(logs) = queue.run_logs() else {
        return Err(Error::Config(format!(
            "this queue's backend does not keep running jobs' output (every in-tree backend does); \
             `gpupool logs {id}` on the worker's host reads its log"
        )));
    };
    let mut from = 0;
    loop {
        // The state first: output shipped before the end is then all in.
        let state = queue.get(&id).await?.state;
        from = print_shipped(logs, &id, from).await?;
        if state.is_terminal() {
            say(&format!("job {id} {state}"));
            return Ok(if state == JobState::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The checks of a job that is held back (`not_before`, `after`,
/// `retry.backoff`) that need the queue: the backend must be able to hold
/// a job back, and the jobs `after` names must exist (the sweep form
/// becomes the list of the sweep's runs).
pub(crate) async fn held_back_here(queue: &dyn Queue, job: &mut JobSpec) -> Result<()> {
    let backoff = job.retry.as_ref().is_some_and(|r| r.backoff.is_some());
    if (job.not_before.is_some() || job.after.is_some() || backoff) && !queue.capabilities().delays {
        return Err(Error::InvalidJob(
            "this backend cannot hold a job back, which not_before, after and retry.backoff need".to_owned(),
        ));
    }
    if let Some(after) = &job.after {
        job.after = Some(gpupool::after::resolve(queue, after).await?);
        // A sweep may have more runs than one job may wait for.
        job.validate()?;
    }
    Ok(())
}

/// A snapshot of the working tree around the current directory, checked
/// against `limit` bytes and stored in the queue; what jobs name it by.
async fn take_snapshot(queue: &dyn Queue, limit: u64) -> Result<gpupool::SnapshotRef> {
    use gpupool::worker::snapshot;
    let here = std::env::current_dir().map_err(|e| Error::Config(format!("cannot read the current directory: {e}")))?;
    let taken = tokio::task::spawn_blocking(move || snapshot::take(&here))
        .await
        .map_err(|e| Error::Config(format!("the snapshot task failed: {e}")))?
        .map_err(Error::Config)?;
    let bytes = taken.bundle.encode();
    snapshot::check_size(&taken.bundle, bytes.len(), limit).map_err(Error::Config)?;
    let blobs = queue.blobs().ok_or_else(|| Error::Config("this backend cannot store a snapshot".to_owned()))?;
    let hash = snapshot::hash(&bytes);
    blobs.put_blob(&hash, &bytes).await?;
    say(&format!(
        "snapshot {} ({} file(s), {} bytes) over {} ({})",
        &hash[..12],
        taken.bundle.entries.len(),
        bytes.len(),
        &taken.base[..12],
        taken.base_from
    ));
    Ok(gpupool::SnapshotRef { base: taken.base, hash, bytes: bytes.len() as u64 })
}

async fn push(queue: &dyn Queue, files: Vec<PathBuf>, set: &[String], snapshot: Option<u64>, json: bool) -> Result<()> {
    let snapshot = match snapshot {
        Some(limit) => Some(take_snapshot(queue, limit).await?),
        None => None,
    };
    let files = if files.is_empty() { vec![PathBuf::from("message.json")] } else { files };
    let mut overrides = Vec::new();
    for pair in set {
        let (k, v) = pair.split_once('=').ok_or_else(|| Error::Config(format!("--set `{pair}` is not KEY=VALUE")))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
        overrides.push((k.to_owned(), value));
    }
    // Every file is read and checked before anything is pushed.
    let mut batches: Vec<(PathBuf, Vec<JobSpec>)> = Vec::new();
    for file in files {
        let text = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
                .map_err(|e| Error::Config(format!("cannot read standard input: {e}")))?;
            text
        } else {
            std::fs::read_to_string(&file).map_err(|e| Error::Config(format!("cannot read {}: {e}", file.display())))?
        };
        let mut jobs = message::parse_jobs(&text).map_err(|e| match e {
            Error::InvalidJob(m) => Error::InvalidJob(format!("{}: {m}", file.display())),
            other => other,
        })?;
        for job in &mut jobs {
            for (k, v) in &overrides {
                job.args.insert(k.clone(), v.clone());
            }
            job.validate().map_err(|e| Error::Config(format!("{}: --set makes a job invalid: {e}", file.display())))?;
            if let Some(snap) = &snapshot {
                // The snapshot's base is the code it applies to.
                job.git_ref.clone_from(&snap.base);
                job.snapshot = Some(snap.clone());
                job.validate()?;
            }
        }
        batches.push((file, jobs));
    }
    if !queue.capabilities().priority && batches.iter().any(|(_, jobs)| jobs.iter().any(|j| j.priority != 0)) {
        say(
            "warning: this backend runs jobs first in, first out and ignores `priority`; use queues for urgency (worker --queues urgent,default)",
        );
    }
    for (file, jobs) in &mut batches {
        for job in jobs {
            held_back_here(queue, job).await.map_err(|e| match e {
                Error::InvalidJob(m) => Error::InvalidJob(format!("{}: {m}", file.display())),
                other => other,
            })?;
        }
    }
    let mut ids = Vec::new();
    let mut new = Vec::new();
    let mut existing = Vec::new();
    let mut refused = None;
    'files: for (_, jobs) in batches {
        for job in jobs {
            let key = job.idempotency_key.clone().unwrap_or_default();
            match queue.add(job).await {
                Ok(Pushed::Existing(id)) => {
                    existing.push((id.clone(), key));
                    ids.push(id);
                }
                Ok(pushed) => {
                    new.push(pushed.id().to_string());
                    ids.push(pushed.into_id());
                }
                // What was pushed before the refusal stays, and is said.
                Err(e) => {
                    refused = Some(e);
                    break 'files;
                }
            }
        }
    }
    if json {
        // Every id this push stands for, new or already there.
        print_json(&serde_json::Value::Array(ids.iter().map(|i| i.as_str().into()).collect()));
    } else {
        if !new.is_empty() || (existing.is_empty() && refused.is_none()) {
            out(&format!("pushed {} job(s): {}\n", new.len(), new.join(" ")));
        }
        for (id, key) in &existing {
            out(&format!("job {id} was already pushed with idempotency_key `{key}`; not pushed again\n"));
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn split_command(flag: &str, text: &str) -> Result<Vec<String>> {
    let argv = shell_words::split(text).map_err(|e| Error::Config(format!("--{flag} `{text}`: {e}")))?;
    if argv.is_empty() {
        return Err(Error::Config(format!("--{flag} is empty")));
    }
    Ok(argv)
}

/// A repository given as a local path is used by its absolute path.
fn absolute_repo(repo: String) -> String {
    if repo.contains("://") || (repo.contains('@') && repo.contains(':')) {
        return repo;
    }
    std::fs::canonicalize(&repo).map(|p| p.to_string_lossy().into_owned()).unwrap_or(repo)
}

async fn worker(queue: Arc<dyn Queue>, s: &Settings, args: WorkerArgs) -> Result<ExitCode> {
    let cfg = worker_config(s, args)?;
    let (shutdown, stop_now) = (CancellationToken::new(), CancellationToken::new());
    let (first, second) = (shutdown.clone(), stop_now.clone());
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: no new jobs; draining (a second signal stops the running jobs now)");
        first.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("second signal: stopping the running jobs now and giving them back");
        second.cancel();
    });
    tracing::info!(queue = %redact_url(&s.url), data_dir = %s.data_dir.display(), "gpupool worker");
    let mut credentials = Credentials::from_env();
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        credentials = credentials.with_prompt(Arc::new(TerminalPrompt));
    }
    let workspace = Arc::new(GitWorkspace::new(&s.data_dir, credentials));
    let burst = cfg.burst;
    let summary = Worker::builder(queue, cfg).workspace(workspace).build().run_until(shutdown, stop_now).await?;
    tracing::info!(reserved = summary.reserved, "worker stopped");
    if let (Some(why), true) = (&summary.unhealthy, burst) {
        // Its jobs went back uncharged for a healthy worker.
        say(&format!("worker unhealthy: {why}; its jobs were given back without charging an attempt"));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The worker's settings: flags, then environment, then `gpupool.toml`,
/// then defaults.
fn worker_config(s: &Settings, args: WorkerArgs) -> Result<WorkerConfig> {
    let f = &s.file;
    let w = &f.worker;
    let mut cfg = WorkerConfig::new(&s.data_dir);
    cfg.queue_id = redact_url(&s.url);
    cfg.repo = args.repo.or_else(|| f.repo.clone()).map(absolute_repo);
    cfg.allowed_repos = f.allowed_repos.iter().cloned().map(absolute_repo).collect();
    if let Some(q) = args.queues.or_else(|| w.queues.clone()) {
        for name in &q {
            message::validate_queue_name(name).map_err(|e| Error::Config(e.to_string()))?;
        }
        cfg.queues = q;
    }
    let selection: GpuSelection = args.gpus.or_else(|| w.gpus.clone()).unwrap_or_else(|| "auto".into()).parse()?;
    let inventory = gpupool::inventory(&selection)?;
    cfg.gpus = inventory.status().iter().map(|g| g.index).collect();
    cfg.inventory = Some(inventory);
    if let Some(n) = args.slots.or(w.slots) {
        cfg.slots = n.max(1);
    }
    if let Some(n) = args.slots_per_gpu.or(w.slots_per_gpu) {
        cfg.slots_per_gpu = n.max(1);
    }
    if let Some(pct) = args.gpu_free_memory.or(w.gpu_free_memory) {
        if !(0.0..=100.0).contains(&pct) {
            return Err(Error::Config(format!("--gpu-free-memory {pct} is not a percentage from 0 to 100")));
        }
        cfg.gpu_busy_fraction = 1.0 - pct / 100.0;
    }
    if let Some(d) = args.lease.or_else(|| w.lease.clone()) {
        cfg.lease = parse_duration(&d)?;
    }
    if let Some(d) = args.heartbeat.or_else(|| w.heartbeat.clone()) {
        cfg.heartbeat = parse_duration(&d)?;
    }
    if let Some(d) = args.drain_timeout.or_else(|| w.drain_timeout.clone()) {
        cfg.drain_timeout = parse_duration(&d)?;
    }
    if let Some(d) = args.outputs_max_age.or_else(|| w.outputs_max_age.clone()) {
        cfg.outputs_max_age = Some(parse_duration(&d)?);
    }
    if let Some(url) = args.artifacts.or_else(|| f.artifacts.clone()) {
        cfg.artifacts = Some(gpupool::worker::ArtifactStore::open(&url).map_err(Error::Config)?);
    }
    cfg.keep_outputs = args.keep_outputs || w.keep_outputs.unwrap_or(false);
    if cfg.heartbeat >= cfg.lease {
        return Err(Error::Config(format!(
            "the heartbeat ({}) must be shorter than the lease ({})",
            humantime::format_duration(cfg.heartbeat),
            humantime::format_duration(cfg.lease)
        )));
    }
    cfg.setup = match args.setup {
        Some(text) => Some(split_command("setup", &text)?),
        None => f.setup.clone(),
    };
    if let Some(inputs) = &f.setup_inputs {
        cfg.setup_inputs.clone_from(inputs);
    }
    cfg.command = match args.command {
        Some(text) => split_command("command", &text)?,
        None => f.command.clone().unwrap_or(cfg.command),
    };
    cfg.burst = args.burst;
    Ok(cfg)
}

/// Asks for git credentials on the terminal: the worker's last resort when
/// no token, credential helper or ssh-agent has them.
struct TerminalPrompt;

impl CredentialPrompt for TerminalPrompt {
    fn ask(&self, host: &str) -> Option<(String, String)> {
        use std::io::Write;
        let mut err = std::io::stderr();
        let _ = write!(err, "Username for {host}: ");
        let _ = err.flush();
        let mut user = String::new();
        std::io::stdin().read_line(&mut user).ok()?;
        let user = user.trim().to_owned();
        let token = rpassword::prompt_password(format!("Access token for {user}@{host}: ")).ok()?;
        Some((user, token))
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("sweep-*", "sweep-12"));
        assert!(glob("run-?", "run-a") && !glob("run-?", "run-ab"));
        assert!(glob("*lr*", "base-lr-0.1") && glob("*", ""));
        assert!(!glob("sweep-*", "other"));
    }
}
