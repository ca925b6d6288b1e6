//! One fault stays one fault: a job written behind push's back, a job's env
//! reaching the setup step, a broken worker. Through the real binary, with
//! a real git repository and real Python processes, on SQLite.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `job.py`: appends its job id and `$MY_VAR` to the file `$RAN` names.
const RECORD_RUN: &str = "import os\n\
    with open(os.environ['RAN'], 'a') as f:\n    \
    f.write(os.environ['GPUPOOL_JOB_ID'] + ' ' + os.environ.get('MY_VAR', 'unset') + '\\n')\n";

fn gpupool(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    cmd.args(args)
        .current_dir(dir)
        .env("GPUPOOL_QUEUE", format!("sqlite://{}/queue.db", dir.display()))
        .env("GPUPOOL_DATA_DIR", dir.join("data"))
        .env_remove("GPUPOOL_LOG")
        .stdin(Stdio::null());
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    gpupool(dir, args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = run(dir, args);
    assert!(out.status.success(), "gpupool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A queue in `dir` with `n` jobs that record their runs in `dir/ran.txt`,
/// each with `env` on top; returns the repository's path.
fn setup(dir: &Path, n: usize, env: &serde_json::Value) -> String {
    let repo = gpupool_worker::testing::job_repo(dir, RECORD_RUN);
    ok(dir, &["init"]);
    let mut all_env = env.clone();
    all_env["RAN"] = dir.join("ran.txt").display().to_string().into();
    let jobs: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"git_ref": "main", "entrypoint": "job.py", "gpus": 0, "args": {"i": i}, "env": all_env}))
        .collect();
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).unwrap()).unwrap();
    ok(dir, &["push", "jobs.json"]);
    repo.to_str().unwrap().to_owned()
}

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("ran.txt")).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[test]
fn a_job_written_behind_push_s_back_fails_as_invalid_and_does_not_stall_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = setup(dir, 2, &serde_json::json!({}));
    // Job 1 gains an `LD_PRELOAD` straight in the database, where no push
    // checks it.
    let url = format!("sqlite://{}/queue.db", dir.display());
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let q = gpupool_sqlite::SqliteQueue::connect(&url).await.unwrap();
        sqlx::query("UPDATE jobs SET spec = json_set(spec, '$.env.LD_PRELOAD', '/tmp/evil.so') WHERE id = 1")
            .execute(q.pool())
            .await
            .unwrap();
    });
    ok(dir, &["worker", "--repo", &repo, "--gpus", "none", "--burst"]);
    let job = &json(&ok(dir, &["jobs", "--json", "--id", "1"]))[0];
    assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("failed"), Some(1)), "{job}");
    let errors = json(&ok(dir, &["errors", "--json", "--id", "1"]));
    assert_eq!(errors[0]["kind"], "invalid", "{errors}");
    assert!(errors[0]["message"].as_str().unwrap().contains("LD_PRELOAD"), "{errors}");
    assert_eq!(ran(dir), ["2 unset"], "job 1 never ran; job 2, behind it, did");
}

#[test]
fn a_job_s_env_does_not_reach_the_setup_step_and_loader_variables_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = setup(dir, 1, &serde_json::json!({"MY_VAR": "from-the-job"}));
    let seen = dir.join("setup-saw.txt");
    let setup = format!(
        "python3 -c \"import os, sys; open(sys.argv[1], 'w').write(os.environ.get('MY_VAR', 'unset'))\" {}",
        seen.display()
    );
    ok(dir, &["worker", "--repo", &repo, "--gpus", "none", "--burst", "--setup", &setup]);
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "unset", "the setup step gets no job env");
    assert_eq!(ran(dir), ["1 from-the-job"], "the job itself does");

    // At push: pip, git, compilers and proxies are the worker's to choose.
    for key in ["PIP_INDEX_URL", "https_proxy", "GIT_CONFIG_COUNT", "LDSHARED", "CC", "PYTHONSAFEPATH"] {
        let job = format!(r#"{{"git_ref": "main", "entrypoint": "job.py", "env": {{"{key}": "x"}}}}"#);
        std::fs::write(dir.join("bad.json"), job).unwrap();
        let out = run(dir, &["push", "bad.json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(key), "{key}: {stderr}");
    }
}

#[test]
fn a_broken_worker_gives_jobs_back_uncharged_says_why_and_a_healthy_one_runs_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = setup(dir, 3, &serde_json::json!({}));
    let broken = ["worker", "--repo", &repo, "--gpus", "none", "--command", "/nonexistent/python3"];

    // In the foreground it stops at its first fault, and says why.
    let mut args = broken.to_vec();
    args.push("--burst");
    let out = run(dir, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("worker unhealthy") && stderr.contains("/nonexistent/python3"), "{stderr}");
    for job in json(&ok(dir, &["jobs", "--json"])).as_array().unwrap() {
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("queued"), Some(0)), "{job}");
    }
    assert_eq!(json(&ok(dir, &["errors", "--json"])), serde_json::json!([]), "no attempt was charged");

    // As a service it pauses and shows unhealthy in `gpupool status`.
    let mut args = broken.to_vec();
    args.extend(["--heartbeat", "200ms"]);
    let mut worker = gpupool(dir, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = json(&ok(dir, &["status", "--json"]));
        if status["workers"][0]["state"] == "unhealthy" {
            break status;
        }
        assert!(Instant::now() < deadline, "never unhealthy: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status["workers"][0]["unhealthy"].as_str().unwrap().contains("/nonexistent/python3"), "{status}");
    let report = String::from_utf8(ok(dir, &["status"]).stdout).unwrap();
    assert!(report.contains("is unhealthy: ") && report.contains("/nonexistent/python3"), "{report}");
    worker.kill().unwrap();
    worker.wait().unwrap();

    // A healthy worker runs every job, each on its first attempt.
    ok(dir, &["worker", "--repo", &repo, "--gpus", "none", "--burst"]);
    for job in json(&ok(dir, &["jobs", "--json"])).as_array().unwrap() {
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("succeeded"), Some(1)), "{job}");
    }
    assert_eq!(ran(dir).len(), 3);
}

