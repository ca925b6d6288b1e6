//! `gpupool-chaos`: the chaos suite. It runs a pool of real worker
//! processes (this binary, executed again as the `gpupool` command) against
//! one backend, on one shared data directory, with real git checkouts and
//! real Python runs, while it
//!
//! - kills workers with SIGKILL (and starts new ones in their place),
//! - freezes a worker and its runs' processes with SIGSTOP for longer than
//!   a lease,
//! - restarts the backend (MariaDB, Redis with AOF, RabbitMQ
//!   `stop_app`/`start_app`), when it runs on this host,
//! - cuts every connection through a TCP proxy it runs between the workers
//!   and a server backend.
//!
//! Then it checks that every job succeeded (none lost or stuck), that no
//! job ran to its end twice outside a freeze, that no process of a killed
//! worker was left alive, and that the backend's records agree with what
//! ran. It prints one row of `RELIABILITY.md`'s table and exits 1 when a
//! check fails.
//!
//! ```text
//! cargo run --release -p gpupool-chaos -- --queue URL [--secs S]
//! ```
//!
//! `--queue sqlite` runs on a SQLite file in the work folder. A server URL
//! gets a fresh prefix, removed at the end unless `--keep`.

mod backend;
mod outage;
mod procs;
mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::backend::Backend;

/// Set in every process this binary starts as the `gpupool` command (the
/// workers, their runs' supervisors, the CLI calls): its worker's name.
/// Runs inherit it and record it.
const ROLE_ENV: &str = "CHAOS_WORKER";

/// The job every run executes: it starts a grandchild (as DataLoader
/// workers do), records its start, sleeps `CHAOS_SECS`, and records its
/// end as the very last thing.
const JOB: &str = r#"import json, os, subprocess, sys, time
d = os.environ['CHAOS_DIR']
me = '%s-%d' % (os.environ['GPUPOOL_JOB_ID'], os.getpid())
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)', 'chaos-grandchild'])
rec = {'job': os.environ['GPUPOOL_JOB_ID'], 'worker': os.environ.get('CHAOS_WORKER', '?'), 'pid': os.getpid(), 'child': child.pid}
with open(os.path.join(d, 'starts', me), 'w') as f:
    json.dump(rec, f)
time.sleep(float(os.environ['CHAOS_SECS']))
child.kill()
child.wait()
with open(os.path.join(d, 'ends', me), 'w') as f:
    json.dump(rec, f)
"#;

