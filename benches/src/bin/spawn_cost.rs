//! How long a job's process takes to start, from the call that spawns it to
//! the child's first instruction, three ways: a plain `std` spawn of
//! `probe`, the same through `setpriv --pdeathsig KILL`, and gpupool's
//! [`ProcessRunner`] (which uses `setpriv` where the host has it, so that a
//! job cannot outlive a killed worker).
//!
//! `cargo build --release -p gpupool-benches --bins && target/release/spawn_cost [--samples N]`
//!
//! It prints `SPAWN way=<way> p50_ms=<v> p90_ms=<v>` per way. `probe` must
//! lie beside this binary; files go to a RAM disk (`/dev/shm`) where there
//! is one.

// A measuring tool: a panic is how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpupool_core::runner::{RunSpec, Runner, Stopper};
use gpupool_worker::ProcessRunner;

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Spawns the probe one way and waits for it to exit.
async fn spawn(way: &str, probe: &Path, out: &Path, dir: &Path, i: usize) {
    let probe_args = ["x".as_ref(), "--out".as_ref(), out.as_os_str()];
    match way {
        "std" => {
            Command::new(probe).args(probe_args).stdout(Stdio::null()).status().unwrap();
        }
        "setpriv" => {
            Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--"])
                .arg(probe)
                .args(probe_args)
                .stdout(Stdio::null())
                .status()
                .unwrap();
        }
        _ => {
            let spec = RunSpec {
                argv: vec![probe.display().to_string(), "x".into(), "--out".into(), out.display().to_string()],
                cwd: dir.into(),
                env: Vec::new(),
                env_remove: Vec::new(),
                log_path: dir.join(format!("logs/{i}.log")),
                timeout: None,
                grace: Duration::from_secs(1),
                tail_bytes: 1024,
                secrets: Vec::new(),
                output: None,
            };
            ProcessRunner::new().run(&spec, &Stopper::new(), &Default::default()).await.unwrap();
        }
    }
}

#[tokio::main]
async fn main() {
    let mut samples = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--samples" => samples = args.next().and_then(|v| v.parse().ok()).expect("--samples N"),
            other => panic!("unknown argument {other}; use [--samples N]"),
        }
    }
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let probe = std::env::current_exe().unwrap().with_file_name("probe");
    assert!(probe.exists(), "build probe first: cargo build --release -p gpupool-benches --bins");
    let out = dir.path().join("started");
    for way in ["std", "setpriv", "runner"] {
        let mut ms = Vec::with_capacity(samples);
        for i in 0..samples {
            let _ = std::fs::remove_file(&out);
            let before = now_ns();
            spawn(way, &probe, &out, dir.path(), i).await;
            let started: u128 = std::fs::read_to_string(&out).unwrap().trim().parse().unwrap();
            ms.push(started.saturating_sub(before) as f64 / 1e6);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q) as usize];
        println!("SPAWN way={way} p50_ms={:.2} p90_ms={:.2}", at(0.5), at(0.9));
    }
}
