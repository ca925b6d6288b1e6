//! [`ProcessRunner`]: the [`Runner`] that runs one prepared job as a
//! process tree.
//!
//! - argv, never a shell;
//! - its own process group, so a cancel or timeout reaches every child;
//! - stdout and stderr appended to a log file, the last bytes kept as the
//!   output tail;
//! - a worker that dies, however it dies, takes the job's whole process
//!   tree with it, so the job cannot keep a GPU busy that the queue has
//!   already given to another run: the run starts under a supervisor that
//!   kills its group when the worker goes ([`crate::supervisor`]); in a
//!   binary that does not offer one, the job's main process gets the
//!   parent-death signal through `setpriv --pdeathsig KILL` (util-linux).
//!
//! Stopping (cancel, timeout, lease lost, shutdown) sends SIGTERM to the
//! whole group, waits the grace period, then sends SIGKILL. When the main
//! process exits, whatever it left behind in its group is killed too.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use gpupool_core::async_trait;
use gpupool_core::runner::{Outcome, RunResult, RunSpec, Runner, Stopper};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// Runs job processes: argv, own process group, log file and tail, SIGTERM
/// then SIGKILL to the whole group (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ProcessRunner {
    _private: (),
}

/// `setpriv`, if this host has it and it knows `--pdeathsig`.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let path = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().map(PathBuf::from).find(|p| p.exists())?;
            let ok = std::process::Command::new(&path)
                .args(["--pdeathsig", "KILL", "--", "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                tracing::warn!("setpriv cannot set the parent-death signal; a job may outlive a killed worker");
            }
            ok.then_some(path)
        })
        .as_deref()
}

impl ProcessRunner {
    /// A runner.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Runs `spec` until it exits, times out or `stop` fires, cancelling
/// `launched` as soon as the process is spawned (the worker waits for it
/// before asking for its next job, so that the two do not compete for the
/// CPU). An error means the process could not be started (no such program,
/// no such directory); the message says which.
#[async_trait]
impl Runner for ProcessRunner {
    async fn run(&self, spec: &RunSpec, stop: &Stopper, launched: &CancellationToken) -> Result<RunResult, String> {
        let (mut cmd, program, status) = command(spec)?;
        let log = open_log(&spec.log_path).await?;
        let mut child = cmd.spawn().map_err(|e| format!("cannot start `{}`: {e}", program.display()))?;
        launched.cancel();
        let pid = child.id();
        let pgid = pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
        let output = Output::capture(&mut child, log, spec.tail_bytes, spec.output.clone());
        let mut outcome = wait(&mut child, pgid, spec, stop).await?;
        // Under a supervisor, how the program itself ended (a signal reads
        // as one, not as the supervisor's exit code).
        if let Some(status) = status {
            if let (Outcome::Exited(_), Some(ended)) = (&outcome, crate::supervisor::read_status(&status)) {
                outcome = ended;
            }
            let _ = tokio::fs::remove_file(&status).await;
        }
        // Whatever the main process left running in its group goes too, so
        // that nothing holds the GPU or the output pipes.
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let tail = output.finish(&spec.secrets).await;
        Ok(RunResult { outcome, tail, pid })
    }
}

/// The process to start, in its own group, under the supervisor where this
/// binary offers one, else through `setpriv` where the host has it; the
/// program's path; and, supervised, the file the supervisor reports the
/// program's end in.
fn command(spec: &RunSpec) -> Result<(Command, PathBuf, Option<PathBuf>), String> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err("the command is empty".into());
    };
    let program = find_program(program, &spec.cwd)?;
    let supervisor = crate::supervisor::available().then(std::env::current_exe).and_then(Result::ok);
    let mut status = None;
    let mut cmd = match (supervisor, setpriv()) {
        (Some(exe), _) => {
            let mut c = Command::new(exe);
            c.arg(crate::supervisor::ARG).arg(&program);
            let dir = spec.log_path.parent().map_or_else(|| spec.cwd.clone(), Path::to_path_buf);
            status = Some(dir.join(format!(".run-{}.status", &uuid::Uuid::new_v4().simple().to_string()[..12])));
            c
        }
        (None, Some(setpriv)) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
            c
        }
        (None, None) => Command::new(&program),
    };
    cmd.args(args)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for key in &spec.env_remove {
        cmd.env_remove(key);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(status) = &status {
        cmd.env(crate::supervisor::PARENT_ENV, std::process::id().to_string())
            .env(crate::supervisor::STATUS_ENV, status);
    }
    Ok((cmd, program, status))
}

/// The job's log, opened for appending (its folder made if needed).
async fn open_log(path: &Path) -> Result<tokio::fs::File, String> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| format!("cannot create log folder {}: {e}", dir.display()))?;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| format!("cannot open log {}: {e}", path.display()))
}

