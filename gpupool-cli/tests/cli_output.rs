//! The `gpupool` binary's output as a daily tool meets it: `--queue` is
//! always the URL (`jobs --in NAME` filters), read commands say which queue
//! they read, and a pipe closed early ends the command quietly.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn gpupool(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    cmd.args(args)
        .current_dir(dir)
        .env("GPUPOOL_QUEUE", format!("sqlite://{}/queue.db", dir.display()))
        .env_remove("GPUPOOL_LOG")
        .stdin(Stdio::null());
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    gpupool(dir, args).output().unwrap()
}

/// A queue in `dir` holding `n` jobs of queue `default` and one of `high`.
fn queue_with_jobs(dir: &Path, n: usize) {
    assert!(run(dir, &["init"]).status.success());
    let mut jobs: Vec<serde_json::Value> =
        (0..n).map(|i| serde_json::json!({"git_ref": "main", "entrypoint": "train.py", "args": {"i": i}})).collect();
    jobs.push(serde_json::json!({"git_ref": "main", "entrypoint": "eval.py", "queue": "high"}));
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).unwrap()).unwrap();
    let out = run(dir, &["push", "jobs.json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn queue_is_always_the_url_and_in_filters_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    queue_with_jobs(tmp.path(), 2);

    let out = run(tmp.path(), &["jobs", "--queue", "high"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a queue name is not a URL");
    assert!(stderr.contains("not a queue URL") && stderr.contains("gpupool jobs --in high"), "{stderr}");

    let out = run(tmp.path(), &["jobs", "--in", "high", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entrypoints: Vec<&str> = listed.as_array().unwrap().iter().map(|j| j["entrypoint"].as_str().unwrap()).collect();
    assert_eq!(entrypoints, ["eval.py"], "only the `high` queue's job");
}

#[test]
fn read_commands_name_the_queue_on_stderr_unless_json_or_quiet() {
    let tmp = tempfile::tempdir().unwrap();
    queue_with_jobs(tmp.path(), 1);
    let url = format!("sqlite://{}/queue.db", tmp.path().display());
    for args in [&["jobs"][..], &["errors"], &["status"]] {
        let out = run(tmp.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains(&format!("reading {url}")), "{args:?}: {stderr}");
    }
    for args in [&["jobs", "--json"][..], &["jobs", "--quiet"], &["status", "-q"]] {
        let out = run(tmp.path(), args);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?} prints only results");
    }
}

#[test]
fn a_pipe_closed_early_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    // Far more than a pipe buffer (64 KiB) of JSON.
    queue_with_jobs(tmp.path(), 1000);
    for args in [&["jobs", "--json", "--limit", "2000"][..], &["jobs", "--limit", "2000"]] {
        let mut child = gpupool(tmp.path(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut first = [0u8; 64];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then `head` goes away
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: as `ls | head` ends: {stderr}");
    }
}

#[test]
fn status_groups_waiting_jobs_by_reason_at_any_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(run(dir, &["init"]).status.success());
    let mut jobs: Vec<serde_json::Value> =
        (0..2000).map(|i| serde_json::json!({"git_ref": "main", "entrypoint": "train.py", "args": {"i": i}})).collect();
    jobs.push(serde_json::json!({"git_ref": "main", "entrypoint": "cpu.py", "gpus": 0}));
    jobs.push(serde_json::json!({"git_ref": "main", "entrypoint": "big.py", "gpus": 2}));
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).unwrap()).unwrap();
    assert!(run(dir, &["push", "jobs.json"]).status.success());

    let out = run(dir, &["status"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.lines().count() < 20, "short at any size:\n{report}");
    assert!(
        report.contains(
            "waiting: 2,000 jobs: need a GPU where a worker has one, else the CPU; no worker is live \
             (job 1, job 2, job 3, job 4, job 5 and 1,995 more)"
        ),
        "{report}"
    );
    assert!(report.contains("waiting: 1 job: CPU jobs; no worker is live (job 2001)"), "{report}");
    assert!(report.contains("waiting: 1 job: need 2 GPUs; no worker is live (job 2002)"), "{report}");
    assert!(!report.contains("GPU(s)"), "{report}");

    // The same facts as JSON, every id included.
    let out = run(dir, &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["queue"], format!("sqlite://{}/queue.db", dir.display()));
    assert_eq!((status["jobs"]["queued"].as_u64(), status["jobs"]["running"].as_u64()), (Some(2002), Some(0)));
    assert_eq!(status["capabilities"]["gpu_filter"], true);
    assert_eq!(status["workers"], serde_json::json!([]));
    let groups = status["waiting"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{groups:?}");
    let big = groups.iter().find(|g| g["count"] == 2000).unwrap();
    assert_eq!(big["jobs"].as_array().unwrap().len(), 2000);
    assert_eq!(big["reason"], "need a GPU where a worker has one, else the CPU; no worker is live");
}

#[test]
fn push_dash_reads_standard_input() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(tmp.path(), &["init"]).status.success());
    let mut child = gpupool(tmp.path(), &["push", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"branch": "main", "train_path": "./train.py", "lr": "0.1"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = run(tmp.path(), &["jobs", "--json", "--id", ids[0].as_str().unwrap()]);
    let job: serde_json::Value = serde_json::from_slice(&job.stdout).unwrap();
    assert_eq!((job[0]["entrypoint"].as_str(), job[0]["args"]["lr"].as_str()), (Some("train.py"), Some("0.1")));
}

#[test]
fn the_original_format_sets_job_options_under_gpupool() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(tmp.path(), &["init"]).status.success());
    std::fs::write(
        tmp.path().join("message.json"),
        r#"{"branch": "develop", "train_path": "./ai_folder/train.py", "resize": "128 96",
            "gpupool": {"gpus": 2, "queue": "high"}}"#,
    )
    .unwrap();
    let out = run(tmp.path(), &["push", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(tmp.path(), &["jobs", "--json", "--in", "high"]);
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs[0]["gpus"], 2);
    assert_eq!(jobs[0]["args"], serde_json::json!({"resize": ["128", "96"]}), "`gpupool` is no argument");
}

#[test]
fn library_log_lines_stay_off_and_one_clean_line_explains() {
    let Ok(url) = std::env::var("GPUPOOL_TEST_AMQP_URL") else { return };
    let Some((base, _vhost)) = url.rsplit_once('/') else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = run(tmp.path(), &["--queue", &format!("{base}/gpupool-no-such-vhost"), "jobs"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "one line, no driver log:\n{stderr}");
    assert!(stderr.starts_with("gpupool: ") && stderr.contains("gpupool-no-such-vhost"), "{stderr}");
}

#[test]
fn gpus_given_as_a_list_without_nvml_are_taken_as_given_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(tmp.path(), &["init"]).status.success());
    let out = run(tmp.path(), &["worker", "--gpus", "7,9", "--burst", "--data-dir", "data"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Without a driver: a warning and a run; with one (a GPU host with fewer
    // GPUs): a refusal naming them.
    let warned = out.status.success() && stderr.contains("taking --gpus 7,9 as given");
    let refused = !out.status.success() && stderr.contains("--gpus names GPU 7,9");
    assert!(warned || refused, "{stderr}");
}

#[test]
fn a_missing_local_repository_is_named_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(run(tmp.path(), &["init"]).status.success());
    std::fs::write(tmp.path().join("job.json"), r#"{"git_ref": "main", "entrypoint": "train.py"}"#).unwrap();
    assert!(run(tmp.path(), &["push", "job.json"]).status.success());
    let missing = tmp.path().join("no-such-repo");
    let repo = missing.to_str().unwrap();
    let out = run(tmp.path(), &["worker", "--repo", repo, "--gpus", "none", "--burst", "--data-dir", "data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let errors = run(tmp.path(), &["errors", "--json"]);
    let errors: serde_json::Value = serde_json::from_slice(&errors.stdout).unwrap();
    assert_eq!(errors[0]["kind"], "repo");
    assert_eq!(errors[0]["message"], format!("no repository at {repo}"));
}

#[test]
fn the_jobs_table_shows_worker_and_duration_clears_exit_when_requeued_and_fits_the_width() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = gpupool_worker::testing::job_repo(dir, "import sys\nsys.exit(3)\n");
    assert!(run(dir, &["init"]).status.success());
    std::fs::write(
        dir.join("job.json"),
        r#"{"git_ref": "main", "entrypoint": "job.py", "max_attempts": 1, "name": "a-rather-long-run-name"}"#,
    )
    .unwrap();
    assert!(run(dir, &["push", "job.json"]).status.success());
    let repo = repo.to_str().unwrap();
    let out = run(dir, &["worker", "--repo", repo, "--gpus", "none", "--burst", "--data-dir", "data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let table = String::from_utf8(run(dir, &["jobs"]).stdout).unwrap();
    let (header, row) = (table.lines().next().unwrap(), table.lines().nth(1).unwrap());
    assert!(header.contains("WORKER") && header.contains("DURATION"), "{table}");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "failed", "{table}");
    assert!(cells.contains(&"3") && cells.iter().any(|c| c.ends_with('s')), "exit 3 and a duration: {table}");

    assert!(run(dir, &["retry", "1"]).status.success());
    let table = String::from_utf8(run(dir, &["jobs"]).stdout).unwrap();
    let cells: Vec<String> = table.lines().nth(1).unwrap().split_whitespace().map(str::to_owned).collect();
    assert_eq!(cells[1], "queued", "{table}");
    assert!(!cells.contains(&"3".to_owned()), "a queued job shows no old exit code: {table}");

    let narrow = gpupool(dir, &["jobs"]).env("COLUMNS", "60").output().unwrap();
    let narrow = String::from_utf8(narrow.stdout).unwrap();
    assert!(narrow.lines().all(|l| l.chars().count() <= 60), "{narrow}");
}

#[test]
fn cancel_and_retry_by_state_queue_and_name_with_yes_above_ten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(run(dir, &["init"]).status.success());
    let mut jobs: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"git_ref": "main", "entrypoint": "train.py", "name": format!("sweep-{i}")}))
        .collect();
    jobs.push(serde_json::json!({"git_ref": "main", "entrypoint": "train.py", "name": "other"}));
    std::fs::write(dir.join("jobs.json"), serde_json::to_string(&jobs).unwrap()).unwrap();
    assert!(run(dir, &["push", "jobs.json"]).status.success());
    let states = || -> Vec<String> {
        let out = run(dir, &["jobs", "--json"]);
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut v: Vec<String> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|j| format!("{}={}", j["name"].as_str().unwrap(), j["state"].as_str().unwrap()))
            .collect();
        v.sort();
        v
    };

    let out = run(dir, &["cancel"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("name the jobs to cancel"));
    let out = run(dir, &["cancel", "--name", "sweep-*"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cancel 12 jobs; add --yes"), "{stderr}");
    assert!(states().iter().all(|s| s.ends_with("=queued")), "nothing was touched");

    let out = run(dir, &["cancel", "--name", "sweep-*", "--in", "default", "--yes"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cancel: 12 job(s)"));
    assert_eq!(states().iter().filter(|s| s.ends_with("=cancelled")).count(), 12);
    assert!(states().contains(&"other=queued".to_owned()));

    let out = run(dir, &["retry", "--state", "cancelled", "--name", "sweep-1*"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requeued: Vec<String> =
        states().into_iter().filter(|s| s.starts_with("sweep") && s.ends_with("=queued")).collect();
    assert_eq!(requeued, ["sweep-10=queued", "sweep-11=queued", "sweep-1=queued"], "sorted as text");
}

#[test]
fn the_config_file_is_found_up_to_the_git_root_then_in_xdg_and_config_says_where_from() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let sub = project.join("src").join("models");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(project.join(".git")).unwrap();
    std::fs::write(project.join("gpupool.toml"), "queue = \"sqlite://.gpupool/q.db\"\n[worker]\nslots = 3\n").unwrap();
    let xdg = tmp.path().join("xdg");
    let config = |dir: &Path, extra: &[(&str, &str)]| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
        cmd.args(["config", "--json"]).current_dir(dir).env_remove("GPUPOOL_QUEUE").env("XDG_CONFIG_HOME", &xdg);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let get = |rows: &serde_json::Value, key: &str| -> (String, String) {
        let row = rows.as_array().unwrap().iter().find(|r| r["key"] == key).unwrap_or_else(|| panic!("{key}: {rows}"));
        (row["value"].as_str().unwrap().to_owned(), row["from"].as_str().unwrap().to_owned())
    };

    // From a sub-folder: the project's file, its relative queue path anchored there.
    let rows = config(&sub, &[]);
    let toml = project.join("gpupool.toml").display().to_string();
    assert_eq!(get(&rows, "queue"), (format!("sqlite://{}", project.join(".gpupool/q.db").display()), toml.clone()));
    assert_eq!(get(&rows, "worker.slots"), ("3".to_owned(), toml));
    let rows = config(&sub, &[("GPUPOOL_QUEUE", "sqlite:///elsewhere/q.db")]);
    assert_eq!(get(&rows, "queue"), ("sqlite:///elsewhere/q.db".to_owned(), "GPUPOOL_QUEUE".to_owned()));

    // Another repository with no file of its own: the user's config file.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join(".git")).unwrap();
    assert_eq!(get(&config(&other, &[]), "queue").1, "default");
    std::fs::create_dir_all(xdg.join("gpupool")).unwrap();
    std::fs::write(xdg.join("gpupool/config.toml"), "queue = \"sqlite:///var/tmp/team.db\"\n").unwrap();
    let from = xdg.join("gpupool/config.toml").display().to_string();
    assert_eq!(get(&config(&other, &[]), "queue"), ("sqlite:///var/tmp/team.db".to_owned(), from));
}

#[test]
fn only_init_creates_a_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for args in [&["jobs"][..], &["status"], &["push"], &["errors"]] {
        let out = run(dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("no gpupool queue at sqlite://") && stderr.contains("gpupool init --queue"),
            "{stderr}"
        );
    }
    let nowhere = dir.join("no-such-dir");
    let url = format!("sqlite://{}/q.db", nowhere.display());
    assert!(!run(dir, &["--queue", &url, "jobs"]).status.success());
    assert!(!dir.join("queue.db").exists() && !nowhere.exists(), "nothing was created");

    // `push --init` and `worker --init` create it for scripts that want both.
    std::fs::write(dir.join("job.json"), r#"{"git_ref": "main", "entrypoint": "train.py"}"#).unwrap();
    let out = run(dir, &["push", "--init", "job.json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other = format!("sqlite://{}/other.db", dir.display());
    let out = run(dir, &["--queue", &other, "worker", "--init", "--burst", "--gpus", "none", "--data-dir", "data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run(dir, &["--queue", &other, "jobs"]).status.success());
}

#[test]
fn a_server_queue_that_init_never_set_up_is_named_and_nothing_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("job.json"), r#"{"git_ref": "main", "entrypoint": "train.py"}"#).unwrap();
    for q in common::TestQueue::servers() {
        let (name, url) = (q.name, q.url.clone());
        for _ in 0..2 {
            // Twice: the first look created nothing that the second finds.
            for args in [&["jobs"][..], &["status"], &["push", "job.json"], &["errors"], &["cancel", "1"]] {
                let mut all = vec!["--queue", url.as_str()];
                all.extend_from_slice(args);
                let out = run(dir, &all);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{name} {args:?}");
                assert!(
                    stderr.contains("no gpupool queue at ") && stderr.contains("create it with `gpupool init --queue"),
                    "{name} {args:?}: {stderr}"
                );
                assert!(!stderr.contains("1146") && !stderr.contains("doesn't exist"), "{name}: {stderr}");
            }
        }
        let out = run(dir, &["--queue", &url, "init"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let out = run(dir, &["--queue", &url, "push", "job.json"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let out = run(dir, &["--queue", &url, "jobs", "--json"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 1, "{name}");
        let id = listed[0]["id"].as_str().unwrap();
        let out = run(dir, &["--queue", &url, "cancel", id]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn an_idempotency_key_returns_the_same_job_and_refuses_another() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(run(dir, &["init"]).status.success());
    let job = r#"{"git_ref": "main", "entrypoint": "train.py", "args": {"lr": 0.1}, "idempotency_key": "run-7"}"#;
    std::fs::write(dir.join("a.json"), job).unwrap();
    std::fs::write(dir.join("b.json"), job.replace("0.1", "0.2")).unwrap();
    let out = run(dir, &["push", "a.json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pushed 1 job(s): 1\n");

    let out = run(dir, &["push", "a.json"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "job 1 was already pushed with idempotency_key `run-7`; not pushed again\n"
    );
    let out = run(dir, &["push", "a.json", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!(["1"]));

    let out = run(dir, &["push", "b.json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the key with another job is refused");
    assert!(stderr.contains("idempotency_key `run-7` was already used by job 1, a different job"), "{stderr}");
    let listed: serde_json::Value = serde_json::from_slice(&run(dir, &["jobs", "--json"]).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "nothing was added");
    assert_eq!(listed[0]["args"]["lr"], 0.1, "the first job is untouched");
}

/// `job.py` sleeps `--sleep S` seconds (default 0), then exits 3.
const SLEEP_THEN_EXIT_3: &str = "import sys, time\n\
    args = sys.argv[1:]\n\
    time.sleep(float(args[args.index('--sleep') + 1]) if '--sleep' in args else 0)\n\
    sys.exit(3)\n";

#[test]
fn exit_and_timeout_failures_run_once_unless_the_job_names_max_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = gpupool_worker::testing::job_repo(dir, SLEEP_THEN_EXIT_3);
    assert!(run(dir, &["init"]).status.success());
    let jobs = serde_json::json!([
        {"git_ref": "main", "entrypoint": "job.py", "name": "plain"},
        {"git_ref": "main", "entrypoint": "job.py", "name": "slow", "timeout": "1s", "args": {"sleep": 30}},
        {"git_ref": "main", "entrypoint": "job.py", "name": "asked", "max_attempts": 2},
    ]);
    std::fs::write(dir.join("jobs.json"), jobs.to_string()).unwrap();
    assert!(run(dir, &["push", "jobs.json"]).status.success());
    let repo = repo.to_str().unwrap();
    let out = run(dir, &["worker", "--repo", repo, "--gpus", "none", "--burst", "--data-dir", "data"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let listed: serde_json::Value = serde_json::from_slice(&run(dir, &["jobs", "--json"]).stdout).unwrap();
    let by_name = |name: &str| listed.as_array().unwrap().iter().find(|j| j["name"] == name).unwrap().clone();
    for (name, attempts) in [("plain", 1), ("slow", 1), ("asked", 2)] {
        let job = by_name(name);
        assert_eq!((job["state"].as_str(), job["attempt"].as_u64()), (Some("failed"), Some(attempts)), "{name}");
    }
    let errors: serde_json::Value = serde_json::from_slice(
        &run(dir, &["errors", "--json", "--id", by_name("slow")["id"].as_str().unwrap()]).stdout,
    )
    .unwrap();
    assert_eq!(errors[0]["kind"], "timeout");

    // ATTEMPT reads as runs so far and the limit, also after a retry.
    let table = String::from_utf8(run(dir, &["jobs", "--in", "default"]).stdout).unwrap();
    let row = |table: &str, name: &str| table.lines().find(|l| l.contains(name)).unwrap().to_owned();
    assert!(row(&table, "plain").contains("1 (limit 3)"), "{table}");
    assert!(row(&table, "asked").contains("2 (limit 2)"), "{table}");
    assert!(run(dir, &["retry", by_name("asked")["id"].as_str().unwrap()]).status.success());
    let table = String::from_utf8(run(dir, &["jobs"]).stdout).unwrap();
    assert!(row(&table, "asked").contains("2 (limit 4)"), "{table}");
}

/// `status --json` until `check` holds for it (up to 30 s).
fn wait_for_status(dir: &Path, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = run(dir, &["status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if check(&status) {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "waited 30 s for {what}: {status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A queue in `dir` holding one job that sleeps `sleep` seconds, and a
/// worker that heartbeats every `heartbeat`, started on it.
fn worker_on_a_sleeping_job(dir: &Path, sleep: u32, heartbeat: &str) -> std::process::Child {
    let repo = gpupool_worker::testing::job_repo(dir, SLEEP_THEN_EXIT_3);
    assert!(run(dir, &["init"]).status.success());
    let job = serde_json::json!({"git_ref": "main", "entrypoint": "job.py", "args": {"sleep": sleep}});
    std::fs::write(dir.join("job.json"), job.to_string()).unwrap();
    assert!(run(dir, &["push", "job.json"]).status.success());
    let repo = repo.to_str().unwrap();
    gpupool(dir, &["worker", "--repo", repo, "--gpus", "none", "--heartbeat", heartbeat, "--data-dir", "data"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn status_shows_workers_draining_then_lost_then_drops_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let worker = worker_on_a_sleeping_job(dir, 20, "100ms");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.id()).unwrap());
    let state_of = |s: &serde_json::Value| s["workers"][0]["state"].as_str().map(str::to_owned);
    let status = wait_for_status(dir, "the job to run", |s| s["workers"][0]["running"][0]["id"] == "1");
    assert_eq!(state_of(&status).as_deref(), Some("ok"));
    assert_eq!(status["jobs"]["running"], 1, "{status}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for_status(dir, "draining", |s| state_of(s).as_deref() == Some("draining"));
    let report = String::from_utf8(run(dir, &["status"]).stdout).unwrap();
    assert!(report.lines().any(|l| l.contains("draining") && l.contains(" 1")), "{report}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut worker = worker;
    let _ = worker.wait();
    wait_for_status(dir, "lost", |s| state_of(s).as_deref() == Some("lost"));
    let report = String::from_utf8(run(dir, &["status"]).stdout).unwrap();
    assert!(report.contains("LOST"), "{report}");
    // 100 heartbeats of 100 ms without a word: dropped from the registry.
    let status = wait_for_status(dir, "the lost worker to be dropped", |s| s["workers"] == serde_json::json!([]));
    assert_eq!(status["capabilities"]["worker_registry"], true);
}

#[test]
fn a_requested_cancel_shows_as_cancelling_until_the_worker_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut worker = worker_on_a_sleeping_job(dir, 30, "3s");
    wait_for_status(dir, "the job to run", |s| s["workers"][0]["running"][0]["id"] == "1");
    let out = run(dir, &["cancel", "1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancel requested"), "{out:?}");
    let table = String::from_utf8(run(dir, &["jobs"]).stdout).unwrap();
    assert!(table.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("cancelling"), "{table}");
    let listed: serde_json::Value = serde_json::from_slice(&run(dir, &["jobs", "--json"]).stdout).unwrap();
    assert_eq!((listed[0]["state"].as_str(), listed[0]["cancel_requested"].as_bool()), (Some("running"), Some(true)));
    // At its next heartbeat the worker stops the run: `cancelled`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listed: serde_json::Value = serde_json::from_slice(&run(dir, &["jobs", "--json"]).stdout).unwrap();
        if listed[0]["state"] == "cancelled" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cancel never landed: {listed}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = worker.kill();
    let _ = worker.wait();
}

#[test]
fn messages_read_as_words_with_no_debug_formatting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = gpupool_worker::testing::job_repo(dir, SLEEP_THEN_EXIT_3);
    assert!(run(dir, &["init"]).status.success());
    std::fs::write(dir.join("job.json"), r#"{"git_ref": "main", "entrypoint": "job.py"}"#).unwrap();
    assert!(run(dir, &["push", "job.json"]).status.success());
    let repo = repo.to_str().unwrap();
    let worker = run(dir, &["worker", "--repo", repo, "--gpus", "none", "--burst", "--data-dir", "data"]);
    let mut said = String::from_utf8_lossy(&worker.stderr).into_owned();
    for args in
        [&["jobs"][..], &["errors"], &["status"], &["--queue", "redis://", "jobs"], &["jobs", "--state", "lost"]]
    {
        let out = run(dir, args);
        said.push_str(&String::from_utf8_lossy(&out.stdout));
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(said.contains("exit code 3") || said.contains("exited with code 3"), "{said}");
    assert!(said.contains("Missing hostname"), "{said}");
    for debug in ["Exited(", "Some(", "None", "InvalidClientConfig", "Error {", "kind:"] {
        assert!(!said.contains(debug), "`{debug}` in:\n{said}");
    }
}

#[test]
fn the_readme_and_docs_link_only_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (_, rest) in text.match_indices("](").map(|(i, _)| text.split_at(i + 2)) {
            let target = rest.split(')').next().unwrap().split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            assert!(resolved.exists(), "{}: link to `{target}`, which is not in the repository", file.display());
            let resolved = resolved.canonicalize().unwrap();
            assert!(resolved.starts_with(root.canonicalize().unwrap()), "{}: `{target}` leaves it", file.display());
        }
    }
}