/// Whether a process is alive (a zombie waiting for its reaper is not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn a_worker_killed_with_sigkill_takes_its_job_s_whole_process_tree_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The job starts a child of its own, as a DataLoader or torchrun does.
    let script = "import os, subprocess, time\n\
        child = subprocess.Popen(['sleep', '300'])\n\
        with open(os.environ['PIDS'] + '.new', 'w') as f:\n    f.write(f'{os.getpid()} {child.pid}')\n\
        os.rename(os.environ['PIDS'] + '.new', os.environ['PIDS'])\n\
        time.sleep(300)\n";
    let repo = gpupool_worker::testing::job_repo(dir, script);
    ok(dir, &["init"]);
    let pids = dir.join("pids.txt");
    let job = serde_json::json!({"git_ref": "main", "entrypoint": "job.py", "gpus": 0, "env": {"PIDS": pids.display().to_string()}});
    std::fs::write(dir.join("job.json"), job.to_string()).unwrap();
    ok(dir, &["push", "job.json"]);
    let mut worker = gpupool(dir, &["worker", "--repo", repo.to_str().unwrap(), "--gpus", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pids.exists() {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&pids).unwrap();
    let (main, grandchild) = text.split_once(' ').unwrap();
    let (main, grandchild): (i32, i32) = (main.parse().unwrap(), grandchild.parse().unwrap());
    assert!(alive(main) && alive(grandchild));

    worker.kill().unwrap(); // SIGKILL: no drain, no cleanup of its own
    worker.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(main) || alive(grandchild) {
        assert!(Instant::now() < deadline, "left alive 5 s after the worker died: {main} {grandchild}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A job whose git host takes the connection and never answers is cancelled
/// within a heartbeat or two, not after the 2-minute stall timeout, and the
/// worker stops at once afterwards.
#[test]
fn a_cancel_reaches_a_job_whose_checkout_hangs() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let repo = format!("http://{}/team/model.git", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let host = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !done.load(Ordering::Relaxed) {
                if let Ok((conn, _)) = listener.accept() {
                    held.push(conn);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    ok(dir, &["init"]);
    std::fs::write(dir.join("jobs.json"), r#"[{"git_ref": "main", "entrypoint": "train.py"}]"#).unwrap();
    let ids = json(&ok(dir, &["push", "jobs.json", "--json"]));
    let id = ids[0].as_str().unwrap().to_owned();
    let args = ["worker", "--repo", &repo, "--gpus", "none", "--heartbeat", "500ms", "--lease", "5s"];
    let mut worker = gpupool(dir, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let state = |dir: &Path| json(&ok(dir, &["jobs", "--id", &id, "--json"]))[0]["state"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(dir) != "running" {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // in the hanging checkout
    ok(dir, &["cancel", &id]);
    let asked = Instant::now();
    while state(dir) != "cancelled" {
        assert!(asked.elapsed() < Duration::from_secs(20), "the cancel did not reach the hanging checkout");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(json(&ok(dir, &["errors", "--json"])), serde_json::json!([]), "a cancel is not an error");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(worker.id()).unwrap()), nix::sys::signal::SIGTERM)
        .unwrap();
    let stopping = Instant::now();
    while worker.try_wait().unwrap().is_none() {
        assert!(stopping.elapsed() < Duration::from_secs(15), "the worker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    host.join().unwrap();
}