/// Waits for the process to exit, its timeout or a stop; a timeout or a
/// stop ends the whole group (SIGTERM, grace, SIGKILL).
async fn wait(
    child: &mut tokio::process::Child,
    pgid: Option<Pid>,
    spec: &RunSpec,
    stop: &Stopper,
) -> Result<Outcome, String> {
    let timeout = async {
        match spec.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let status = tokio::select! {
        status = child.wait() => Ok(status),
        () = timeout => Err(None),
        reason = stop.stopped() => Err(Some(reason)),
    };
    Ok(match status {
        Ok(status) => exit_outcome(status.map_err(|e| format!("waiting for the process: {e}"))?),
        Err(why) => {
            terminate(child, pgid, spec.grace).await;
            match why {
                None => Outcome::TimedOut,
                Some(reason) => Outcome::Stopped(reason),
            }
        }
    })
}

/// The process's stdout and stderr, pumped into one channel that one task
/// writes to the log and the tail.
struct Output {
    pumps: Vec<tokio::task::JoinHandle<()>>,
    writer: tokio::task::JoinHandle<()>,
    tail: std::sync::Arc<Mutex<Tail>>,
}

impl Output {
    fn capture(
        child: &mut tokio::process::Child,
        log: tokio::fs::File,
        tail_bytes: usize,
        sink: Option<gpupool_core::runner::OutputSink>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, tx.clone())));
        }
        drop(tx);
        let tail = std::sync::Arc::new(Mutex::new(Tail::new(tail_bytes)));
        let writer = tokio::spawn(write_output(rx, log, std::sync::Arc::clone(&tail), sink));
        Output { pumps, writer, tail }
    }

    /// Waits (a few seconds at most) for the pipes to close and the log to
    /// be written; the tail, with `secrets` replaced by `***`.
    async fn finish(self, secrets: &[String]) -> String {
        for p in self.pumps {
            let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
        // A progress bar redrawn with `\r` is kept as its last state.
        let mut text = gpupool_core::runner::collapse_redraws(&self.tail.lock().await.text());
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }
}

/// The program's path: as given when it holds a `/` (relative to the
/// checkout), else the first executable of that name in `PATH`. Looking it
/// up here gives a clear error, where `setpriv` would only exit 127.
fn find_program(program: &str, cwd: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = cwd.join(program);
        return if executable(&p) { Ok(p) } else { Err(format!("cannot start `{program}`: no such executable file")) };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("cannot start `{program}`: not found in PATH"))
}

fn exit_outcome(status: std::process::ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited(code),
        (None, Some(sig)) => Outcome::Signaled(sig),
        (None, None) => Outcome::Exited(-1),
    }
}

/// SIGTERM to the group, the grace period, then SIGKILL.
async fn terminate(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        if let Some(pgid) = pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = child.kill().await;
    }
    let _ = child.wait().await;
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        }
    }
}

async fn write_output(
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut log: tokio::fs::File,
    tail: std::sync::Arc<Mutex<Tail>>,
    mut sink: Option<gpupool_core::runner::OutputSink>,
) {
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = log.write_all(&chunk).await {
            tracing::warn!("cannot write the job log: {e}");
        }
        tail.lock().await.push(&chunk);
        if let Some(tx) = &sink
            && tx.send(chunk).await.is_err()
        {
            sink = None;
        }
    }
    let _ = log.flush().await;
}

/// The last N bytes of output.
#[derive(Debug)]
struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail { cap, buf: VecDeque::with_capacity(cap.min(1 << 16)) }
    }

    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_core::runner::StopReason;

    fn spec(dir: &Path, argv: &[&str]) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            cwd: dir.to_owned(),
            env: vec![("GREETING".into(), "hello".into())],
            env_remove: vec![],
            log_path: dir.join("logs/run.log"),
            timeout: None,
            grace: Duration::from_secs(2),
            tail_bytes: 1024,
            secrets: vec!["s3cr3t-token".into()],
            output: None,
        }
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpupool-runner-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn exit_codes_output_and_env() {
        let dir = tmp();
        let r = ProcessRunner::new();
        let s = spec(
            &dir,
            &[
                "python3",
                "-c",
                "import os,sys; print(os.environ['GREETING']); print('warn s3cr3t-token', file=sys.stderr); sys.exit(3)",
            ],
        );
        let res = r.run(&s, &Stopper::new(), &CancellationToken::new()).await.unwrap();
        assert_eq!(res.outcome, Outcome::Exited(3));
        assert!(res.tail.contains("hello") && res.tail.contains("warn ***"), "{}", res.tail);
        assert!(!res.tail.contains("s3cr3t"));
        let log = std::fs::read_to_string(dir.join("logs/run.log")).unwrap();
        assert!(log.contains("hello"));
        assert!(r.run(&spec(&dir, &["/no/such/program"]), &Stopper::new(), &CancellationToken::new()).await.is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn timeout_and_stop_kill_the_group() {
        let dir = tmp();
        let r = ProcessRunner::new();
        let mut s =
            spec(&dir, &["python3", "-c", "import subprocess,time; subprocess.Popen(['sleep','30']); time.sleep(30)"]);
        s.timeout = Some(Duration::from_millis(500));
        let res = r.run(&s, &Stopper::new(), &CancellationToken::new()).await.unwrap();
        assert_eq!(res.outcome, Outcome::TimedOut);

        s.timeout = None;
        let stopper = Stopper::new();
        let st = stopper.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            st.stop(StopReason::Cancel);
        });
        let res = r.run(&s, &stopper, &CancellationToken::new()).await.unwrap();
        assert_eq!(res.outcome, Outcome::Stopped(StopReason::Cancel));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.text(), "cdefg");
        t.push(b"0123456789");
        assert_eq!(t.text(), "56789");
    }
}
