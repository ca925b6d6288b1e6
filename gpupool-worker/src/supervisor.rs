//! The supervisor: why a job's whole process tree dies with its worker,
//! however the worker dies.
//!
//! A job's process starts children of its own (DataLoader workers,
//! torchrun ranks, `subprocess` calls). A parent-death signal on the job's
//! main process alone leaves those running when the worker is killed with
//! SIGKILL, holding GPU memory while the job runs again elsewhere. So each
//! run is started through a small supervisor: the worker's own binary,
//! executed again as `BINARY __gpupool_supervise PROGRAM ARGS…`. It leads
//! the run's process group, asks the kernel for a signal when the worker
//! dies (`PR_SET_PDEATHSIG`), starts the job's program in that group and
//! waits for it. When the worker dies it kills the whole group, itself
//! included. It ignores SIGTERM and SIGINT (the worker's stop sends them to
//! the group, and the job decides what to do with them; SIGKILL after the
//! grace period ends everyone), and reports how the program ended through a
//! status file, so that a run killed by a signal still reads as one.
//!
//! The supervisor needs the binary's cooperation: its `main` calls
//! [`run_if_asked`] first (the `gpupool` command and
//! `gpupool_cli::main_with` do). A program that does not is never executed
//! as a supervisor; its runs fall back to `setpriv --pdeathsig` (the job's
//! main process only). Chosen over a cgroup's `cgroup.kill`, which needs a
//! delegated cgroup v2 subtree that a worker started from a shell, a
//! container or systemd without `Delegate=yes` does not have.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpgrp, getppid};

/// The first argument that makes the binary a supervisor.
pub(crate) const ARG: &str = "__gpupool_supervise";
/// The worker's pid, for the supervisor (never passed on to the job).
pub(crate) const PARENT_ENV: &str = "GPUPOOL_SUPERVISOR_PARENT";
/// Where the supervisor writes how the program ended: `exit N` or
/// `signal N`.
pub(crate) const STATUS_ENV: &str = "GPUPOOL_SUPERVISOR_STATUS";

static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Call first thing in `main`: when this process was started as a run's
/// supervisor, supervises and exits; otherwise returns, and runs started by
/// this process's workers go through the supervisor.
pub fn run_if_asked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(ARG)) {
        AVAILABLE.store(true, Ordering::Relaxed);
        return;
    }
    std::process::exit(supervise(args.collect()));
}

/// Whether this binary can be its own runs' supervisor.
pub(crate) fn available() -> bool {
    AVAILABLE.load(Ordering::Relaxed)
}

fn supervise(argv: Vec<OsString>) -> i32 {
    let parent = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok()).map(Pid::from_raw);
    let status_file = std::env::var_os(STATUS_ENV);
    let Some((program, args)) = argv.split_first() else { return 127 };
    // SIGUSR1 when the worker dies; checked once more in case it died
    // before the request was in.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1).is_err() || parent.is_some_and(|p| getppid() != p) {
        return 125;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return 125 };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut died), Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return 125;
        };
        let child =
            tokio::process::Command::new(program).args(args).env_remove(PARENT_ENV).env_remove(STATUS_ENV).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("gpupool: cannot start {}: {e}", program.to_string_lossy());
                return 127;
            }
        };
        let orphaned = || parent.is_some_and(|p| getppid() != p);
        loop {
            tokio::select! {
                status = child.wait() => {
                    let (text, code) = match status {
                        Ok(s) => ended(s),
                        Err(_) => ("exit 125".to_owned(), 125),
                    };
                    if let Some(path) = &status_file {
                        let _ = std::fs::write(path, text);
                    }
                    return code;
                }
                _ = died.recv() => kill_group(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => if orphaned() { kill_group() },
                // The job's to handle; the worker follows up with SIGKILL.
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
    })
}

/// How the program ended, for the status file, and the supervisor's own
/// exit code.
fn ended(status: std::process::ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (format!("exit {code}"), code),
        (None, Some(sig)) => (format!("signal {sig}"), 128 + sig),
        (None, None) => ("exit 125".to_owned(), 125),
    }
}

/// The worker is gone: the run's whole group goes, this process included.
fn kill_group() {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
}

/// How a supervised run's program ended, from its status file.
pub(crate) fn read_status(path: &std::path::Path) -> Option<gpupool_core::runner::Outcome> {
    use gpupool_core::runner::Outcome;
    let text = std::fs::read_to_string(path).ok()?;
    let (what, n) = text.trim().split_once(' ')?;
    let n: i32 = n.parse().ok()?;
    match what {
        "exit" => Some(Outcome::Exited(n)),
        "signal" => Some(Outcome::Signaled(n)),
        _ => None,
    }
}