#[derive(Parser, Debug)]
#[command(
    name = "gpupool-chaos",
    version,
    about = "Run a pool of real gpupool workers against one backend while faults are injected; check that nothing was lost or run twice"
)]
struct Args {
    /// The backend: a queue URL, or `sqlite` for a SQLite file in the work folder.
    #[arg(long)]
    queue: String,
    /// How long faults are injected.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// Worker processes, all on one data directory.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Parallel runs per worker.
    #[arg(long, default_value_t = 2)]
    slots: usize,
    /// Jobs pushed (default: 3 per second of `--secs`).
    #[arg(long)]
    jobs: Option<usize>,
    /// The workers' lease; a freeze lasts the lease plus 3 s.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// The workers' heartbeat.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Time between faults (each wait is drawn between half and one and a half of it).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// The faults to inject, of `kill`, `freeze`, `restart`, `cut`.
    #[arg(long, value_delimiter = ',', default_value = "kill,freeze,restart,cut")]
    faults: Vec<String>,
    /// How long the pool may take to finish the jobs after the faults stop.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// The random seed (default: from the clock); printed, so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the work folder and the server queue.
    #[arg(long)]
    keep: bool,
    /// Instead of the chaos run: outage trials of these lengths in seconds
    /// (`45,50,55,65`), each telling whether a running job's lease, with
    /// the default lease and heartbeat, survived it.
    #[arg(long, value_delimiter = ',')]
    outage: Vec<u64>,
    /// Print the result as one JSON object on stdout as well.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Started as the `gpupool` command (a worker, a run's supervisor, a
    // CLI call): be it.
    if std::env::var_os(ROLE_ENV).is_some() {
        return gpupool_cli::main_with(gpupool::Registry::with_defaults());
    }
    let args = Args::parse();
    if !args.outage.is_empty() {
        let seed = args.seed.unwrap_or_else(seed_from_clock);
        return match outage::trials(&args.queue, &args.outage, seed) {
            Ok(trials) => {
                let kept = trials.iter().filter(|t| t.survived).map(|t| t.outage.as_secs()).max();
                let lost = trials.iter().filter(|t| !t.survived).map(|t| t.outage.as_secs()).min();
                println!("longest outage survived: {kept:?} s; shortest lost: {lost:?} s");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chaos: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(report) => {
            println!("{}", report.table_row());
            if args.json {
                println!("{}", report.json());
            }
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                for f in &report.failures {
                    eprintln!("chaos: FAILED: {f}");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// A small, seedable random source (xorshift64*): the suite needs no more.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x % (n.max(1) as u64)).unwrap_or(0)
    }

    /// `d` scaled by a factor between 0.5 and 1.5.
    fn around(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + self.below(1000) as f64 / 1000.0)
    }
}

/// What a run found.
#[derive(Debug, Default)]
struct Report {
    backend: String,
    secs: u64,
    workers: String,
    seed: u64,
    faults: BTreeMap<&'static str, usize>,
    jobs: usize,
    succeeded: usize,
    executions: usize,
    ended: usize,
    duplicates: usize,
    duplicates_in_freeze: usize,
    /// Jobs that ran to their end twice because a worker was killed after
    /// its run ended and before it could journal or report that end: no
    /// one can know of a run that its worker did not live to see end.
    duplicates_at_kill: usize,
    leftover: usize,
    lost: usize,
    error_kinds: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Report {
    fn faults_text(&self) -> String {
        let total: usize = self.faults.values().sum();
        let each: Vec<String> = self.faults.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("{total} ({})", each.join(", "))
    }

    /// One row of RELIABILITY.md's table.
    fn table_row(&self) -> String {
        format!(
            "| {} | {} s, {} | {} | {} | {} ({} ended) | {} (+{} in a freeze{}) | {} | {} |",
            self.backend,
            self.secs,
            self.workers,
            self.faults_text(),
            self.jobs,
            self.executions,
            self.ended,
            self.duplicates,
            self.duplicates_in_freeze,
            if self.duplicates_at_kill > 0 {
                format!(", +{} at a kill", self.duplicates_at_kill)
            } else {
                String::new()
            },
            self.leftover,
            self.lost
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend, "secs": self.secs, "workers": self.workers, "seed": self.seed,
            "faults": self.faults, "jobs": self.jobs, "succeeded": self.succeeded,
            "executions": self.executions, "ended": self.ended, "duplicates": self.duplicates,
            "duplicates_in_freeze": self.duplicates_in_freeze, "leftover_processes": self.leftover,
            "lost": self.lost, "error_kinds": self.error_kinds, "failures": self.failures,
        })
    }
}

/// One worker process of the pool.
struct Worker {
    name: String,
    child: Child,
}

/// The pool: worker processes on one data directory, started as this
/// binary with [`ROLE_ENV`] set.
struct Pool<'a> {
    dir: &'a Path,
    url: String,
    repo: String,
    args: &'a Args,
    live: Vec<Worker>,
    started: usize,
    /// Workers that were ever frozen: a run of theirs may end after its job
    /// was given to another worker.
    frozen: BTreeSet<String>,
    /// Until when each frozen worker stays frozen.
    frozen_until: BTreeMap<String, Instant>,
    /// When each killed worker was killed.
    killed: BTreeMap<String, std::time::SystemTime>,
}

impl Pool<'_> {
    fn spawn(&mut self) -> Result<(), String> {
        self.started += 1;
        let name = format!("w{}", self.started);
        let log = std::fs::File::create(self.dir.join("logs").join(format!("{name}.log")))
            .map_err(|e| format!("cannot create the worker's log: {e}"))?;
        let lease = humantime::format_duration(self.args.lease).to_string();
        let heartbeat = humantime::format_duration(self.args.heartbeat).to_string();
        let slots = self.args.slots.to_string();
        let child = gpupool(self.dir, &self.url, &name)
            .args(["worker", "--repo", &self.repo, "--gpus", "none", "--slots", &slots])
            .args(["--lease", &lease, "--heartbeat", &heartbeat, "--drain-timeout", "20s"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        self.live.push(Worker { name, child });
        Ok(())
    }
}

/// This binary as the `gpupool` command, on the queue `url`, with the
/// shared data directory.
fn gpupool(dir: &Path, url: &str, name: &str) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("gpupool-chaos"));
    let mut cmd = Command::new(exe);
    cmd.current_dir(dir)
        .env(ROLE_ENV, name)
        .env("GPUPOOL_QUEUE", url)
        .env("GPUPOOL_DATA_DIR", dir.join("data"))
        .env_remove("GPUPOOL_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs a CLI command of the pool and returns its stdout.
fn cli(dir: &Path, url: &str, args: &[&str]) -> Result<String, String> {
    let out = gpupool(dir, url, "cli").args(args).output().map_err(|e| format!("cannot run gpupool: {e}"))?;
    if !out.status.success() {
        return Err(format!("gpupool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cli_json(dir: &Path, url: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = cli(dir, url, args)?;
    serde_json::from_str(&out).map_err(|e| format!("gpupool {}: not JSON: {e}", args.join(" ")))
}

/// Jobs neither succeeded, failed nor cancelled, by `status --json`.
fn unfinished(dir: &Path, url: &str) -> Result<u64, String> {
    let status = cli_json(dir, url, &["status", "--json"])?;
    let jobs = &status["jobs"];
    Ok(["queued", "running", "waiting", "delayed"].iter().filter_map(|s| jobs[*s].as_u64()).sum())
}

fn run(args: &Args) -> Result<Report, String> {
    let seed = args.seed.unwrap_or_else(seed_from_clock) | 1;
    let mut rng = Rng(seed);
    let work = tempfile::Builder::new().prefix("gpupool-chaos-").tempdir().map_err(|e| e.to_string())?;
    let dir = work.path().to_path_buf();
    for sub in ["starts", "ends", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let backend = Backend::from_url(&args.queue, &dir, seed)?;
    eprintln!("chaos: {} in {} (seed {seed})", backend.name, dir.display());
    let faults: Vec<&'static str> = ["kill", "freeze", "restart", "cut"]
        .into_iter()
        .filter(|f| args.faults.iter().any(|a| a == f))
        .filter(|f| match *f {
            "restart" => backend.can_restart(),
            "cut" => backend.proxied(),
            _ => true,
        })
        .collect();
    if faults.is_empty() {
        return Err(format!("no fault of {:?} applies to {}", args.faults, backend.name));
    }
    backend.prepare()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let proxy = match backend.upstream() {
        Some(upstream) => Some(runtime.block_on(proxy::Proxy::start(upstream))?),
        None => None,
    };
    let pool_url = match &proxy {
        Some(p) => backend.url_through(p.port()),
        None => backend.url.clone(),
    };

    // The repository, the queue and its jobs.
    let repo = gpupool_worker::testing::job_repo(&dir, JOB);
    let repo = repo.to_str().ok_or("the work folder's path is not UTF-8")?.to_owned();
    cli(&dir, &backend.url, &["init"])?;
    let n_jobs = args.jobs.unwrap_or(3 * args.secs as usize).max(1);
    let jobs: Vec<serde_json::Value> = (0..n_jobs)
        .map(|i| {
            let secs = 1.0 + (i * 7 % 31) as f64 / 10.0; // 1 s to 4 s
            serde_json::json!({
                "git_ref": "main", "entrypoint": "job.py", "gpus": 0, "args": {"i": i},
                "max_attempts": 100,
                "env": {"CHAOS_DIR": dir.display().to_string(), "CHAOS_SECS": format!("{secs:.1}")},
            })
        })
        .collect();
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    cli(&dir, &backend.url, &["push", "jobs.json"])?;

    let mut report = Report {
        backend: backend.name.to_owned(),
        secs: args.secs,
        workers: format!("{}×{}", args.workers, args.slots),
        seed,
        jobs: n_jobs,
        ..Report::default()
    };
    let mut pool = Pool {
        dir: &dir,
        url: pool_url,
        repo,
        args,
        live: Vec::new(),
        started: 0,
        frozen: BTreeSet::new(),
        killed: BTreeMap::new(),
        frozen_until: BTreeMap::new(),
    };
    for _ in 0..args.workers {
        pool.spawn()?;
    }
    let mut kill_checks: Vec<KillCheck> = Vec::new();
    let start = Instant::now();
    let mut last_check = Instant::now();
    while start.elapsed() < Duration::from_secs(args.secs) {
        std::thread::sleep(rng.around(args.every));
        let fault = faults[rng.below(faults.len())];
        // A worker is killed or frozen only while it runs: a stopped one
        // would take the kill's signals only when continued.
        let now = Instant::now();
        let awake: Vec<usize> = (0..pool.live.len())
            .filter(|i| pool.frozen_until.get(&pool.live[*i].name).is_none_or(|t| *t < now))
            .collect();
        if matches!(fault, "kill" | "freeze") && awake.is_empty() {
            continue;
        }
        let target = awake.get(rng.below(awake.len())).copied().unwrap_or(0);
        match fault {
            "kill" => {
                let w = pool.live.swap_remove(target);
                let name = w.name.clone();
                let (at, check) = kill(w)?;
                pool.killed.insert(name, at);
                kill_checks.push(check);
                pool.spawn()?;
            }
            "freeze" => {
                let w = &pool.live[target];
                let length = args.lease + Duration::from_secs(3);
                pool.frozen.insert(w.name.clone());
                pool.frozen_until.insert(w.name.clone(), now + length + Duration::from_secs(1));
                freeze(procs::pid_of(&w.child).as_raw(), length);
            }
            "restart" => {
                let took = backend.restart()?;
                eprintln!("chaos: {} restarted in {took:.1?}", backend.name);
            }
            "cut" => {
                if let Some(p) = &proxy {
                    let blackout = Duration::from_millis(rng.below(3000) as u64);
                    let cut = p.cut(blackout);
                    eprintln!("chaos: cut {cut} connections, refused new ones for {blackout:.1?}");
                }
            }
            _ => unreachable!("faults are filtered above"),
        }
        *report.faults.entry(fault).or_default() += 1;
        // A worker that exited on its own is a failure of the suite's
        // premises, not a fault: note it and replace it.
        for i in (0..pool.live.len()).rev() {
            if let Ok(Some(status)) = pool.live[i].child.try_wait() {
                let w = pool.live.swap_remove(i);
                report.failures.push(format!("worker {} exited by itself ({status}); see its log", w.name));
                pool.spawn()?;
            }
        }
        if last_check.elapsed() > Duration::from_secs(10) {
            last_check = Instant::now();
            if unfinished(&dir, &backend.url).unwrap_or(1) == 0 {
                break;
            }
        }
    }
    eprintln!("chaos: faults {}; waiting for the pool to finish", report.faults_text());
    // Frozen processes are continued by their threads; let the pool finish.
    let deadline = Instant::now() + args.drain + args.lease + Duration::from_secs(3);
    loop {
        match unfinished(&dir, &backend.url) {
            Ok(0) => break,
            Ok(n) if Instant::now() > deadline => {
                report.failures.push(format!("{n} jobs still unfinished {:?} after the faults stopped", args.drain));
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    for w in &mut pool.live {
        let _ = nix::sys::signal::kill(procs::pid_of(&w.child), nix::sys::signal::Signal::SIGTERM);
    }
    for w in &mut pool.live {
        if procs::wait_for(&mut w.child, Duration::from_secs(30)).is_none() {
            report.failures.push(format!("worker {} did not stop within 30 s of SIGTERM", w.name));
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
    drop(proxy);
    let left_by_kills: BTreeSet<procs::Proc> =
        kill_checks.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    check(&dir, &backend.url, &pool.frozen, &pool.killed, &left_by_kills, &mut report)?;
    if args.keep || !report.failures.is_empty() {
        eprintln!("chaos: kept {} and the queue {}", dir.display(), gpupool::redact::redact_url(&backend.url));
        let _ = work.keep();
    } else {
        runtime.block_on(backend.remove())?;
    }
    backend.finish();
    Ok(report)
}

/// Answers, 5 s after a kill, the killed worker's processes still alive.
type KillCheck = std::thread::JoinHandle<Vec<procs::Proc>>;

/// Kills a worker with SIGKILL; returns when (taken after the signal: the
/// scan of its process tree before it can take a while on a busy host).
/// Every process under it must be dead within 5 s: the returned thread
/// answers those still alive then.
fn kill(mut w: Worker) -> Result<(std::time::SystemTime, KillCheck), String> {
    let tree = procs::descendants(procs::pid_of(&w.child).as_raw());
    w.child.kill().map_err(|e| format!("cannot kill {}: {e}", w.name))?;
    let at = std::time::SystemTime::now();
    let _ = w.child.wait();
    eprintln!("chaos: killed {} ({} processes under it)", w.name, tree.len());
    let check = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        tree.into_iter().filter(|p| p.alive()).collect()
    });
    Ok((at, check))
}

/// Stops a worker and every process under it with SIGSTOP, and continues
/// them after `length`, on a thread of its own.
fn freeze(pid: i32, length: Duration) {
    use nix::sys::signal::{Signal, kill};
    let mut tree = vec![pid];
    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP);
    // Twice: a process may have started one just before it was stopped.
    for _ in 0..2 {
        for p in procs::descendants(pid) {
            if !tree.contains(&p.pid) {
                let _ = kill(nix::unistd::Pid::from_raw(p.pid), Signal::SIGSTOP);
                tree.push(p.pid);
            }
        }
    }
    eprintln!("chaos: froze worker pid {pid} and {} processes under it for {length:.1?}", tree.len() - 1);
    std::thread::spawn(move || {
        std::thread::sleep(length);
        for p in &tree {
            let _ = kill(nix::unistd::Pid::from_raw(*p), Signal::SIGCONT);
        }
    });
}

/// A run's record (`starts/JOB-PID`, `ends/JOB-PID`).
struct RunRecord {
    job: String,
    worker: String,
    pids: [i32; 2],
    /// When the record was written (for an end: when the run ended).
    at: Option<std::time::SystemTime>,
}

/// A worker killed this soon after its run ended may not have lived to
/// see the end (the process exit, then the result journaled).
const KILL_WINDOW: Duration = Duration::from_secs(2);

/// A run may also end just after its worker was killed: its process tree
/// dies within about a second (the supervisor's parent-death signal, then
/// the group's kill), and a run in its last moment finishes first. Seen in
/// CI: a run's end file written 0.3 s after its worker's last log line,
/// the worker killed in between.
const TEARDOWN: Duration = Duration::from_secs(1);

fn records(dir: &Path) -> Vec<RunRecord> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        let pid = |k: &str| v[k].as_i64().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        out.push(RunRecord {
            job: v["job"].as_str().unwrap_or_default().to_owned(),
            worker: v["worker"].as_str().unwrap_or_default().to_owned(),
            pids: [pid("pid"), pid("child")],
            at: entry.metadata().and_then(|m| m.modified()).ok(),
        });
    }
    out
}

/// When each run of `job` ended against when its worker was killed, to
/// tell a race at a kill from a real duplicate.
fn kill_timing(ends: &[RunRecord], killed: &BTreeMap<String, std::time::SystemTime>, job: &str) -> String {
    let each = ends.iter().filter(|e| e.job == job).map(|e| match (e.at, killed.get(&e.worker)) {
        (Some(end), Some(kill)) => match kill.duration_since(end) {
            Ok(d) => format!("{}: killed {d:?} after its end", e.worker),
            Err(d) => format!("{}: killed {:?} before its end", e.worker, d.duration()),
        },
        _ => format!("{}: not killed", e.worker),
    });
    each.collect::<Vec<_>>().join("; ")
}

/// The checks, once the pool has stopped.
fn check(
    dir: &Path,
    url: &str,
    frozen: &BTreeSet<String>,
    killed: &BTreeMap<String, std::time::SystemTime>,
    left_by_kills: &BTreeSet<procs::Proc>,
    report: &mut Report,
) -> Result<(), String> {
    let listed = cli_json(dir, url, &["jobs", "--json", "--limit", "1000000"])?;
    let listed = listed.as_array().cloned().unwrap_or_default();
    let starts = records(&dir.join("starts"));
    let ends = records(&dir.join("ends"));
    report.executions = starts.len();
    report.ended = ends.len();
    report.succeeded = listed.iter().filter(|j| j["state"] == "succeeded").count();
    report.lost = report.jobs - report.succeeded;
    if listed.len() != report.jobs {
        report.failures.push(format!("{} jobs pushed, {} listed", report.jobs, listed.len()));
    }
    if report.lost > 0 {
        let states: BTreeMap<String, usize> =
            listed.iter().filter(|j| j["state"] != "succeeded").fold(BTreeMap::new(), |mut m, j| {
                *m.entry(j["state"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
                m
            });
        report.failures.push(format!("{} jobs did not succeed: {states:?}", report.lost));
    }
    // Runs that ended, per job.
    let mut ended: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &ends {
        ended.entry(e.job.as_str()).or_default().push(e.worker.as_str());
    }
    // A run whose worker was killed within KILL_WINDOW after it ended, or
    // within TEARDOWN before.
    let died_at_end = |job: &str| {
        ends.iter().filter(|e| e.job == job).any(|e| {
            let (Some(end), Some(kill)) = (e.at, killed.get(&e.worker)) else { return false };
            match kill.duration_since(end) {
                Ok(after) => after <= KILL_WINDOW,
                Err(before) => before.duration() <= TEARDOWN,
            }
        })
    };
    for (job, workers) in &ended {
        if workers.len() > 1 {
            if workers.iter().any(|w| frozen.contains(*w)) {
                report.duplicates_in_freeze += 1;
            } else if died_at_end(job) {
                report.duplicates_at_kill += 1;
            } else {
                report.duplicates += 1;
                report.failures.push(format!(
                    "job {job} ran to its end {} times, on {workers:?} ({})",
                    workers.len(),
                    kill_timing(&ends, killed, job)
                ));
            }
        }
    }
    // The records agree with what ran: a job recorded `succeeded` had a run
    // that ended; one that never ended is not `succeeded`.
    for j in &listed {
        let id = j["id"].as_str().unwrap_or_default();
        if j["state"] == "succeeded" && !ended.contains_key(id) {
            report.failures.push(format!("job {id} is recorded succeeded but no run of it ended"));
        }
        if j["state"] == "running" || j["worker"].is_string() && j["state"] == "queued" {
            report.failures.push(format!("job {id} is left {} with worker {}", j["state"], j["worker"]));
        }
    }
    let status = cli_json(dir, url, &["status", "--json"])?;
    let counted = status["jobs"]["succeeded"].as_u64().unwrap_or(0);
    if counted != report.succeeded as u64 {
        report.failures.push(format!("status counts {counted} succeeded, the list {}", report.succeeded));
    }
    // Error records: how the faults showed.
    let errors = cli_json(dir, url, &["errors", "--json", "--limit", "1000000"]).unwrap_or_default();
    for e in errors.as_array().into_iter().flatten() {
        *report.error_kinds.entry(e["kind"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    // Processes: a killed worker's were checked 5 s after the kill; every
    // run's process and grandchild is gone now.
    let mut left: BTreeSet<i32> = left_by_kills.iter().map(|p| p.pid).collect();
    for r in &starts {
        for pid in r.pids {
            if procs::is_run(pid) {
                left.insert(pid);
            }
        }
    }
    report.leftover = left.len();
    if !left.is_empty() {
        report.failures.push(format!("{} processes of runs or killed workers still alive: {left:?}", left.len()));
        for pid in &left {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    Ok(())
}
