//! `--outage S,…`: the longest backend outage a running job's lease
//! survives, with the default lease (60 s) and heartbeat (10 s).
//!
//! Each trial: one long job runs on worker A, which reaches the backend
//! through the proxy. Worker B reaches it directly and stands ready to take
//! over an expired lease. Just before A's next heartbeat is due (9 s after
//! its run started, the worst phase: its lease was last set then), the
//! proxy refuses A every connection for S seconds. The lease survived when,
//! 20 s after the outage, the job is still on its first attempt and ran
//! once.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::{cli, cli_json, gpupool, procs, proxy, records};

/// One trial's answer.
#[derive(Debug)]
pub(crate) struct Trial {
    pub(crate) outage: Duration,
    pub(crate) survived: bool,
    pub(crate) detail: String,
}

pub(crate) fn trials(queue: &str, outages: &[u64], seed: u64) -> Result<Vec<Trial>, String> {
    let mut out = Vec::new();
    for (i, secs) in outages.iter().enumerate() {
        let work = tempfile::Builder::new().prefix("gpupool-outage-").tempdir().map_err(|e| e.to_string())?;
        let backend = Backend::from_url(queue, work.path(), seed.wrapping_add(i as u64))?;
        let Some(upstream) = backend.upstream() else {
            return Err(format!("{} has no server to be cut off from", backend.name));
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let proxy = runtime.block_on(proxy::Proxy::start(upstream))?;
        let trial = trial(work.path(), &backend, &proxy, Duration::from_secs(*secs));
        drop(proxy);
        let _ = runtime.block_on(backend.remove());
        let trial = trial?;
        eprintln!(
            "outage: {} {:?}: {} ({})",
            backend.name,
            trial.outage,
            if trial.survived { "lease kept" } else { "lease lost" },
            trial.detail
        );
        out.push(trial);
    }
    Ok(out)
}

fn trial(dir: &Path, backend: &Backend, proxy: &proxy::Proxy, outage: Duration) -> Result<Trial, String> {
    for sub in ["starts", "ends", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let repo = gpupool_worker::testing::job_repo(dir, crate::JOB);
    let repo = repo.to_str().ok_or("the work folder's path is not UTF-8")?.to_owned();
    cli(dir, &backend.url, &["init"])?;
    let job = serde_json::json!({
        "git_ref": "main", "entrypoint": "job.py", "gpus": 0, "max_attempts": 100,
        "env": {"CHAOS_DIR": dir.display().to_string(), "CHAOS_SECS": (outage.as_secs() + 120).to_string()},
    });
    std::fs::write(dir.join("job.json"), job.to_string()).map_err(|e| e.to_string())?;
    cli(dir, &backend.url, &["push", "job.json"])?;
    let start = |name: &str, url: &str| {
        let log = std::fs::File::create(dir.join("logs").join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        gpupool(dir, url, name)
            .args(["worker", "--repo", &repo, "--gpus", "none"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))
    };
    let mut a = start("a", &backend.url_through(proxy.port()))?;
    let started = wait_for_start(dir, Duration::from_secs(60));
    let mut b = start("b", &backend.url)?;
    let result = started.and_then(|at| {
        std::thread::sleep((at + Duration::from_secs(9)).saturating_duration_since(Instant::now()));
        proxy.cut(outage);
        std::thread::sleep(outage + Duration::from_secs(20));
        let job = &cli_json(dir, &backend.url, &["jobs", "--json"])?[0];
        let runs = records(&dir.join("starts")).len();
        let survived = job["attempt"] == 1 && job["state"] == "running" && runs == 1;
        Ok(Trial {
            outage,
            survived,
            detail: format!("state {}, attempt {}, {runs} runs", job["state"], job["attempt"]),
        })
    });
    for w in [&mut a, &mut b] {
        // Two signals: stop now, give the job back uncharged.
        for _ in 0..2 {
            let _ = nix::sys::signal::kill(procs::pid_of(w), nix::sys::signal::Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(300));
        }
        if procs::wait_for(w, Duration::from_secs(30)).is_none() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
    result
}

/// When the job's run started (its start record appeared).
fn wait_for_start(dir: &Path, limit: Duration) -> Result<Instant, String> {
    let deadline = Instant::now() + limit;
    while records(&dir.join("starts")).is_empty() {
        if Instant::now() > deadline {
            return Err(format!("the job did not start within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Instant::now())
}
