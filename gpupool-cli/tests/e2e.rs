//! End to end: a real git repository made here, a real `python3` script
//! that records its argv, environment and working directory, and a real
//! `gpupool worker` process. Every scenario runs on the embedded SQLite
//! queue and on every server backend whose test URL is set
//! (`GPUPOOL_TEST_MYSQL_URL`, …); a backend without one prints `skipped: …`,
//! which fails under `GPUPOOL_REQUIRE_BACKENDS=1`.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TRAIN_PY: &str = r#"import json, os, subprocess, sys, time
VERSION = __VERSION__
args = sys.argv[1:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
rec = {"argv": args, "cwd": os.getcwd(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "version": VERSION, "job": os.environ.get("GPUPOOL_JOB_ID"), "attempt": os.environ.get("GPUPOOL_ATTEMPT"),
       "pid": os.getpid(), "start": time.time(), "token": os.environ.get("GPUPOOL_GIT_TOKEN"),
       "unbuffered": os.environ.get("PYTHONUNBUFFERED"), "order": os.environ.get("CUDA_DEVICE_ORDER")}
if "--spawn-child" in args:
    rec["child_pid"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]).pid
path = os.path.join(os.environ["E2E_OUT"], "run-%s-%s.json" % (rec["job"], rec["attempt"]))
with open(path + ".tmp", "w") as f:
    json.dump(rec, f)
os.rename(path + ".tmp", path)
if "--warn" in args:
    print("UserWarning: this is only a warning", file=sys.stderr)
    print("epoch 1 loss 0.5")
if opt("--model_dir"):
    # What a training run leaves: a model in its working directory, a file
    # in GPUPOOL_OUTPUT_DIR, results as lines, a result file, a progress bar.
    os.makedirs(opt("--model_dir"), exist_ok=True)
    with open(os.path.join(opt("--model_dir"), "best.pth"), "wb") as f:
        f.write(b"weights" * 1000)
    with open(os.path.join(os.environ["GPUPOOL_OUTPUT_DIR"], "métriques 1.csv"), "w") as f:
        f.write("epoch,acc\n1,0.91\n")
    for i in range(1, 301):
        print("\r%d/300 [%s]" % (i, "=" * (i // 30)), end="", flush=True)
    print()
    print('GPUPOOL_RESULT {"val_acc": 0.5, "loss": 0.2}')
    print("GPUPOOL_RESULT {this is not json")
    print('GPUPOOL_RESULT {"val_acc": 0.91}', flush=True)
    with open(os.environ["GPUPOOL_RESULT_FILE"], "w") as f:
        json.dump({"epochs": 1}, f)
    os.symlink("/etc/passwd", "escape")
if opt("--bs"):
    # A sweep's run: its metric from its point.
    print('GPUPOOL_RESULT {"score": %s}' % (float(opt("--lr")) * int(opt("--bs"))), flush=True)
time.sleep(float(opt("--sleep", 0)))
if rec["attempt"] == "1":
    time.sleep(float(opt("--sleep-first", 0)))
    if "--oom-first" in args:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", file=sys.stderr)
        sys.exit(1)
if opt("--exit"):
    try:
        raise ValueError("boom at epoch 1")
    except ValueError:
        import traceback
        traceback.print_exc()
    sys.exit(int(opt("--exit")))
rec["end"] = time.time()
with open(path + ".end", "w") as f:
    json.dump(rec, f)
"#;

/// Where a scenario's queue lives.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Mysql,
    Redis,
    Amqp,
}

impl Backend {
    /// The queue URL for one test, or `None` (after saying why) to skip.
    fn url(self, dir: &Path) -> Option<String> {
        let (var, name) = match self {
            Backend::Sqlite => return Some(format!("sqlite://{}/queue.db", dir.display())),
            Backend::Mysql => ("GPUPOOL_TEST_MYSQL_URL", "MySQL end-to-end test"),
            Backend::Redis => ("GPUPOOL_TEST_REDIS_URL", "Redis end-to-end test"),
            Backend::Amqp => ("GPUPOOL_TEST_AMQP_URL", "RabbitMQ end-to-end test"),
        };
        let base = gpupool_core::conformance::service_url(var, name, || None)?;
        let sep = if base.contains('?') { '&' } else { '?' };
        let id = gpupool_core::conformance::unique_suffix();
        Some(match self {
            // Reclaim may look at an entry after 1 s idle (the tests use 3 s leases).
            Backend::Redis => format!("{base}{sep}prefix=gpe2e:{id}:&reclaim_idle=1s"),
            Backend::Amqp => format!("{base}{sep}prefix=gpe2e.{id}.&ledger_max_age=1D"),
            _ => format!("{base}{sep}prefix=e2e{id}_"),
        })
    }
}

/// One test's world: a queue, a data dir, a repository, an output dir.
struct World {
    backend: Backend,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    repo: PathBuf,
    out: PathBuf,
    /// The first commit (VERSION = 1, the tip of `master`).
    first: String,
    /// The second commit (VERSION = 2, the tip of `develop`).
    second: String,
}

/// The worker's setup step in the tests: it logs each run and fails when
/// requirements.txt asks for a package that does not exist.
const SETUP_PY: &str = r#"import os, sys
with open(os.path.join(os.environ["E2E_OUT"], "setup.log"), "a") as f:
    f.write(open("requirements.txt").read().strip().replace("\n", ",") + "\n")
if "no-such-package" in open("requirements.txt").read():
    print("ERROR: No matching distribution found for no-such-package", file=sys.stderr)
    sys.exit(1)
"#;

fn commit_files(
    repo: &git2::Repository,
    files: &[(&str, String)],
    branch: &str,
    parent: Option<&git2::Commit<'_>>,
) -> git2::Oid {
    let workdir = repo.workdir().unwrap();
    let mut index = repo.index().unwrap();
    for (path, content) in files {
        let full = workdir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, content).unwrap();
        index.add_path(Path::new(path)).unwrap();
    }
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("e2e", "e2e@example.com").unwrap();
    let parents: Vec<&git2::Commit<'_>> = parent.into_iter().collect();
    let oid = repo
        .commit(None, &sig, &sig, &format!("{files:?}").chars().take(60).collect::<String>(), &tree, &parents)
        .unwrap();
    repo.reference(&format!("refs/heads/{branch}"), oid, true, "e2e").unwrap();
    oid
}

fn commit(repo: &git2::Repository, version: u32, branch: &str, parent: Option<&git2::Commit<'_>>) -> git2::Oid {
    let files = [
        ("ai_folder/train.py", TRAIN_PY.replace("__VERSION__", &version.to_string())),
        ("requirements.txt", "numpy\n".to_owned()),
        ("setup_step.py", SETUP_PY.to_owned()),
    ];
    commit_files(repo, &files, branch, parent)
}

impl World {
    fn new(backend: Backend) -> Option<World> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let url = backend.url(&dir)?;
        let repo_path = dir.join("repo");
        let repo = git2::Repository::init(&repo_path).unwrap();
        let first = commit(&repo, 1, "master", None);
        let first_commit = repo.find_commit(first).unwrap();
        let second = commit(&repo, 2, "develop", Some(&first_commit));
        repo.set_head("refs/heads/master").unwrap();
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let world = World {
            backend,
            url,
            dir,
            repo: repo_path,
            out,
            first: first.to_string(),
            second: second.to_string(),
            _tmp: tmp,
        };
        // Only `init` creates a queue, on every backend.
        world.gp_ok(&["init"]);
        Some(world)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpupool"));
        cmd.arg("--queue")
            .arg(&self.url)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(args)
            .current_dir(&self.dir)
            .env("E2E_OUT", &self.out)
            .env_remove("GPUPOOL_QUEUE")
            .env_remove("GPUPOOL_GIT_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    fn gp(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn gp_ok(&self, args: &[&str]) -> String {
        let out = self.gp(args);
        assert!(out.status.success(), "gpupool {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.gp_ok(&all)).unwrap()
    }

    /// Pushes a file holding `jobs`; returns the ids.
    fn push(&self, jobs: &Value) -> Vec<String> {
        let file = self.dir.join(format!("jobs-{}.json", gpupool_core::conformance::unique_suffix()));
        std::fs::write(&file, serde_json::to_string_pretty(jobs).unwrap()).unwrap();
        let ids = self.json(&["push", file.to_str().unwrap()]);
        ids.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    }

    fn job(&self, id: &str) -> Value {
        self.json(&["jobs", "--id", id])[0].clone()
    }

    fn errors(&self, id: &str) -> Vec<Value> {
        self.json(&["errors", "--id", id]).as_array().unwrap().clone()
    }

    fn worker(&self, extra: &[&str]) -> Child {
        let mut args = vec!["worker", "--repo", self.repo.to_str().unwrap(), "--gpus", "none"];
        args.extend_from_slice(extra);
        self.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Runs a `--burst` worker to its end; returns its stderr.
    fn burst(&self, extra: &[&str]) -> String {
        let mut args = vec!["--burst"];
        args.extend_from_slice(extra);
        let child = self.worker(&args);
        let out = wait_output(child, Duration::from_secs(90));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "worker failed: {stderr}");
        stderr
    }

    fn run_record(&self, id: &str, attempt: u32) -> Value {
        let path = self.out.join(format!("run-{id}-{attempt}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no run file {path:?}")))
            .unwrap()
    }

    fn wait_for_run(&self, id: &str, attempt: u32) -> Value {
        let path = self.out.join(format!("run-{id}-{attempt}.json"));
        wait_until(Duration::from_secs(30), || path.exists());
        self.run_record(id, attempt)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let url = self.url.clone();
        let backend = self.backend;
        let cleaned = tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
            rt.block_on(async {
                match backend {
                    Backend::Sqlite => Ok(()),
                    Backend::Mysql => gpupool_mysql::MysqlQueue::connect(&url).await?.drop_tables().await,
                    Backend::Redis => {
                        let q = gpupool_redis::RedisQueue::connect(&url).await?;
                        let mut c = q.connection();
                        let keys: Vec<String> = ::redis::cmd("KEYS")
                            .arg(format!("{}*", q.options().prefix))
                            .query_async(&mut c)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: ::redis::RedisResult<i64> = ::redis::cmd("DEL").arg(keys).query_async(&mut c).await;
                        }
                        Ok(())
                    }
                    Backend::Amqp => gpupool_amqp::AmqpQueue::connect(&url).await?.delete_queues().await,
                }
            })
        });
        if let Ok(Err(e)) = cleaned {
            eprintln!("could not clean up the test queue: {e}");
        }
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "condition not met within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("worker did not finish within {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: i64) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()), sig).unwrap();
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn seed_message_json_runs_at_the_branch_tip(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let seed = r#"{
  "branch": "develop",
  "train_path": "./ai_folder/train.py",
  "name": "test_name",
  "seed": "42",
  "epoch": "1",
  "dataset": "MaskBaseDataset",
  "augmentation": "BaseAugmentation",
  "resize": "128 96",
  "batch_size": "64",
  "lr": "1e-3"
}"#;
    std::fs::write(w.dir.join("message.json"), seed).unwrap();
    let out = w.gp_ok(&["push"]);
    // "pushed 1 job(s): ID"; ids are backend sequences (1 on a fresh SQL
    // queue, a stream offset on RabbitMQ).
    let id = out.trim().strip_prefix("pushed 1 job(s): ").expect("the push summary").to_owned();
    w.burst(&[]);
    let job = w.job(&id);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["commit"], w.second.as_str(), "the record shows the branch tip");
    assert_eq!(job["name"], "test_name");
    let run = w.run_record(&id, 1);
    assert_eq!(run["version"], 2);
    let expected = "--name test_name --seed 42 --epoch 1 --dataset MaskBaseDataset --augmentation BaseAugmentation \
                    --resize 128 96 --batch_size 64 --lr 1e-3";
    assert_eq!(strings(&run["argv"]), expected.split(' ').collect::<Vec<_>>());
    assert_eq!(run["cuda"], "", "a CPU worker gives no GPU");
    assert_eq!(run["unbuffered"], "1");
    assert_eq!(run["order"], "PCI_BUS_ID");
    assert!(run["cwd"].as_str().unwrap().contains("checkouts"), "runs in its own checkout");
    // The checkout is removed afterwards.
    // (Each worker process keeps its checkouts in a folder of its own.)
    let checkouts = w.dir.join("data/checkouts");
    let left: usize = std::fs::read_dir(&checkouts)
        .map(|d| d.flatten().map(|own| std::fs::read_dir(own.path()).map(|c| c.count()).unwrap_or(0)).sum())
        .unwrap_or(0);
    assert_eq!(left, 0, "checkout removed");
    // The seed's own spellings still work.
    let listing = w.gp_ok(&["message", "-id", &id]);
    assert!(listing.contains("succeeded") && listing.contains("test_name"), "{listing}");
}

/// The seed's `model_dir`: what a run saves in its working directory is
/// kept in its output directory, with what it wrote there itself; its
/// `GPUPOOL_RESULT` lines and result file are the record's `result`.
fn a_run_keeps_its_model_and_reports_results(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let seed = r#"{"branch": "develop", "train_path": "./ai_folder/train.py", "model_dir": "test_model_dir"}"#;
    std::fs::write(w.dir.join("message.json"), seed).unwrap();
    let out = w.gp_ok(&["push"]);
    let id = out.trim().strip_prefix("pushed 1 job(s): ").expect("the push summary").to_owned();
    w.burst(&[]);
    let job = w.job(&id);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"val_acc": 0.91, "loss": 0.2, "epochs": 1}));
    let outputs = w.dir.join("data/outputs");
    let queue_dir = std::fs::read_dir(&outputs).unwrap().next().unwrap().unwrap().path();
    let attempt = queue_dir.join(format!("job-{id}/attempt-1"));
    assert_eq!(std::fs::read(attempt.join("test_model_dir/best.pth")).unwrap().len(), 7000, "the model is kept");
    assert!(attempt.join("métriques 1.csv").is_file(), "what it wrote to GPUPOOL_OUTPUT_DIR is kept");
    let log = w.gp_ok(&["logs", &id]);
    assert!(log.contains("kept 2 file(s)"), "{log}");
    // Another host reads the shipped log, which ends with the same line.
    let elsewhere = tempfile::tempdir().unwrap();
    let shipped = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["--queue", &w.url, "--data-dir", elsewhere.path().to_str().unwrap(), "logs", &id])
        .output()
        .unwrap();
    let shipped = String::from_utf8_lossy(&shipped.stdout);
    assert!(shipped.contains("GPUPOOL_RESULT") && shipped.contains("kept 2 file(s)"), "{shipped}");
    // A link the run made to outside its checkout is kept as a link, never
    // followed: the file it names is not among the outputs.
    assert!(attempt.join("escape").symlink_metadata().unwrap().file_type().is_symlink());
    assert!(log.contains("escape is a symlink (to /etc/passwd): kept as a link, never followed"), "{log}");
    assert!(log.contains("a GPUPOOL_RESULT line ignored: not JSON"), "{log}");
    let errors = w.errors(&id);
    assert!(errors.is_empty(), "a bad result line fails nothing: {errors:?}");
    // The bar redrawn 300 times is one line in the tail.
    let tail = w.gp_ok(&["jobs", "--id", &id]);
    assert!(tail.contains("VAL_ACC") && tail.contains("0.91"), "{tail}");
    let listed = w.json(&["jobs", "--sort", "-val_acc"]);
    assert_eq!(listed[0]["result"]["val_acc"], 0.91);
    // The record says where the files are: on this worker's disk (no store).
    let kept = &listed[0]["artifacts"];
    assert_eq!((kept["attempt"].as_u64(), kept["stored"].as_bool()), (Some(1), Some(false)), "{kept}");
    assert!(kept["location"].as_str().unwrap().ends_with(&format!("/job-{id}/attempt-1")), "{kept}");
    let files: Vec<(String, u64)> = kept["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_owned(), f["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(files, [("métriques 1.csv".to_owned(), 17), ("test_model_dir/best.pth".to_owned(), 7000)]);
    assert_eq!(w.json(&["artifacts", &id]), *kept, "gpupool artifacts --json is the record's");
    let table = w.gp_ok(&["artifacts", &id]);
    assert!(table.contains("2 file(s), 6.9 KiB, on the worker's disk") && table.contains("test_model_dir/best.pth"));
    // `pull` on the host that holds them copies them.
    w.gp_ok(&["pull", &id]);
    let pulled = w.dir.join("runs").join(&id);
    assert_eq!(std::fs::read(pulled.join("test_model_dir/best.pth")).unwrap(), b"weights".repeat(1000));
    assert!(attempt.join("test_model_dir/best.pth").is_file(), "pulling from the worker's disk leaves them there");
}

/// `--artifacts`: the run's files go to the store once it ended, the record
/// says where, the local copy goes (unless `--keep-outputs`), and `pull`
/// fetches them on any host. A store that cannot take them loses nothing:
/// the job's result stands and the record says where the files stayed.
fn artifacts_go_to_the_store_and_pull_fetches_them(w: &World, store: &str, other_host_store: Option<&str>) {
    // The original tool's message.json, with its relative model_dir.
    let seed = r#"{"branch": "develop", "train_path": "./ai_folder/train.py", "model_dir": "m"}"#;
    std::fs::write(w.dir.join("message.json"), seed).unwrap();
    let push_seed = || {
        let out = w.gp_ok(&["push"]);
        vec![out.trim().strip_prefix("pushed 1 job(s): ").expect("the push summary").to_owned()]
    };
    let ids = push_seed();
    w.burst(&["--artifacts", store]);
    let record = w.job(&ids[0]);
    assert_eq!(record["state"], "succeeded", "{record}");
    let kept = &record["artifacts"];
    assert_eq!(kept["stored"], true, "{kept}");
    let base = store.split('?').next().unwrap().trim_end_matches('/');
    let location = kept["location"].as_str().unwrap();
    assert!(location.starts_with(base) && location.contains(&format!("/job-{}/attempt-1-", ids[0])), "{location}");
    assert!(!location.contains('?'), "the store's options (secrets) are never recorded: {location}");
    let local = w.dir.join("data/outputs");
    let attempt =
        std::fs::read_dir(&local).unwrap().next().unwrap().unwrap().path().join(format!("job-{}/attempt-1", ids[0]));
    assert!(!attempt.join("m/best.pth").exists(), "the local copy goes once the upload is verified");
    assert!(!attempt.join("m").exists(), "and the folders it leaves empty");
    assert!(attempt.join("escape").symlink_metadata().is_ok(), "what was not uploaded (a symlink) stays");
    let log = w.gp_ok(&["logs", &ids[0]]);
    assert!(log.contains(&format!("uploaded 2 file(s), 6.9 KiB, to {location}")), "{log}");

    // Another host: another working directory and data directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut pull = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    pull.args(["--queue", &w.url, "--data-dir", elsewhere.path().join("data").to_str().unwrap(), "pull", &ids[0]])
        .current_dir(elsewhere.path())
        .env_remove("GPUPOOL_ARTIFACTS");
    if let Some(url) = other_host_store {
        pull.args(["--artifacts", url]);
    }
    let out = pull.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pulled 2 file(s), 6.9 KiB"));
    let pulled = elsewhere.path().join("runs").join(&ids[0]);
    assert_eq!(std::fs::read(pulled.join("m/best.pth")).unwrap(), b"weights".repeat(1000));
    assert_eq!(std::fs::read_to_string(pulled.join("métriques 1.csv")).unwrap(), "epoch,acc\n1,0.91\n");

    // --keep-outputs: uploaded, and kept here too.
    let ids = push_seed();
    w.burst(&["--artifacts", store, "--keep-outputs"]);
    assert_eq!(w.job(&ids[0])["artifacts"]["stored"], true);
    let attempt = attempt.parent().unwrap().parent().unwrap().join(format!("job-{}/attempt-1", ids[0]));
    assert!(attempt.join("m/best.pth").is_file(), "--keep-outputs keeps the local copy");
}

/// A store that cannot take the files: the job still succeeded, nothing is
/// lost, and the record and the log say where the files are and why.
fn a_store_that_fails_loses_nothing(w: &World, store: &str) {
    let ids = w.push(&json!([{"git_ref": "develop", "entrypoint": "ai_folder/train.py", "args": {"model_dir": "m"}}]));
    let stderr = w.burst(&["--artifacts", store]);
    let record = w.job(&ids[0]);
    assert_eq!(record["state"], "succeeded", "the run's result stands: {record}");
    let kept = &record["artifacts"];
    assert_eq!(kept["stored"], false, "{kept}");
    let error = kept["error"].as_str().unwrap();
    let base = store.split('?').next().unwrap();
    assert!(error.starts_with(&format!("upload to {base} failed: ")), "{error}");
    assert!(error.contains("the files stay at"), "{error}");
    assert!(!error.contains("hush") && !stderr.contains("hush"), "no secret is shown: {error}");
    let location = kept["location"].as_str().unwrap();
    let (_, path) = location.split_once(':').unwrap();
    assert!(Path::new(path).join("m/best.pth").is_file(), "the files stay where the record says");
    assert!(w.gp_ok(&["logs", &ids[0]]).contains(&format!("upload to {base} failed")));
    // And pull, on this host, takes them from there.
    w.gp_ok(&["pull", &ids[0], "back"]);
    assert!(w.dir.join("back/m/best.pth").is_file());
}

fn artifacts_in_a_folder_store(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let store = format!("file://{}/store", w.dir.display());
    artifacts_go_to_the_store_and_pull_fetches_them(&w, &store, None);
    a_store_that_fails_loses_nothing(&w, "file:///dev/null/store");
    // A store URL that is not one: the worker refuses to start, naming it.
    let out = w.command(&["worker", "--burst", "--artifacts", "ftp://host/x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme `ftp`"));
}

fn a_pinned_commit_runs_at_that_commit(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!([
        {"git_ref": w.first, "entrypoint": "ai_folder/train.py"},
        {"git_ref": &w.first[..8], "entrypoint": "ai_folder/train.py"},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py"},
    ]));
    w.burst(&[]);
    assert_eq!(w.run_record(&ids[0], 1)["version"], 1);
    assert_eq!(w.run_record(&ids[1], 1)["version"], 1, "an abbreviated sha works too");
    assert_eq!(w.run_record(&ids[2], 1)["version"], 2);
    assert_eq!(w.job(&ids[0])["commit"], w.first.as_str());
    assert_eq!(w.job(&ids[1])["commit"], w.first.as_str());
}

fn exit_status_decides_failure_not_stderr(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!([
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "args": {"exit": 3}, "max_attempts": 1},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "args": {"warn": true}},
    ]));
    w.burst(&[]);
    let failed = w.job(&ids[0]);
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["exit_code"], 3);
    let errors = w.errors(&ids[0]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["exit_code"], 3);
    assert_eq!(errors[0]["kind"], "exit");
    let tail = errors[0]["output_tail"].as_str().unwrap();
    assert!(tail.contains("Traceback") && tail.contains("ValueError: boom at epoch 1"), "{tail}");
    let table = w.gp_ok(&["errors", "--id", &ids[0]]);
    assert!(table.contains("ValueError: boom") && table.contains("exit"), "{table}");
    assert_eq!(w.gp_ok(&["error", "-id", &ids[0]]), table, "the seed's `error -id` is the same command");

    let warned = w.job(&ids[1]);
    assert_eq!(warned["state"], "succeeded", "stderr output is not a failure");
    assert!(w.errors(&ids[1]).is_empty());
    let logs = w.gp_ok(&["logs", &ids[1]]);
    assert!(logs.contains("UserWarning") && logs.contains("epoch 1 loss"), "{logs}");
}

fn a_killed_worker_takes_its_job_along_and_the_job_runs_again(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!({"git_ref": "develop", "entrypoint": "ai_folder/train.py", "args": {"sleep-first": 60}}));
    let worker = w.worker(&["--lease", "3s", "--heartbeat", "1s"]);
    let run = w.wait_for_run(&ids[0], 1);
    let pid = run["pid"].as_i64().unwrap();
    assert!(alive(pid));
    signal(&worker, nix::sys::signal::Signal::SIGKILL);
    let _ = wait_output(worker, Duration::from_secs(10));
    wait_until(Duration::from_secs(5), || !alive(pid));

    // The lease (3 s) runs out; a second worker takes the job.
    std::thread::sleep(Duration::from_millis(3500));
    w.burst(&["--lease", "3s", "--heartbeat", "1s"]);
    let job = w.job(&ids[0]);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempt"], 2);
    let errors = w.errors(&ids[0]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["kind"], "lease_lost");
    assert_eq!(errors[0]["attempt"], 1);
}

fn a_second_signal_stops_a_draining_worker_at_once(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!({"git_ref": "develop", "entrypoint": "ai_folder/train.py",
                             "args": {"spawn-child": true, "sleep": 120}}));
    // The default drain (10 minutes) would wait for the run.
    let worker = w.worker(&["--heartbeat", "1s"]);
    let run = w.wait_for_run(&ids[0], 1);
    let (pid, child) = (run["pid"].as_i64().unwrap(), run["child_pid"].as_i64().unwrap());
    signal(&worker, nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(pid), "the first signal drains: the run goes on");
    signal(&worker, nix::sys::signal::Signal::SIGINT);
    let out = wait_output(worker, Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(Duration::from_secs(5), || !alive(pid) && !alive(child));
    let job = w.job(&ids[0]);
    assert_eq!((job["state"].as_str(), job["attempt"].as_i64()), (Some("queued"), Some(0)), "released, not charged");
    assert!(w.errors(&ids[0]).is_empty(), "a stop is not the job's failure");
}

fn cancel_kills_the_process_tree(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!({"git_ref": "develop", "entrypoint": "ai_folder/train.py",
                             "args": {"spawn-child": true, "sleep": 120}}));
    let worker = w.worker(&["--heartbeat", "1s", "--drain-timeout", "1s"]);
    let run = w.wait_for_run(&ids[0], 1);
    let (pid, child) = (run["pid"].as_i64().unwrap(), run["child_pid"].as_i64().unwrap());
    assert!(alive(pid) && alive(child));
    let out = w.gp_ok(&["cancel", &ids[0]]);
    assert!(out.contains("cancel requested"), "{out}");
    wait_until(Duration::from_secs(20), || w.job(&ids[0])["state"] == "cancelled");
    wait_until(Duration::from_secs(5), || !alive(pid) && !alive(child));
    assert!(w.errors(&ids[0]).is_empty(), "a cancel is not an error");
    assert!(w.gp_ok(&["cancel", &ids[0]]).contains("already cancelled"));

    // Retry puts it back and the worker runs it again ...
    let retried = w.gp_ok(&["retry", &ids[0]]);
    assert!(retried.contains("queued again"), "{retried}");
    let again = w.wait_for_run(&ids[0], 2);
    // ... until SIGTERM: past the drain timeout (1 s) the worker stops the
    // run and gives the job back without charging the attempt.
    signal(&worker, nix::sys::signal::Signal::SIGTERM);
    let out = wait_output(worker, Duration::from_secs(30));
    assert!(out.status.success(), "worker exits cleanly on SIGTERM");
    let job = w.job(&ids[0]);
    assert_eq!((job["state"].as_str(), job["attempt"].as_i64()), (Some("queued"), Some(1)), "released, not charged");
    wait_until(Duration::from_secs(5), || !alive(again["pid"].as_i64().unwrap()));
}

fn gpu_slots_give_each_gpu_to_one_job(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids = w.push(&json!([
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "gpus": 1, "args": {"sleep": 2}},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "gpus": 1, "args": {"sleep": 2}},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "gpus": 0},
    ]));
    let mut child = w.command(&["worker", "--repo", w.repo.to_str().unwrap(), "--gpus", "0,1", "--burst"]);
    let out =
        wait_output(child.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = w.run_record(&ids[0], 1);
    let b = w.run_record(&ids[1], 1);
    let mut devices = [a["cuda"].as_str().unwrap().to_owned(), b["cuda"].as_str().unwrap().to_owned()];
    devices.sort();
    assert_eq!(devices, ["0", "1"], "never the same GPU");
    let end = |id: &str| -> f64 {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(w.out.join(format!("run-{id}-1.json.end"))).unwrap())
                .unwrap();
        v["end"].as_f64().unwrap()
    };
    let (sa, sb) = (a["start"].as_f64().unwrap(), b["start"].as_f64().unwrap());
    assert!(sa < end(&ids[1]) && sb < end(&ids[0]), "the two runs overlapped in time");
    assert_eq!(w.run_record(&ids[2], 1)["cuda"], "", "gpus: 0 runs on the CPU");
    assert_eq!(w.job(&ids[0])["gpu_ids"].as_array().unwrap().len(), 1);
}

fn bad_input_fails_clearly_and_the_worker_keeps_going(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let other = w.dir.join("other-repo");
    git2::Repository::init(&other).unwrap();
    std::fs::write(
        w.dir.join("gpupool.toml"),
        "allowed_repos = [\"https://127.0.0.1:9/team/model.git\"]\n[worker]\nlease = \"30s\"\n",
    )
    .unwrap();
    let ids = w.push(&json!([
        {"git_ref": "no-such-branch", "entrypoint": "ai_folder/train.py"},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py",
         "args": {"x": "; rm -rf ~", "y": "$(touch pwned) `id`", "z": "it's \"quoted\"", "n": 7}},
        {"git_ref": "main", "entrypoint": "train.py", "repo": other.to_str().unwrap()},
        {"git_ref": "develop", "entrypoint": "ai_folder/missing.py"},
    ]));
    let mut cmd = w.command(&["worker", "--repo", w.repo.to_str().unwrap(), "--gpus", "none", "--burst"]);
    cmd.env("GPUPOOL_GIT_TOKEN", "tok-SECRET-12345");
    let out = wait_output(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");

    let unknown = w.errors(&ids[0]);
    assert_eq!(w.job(&ids[0])["state"], "failed");
    assert_eq!(unknown.len(), 1, "a bad ref is not retried");
    assert_eq!(unknown[0]["kind"], "ref");
    let msg = unknown[0]["message"].as_str().unwrap();
    assert!(msg.contains("ref `no-such-branch` not found in"), "{msg}");

    assert_eq!(w.job(&ids[1])["state"], "succeeded", "the worker kept going");
    let run = w.run_record(&ids[1], 1);
    assert_eq!(
        strings(&run["argv"]),
        ["--x", "; rm -rf ~", "--y", "$(touch pwned) `id`", "--z", "it's \"quoted\"", "--n", "7"]
    );
    assert!(!w.dir.join("pwned").exists() && !Path::new(run["cwd"].as_str().unwrap()).join("pwned").exists());
    assert_eq!(run["token"], Value::Null, "the worker's token never reaches a job");

    let refused = w.errors(&ids[2]);
    assert_eq!(refused[0]["kind"], "repo");
    assert!(refused[0]["message"].as_str().unwrap().contains("not allowed"), "{}", refused[0]["message"]);
    let mirrors: Vec<String> = std::fs::read_dir(w.dir.join("data/repos"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!mirrors.iter().any(|m| m.starts_with("other-repo")), "nothing fetched for a refused repo: {mirrors:?}");

    let missing = w.errors(&ids[3]);
    assert!(missing[0]["message"].as_str().unwrap().contains("does not exist"), "{}", missing[0]["message"]);

    // A git host this worker cannot reach is this worker's fault, not the
    // job's: the job goes back uncharged, and a burst worker stops saying why.
    let far =
        w.push(&json!([{"git_ref": "main", "entrypoint": "train.py", "repo": "https://127.0.0.1:9/team/model.git"}]));
    let mut cmd = w.command(&["worker", "--repo", w.repo.to_str().unwrap(), "--gpus", "none", "--burst"]);
    cmd.env("GPUPOOL_GIT_TOKEN", "tok-SECRET-12345");
    let out = wait_output(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
    let unhealthy = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{unhealthy}");
    assert!(unhealthy.contains("worker unhealthy: cannot fetch https://127.0.0.1:9/team/model.git"), "{unhealthy}");
    assert_eq!((w.job(&far[0])["state"].as_str(), w.job(&far[0])["attempt"].as_u64()), (Some("queued"), Some(0)));
    assert!(w.errors(&far[0]).is_empty(), "no attempt charged");

    let everything = format!("{stderr}{unhealthy}{}{}", w.gp_ok(&["errors", "--json"]), w.gp_ok(&["jobs", "--json"]));
    assert!(!everything.contains("tok-SECRET"), "a token was printed");
}

fn bad_jobs_are_refused_at_push_and_nothing_is_pushed(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let file = w.dir.join("bad.json");
    std::fs::write(
        &file,
        r#"[{"git_ref": "develop", "entrypoint": "ai_folder/train.py"},
            {"git_ref": "develop", "entrypoint": "ai_folder/train.py", "env": {"LD_PRELOAD": "/tmp/x.so"}}]"#,
    )
    .unwrap();
    let out = w.gp(&["push", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("LD_PRELOAD") && stderr.contains("job 2 of 2"), "{stderr}");
    std::fs::write(&file, "{\n  \"branch\": \"develop\"\n  \"train_path\": \"x.py\"\n}").unwrap();
    let out = w.gp(&["push", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("line 3, column 3"), "{stderr}");
    std::fs::write(&file, r#"{"git_ref": "main", "entrypoint": "../../etc/passwd"}"#).unwrap();
    let out = w.gp(&["push", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaves the repository"));
    assert_eq!(w.json(&["jobs"]), json!([]), "nothing was pushed");
}

fn the_setup_step_runs_when_its_inputs_change_and_its_failure_fails_the_job(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let repo = git2::Repository::open(&w.repo).unwrap();
    let second = repo.find_commit(git2::Oid::from_str(&w.second).unwrap()).unwrap();
    commit_files(&repo, &[("requirements.txt", "numpy\nno-such-package\n".to_owned())], "broken-reqs", Some(&second));
    let ids = w.push(&json!([
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py"},
        {"git_ref": "develop", "entrypoint": "ai_folder/train.py"},
        {"git_ref": "broken-reqs", "entrypoint": "ai_folder/train.py"},
    ]));
    w.burst(&["--setup", "python3 setup_step.py"]);
    assert_eq!(w.job(&ids[0])["state"], "succeeded");
    assert_eq!(w.job(&ids[1])["state"], "succeeded");
    let setup_runs = std::fs::read_to_string(w.out.join("setup.log")).unwrap();
    assert_eq!(
        setup_runs.lines().count(),
        2,
        "skipped for the second job (inputs unchanged), run again when they changed: {setup_runs}"
    );
    let broken = w.job(&ids[2]);
    assert_eq!(broken["state"], "failed", "a failing setup is not retried");
    assert_eq!(broken["attempt"], 1);
    let errors = w.errors(&ids[2]);
    assert_eq!(errors[0]["kind"], "setup");
    let msg = errors[0]["message"].as_str().unwrap();
    assert!(msg.contains("setup step") && msg.contains("python3 setup_step.py"), "{msg}");
    assert!(errors[0]["output_tail"].as_str().unwrap().contains("no-such-package"));
    assert!(!w.out.join(format!("run-{}-1.json", ids[2])).exists(), "the job did not start");
    let log = w.gp_ok(&["logs", &ids[0]]);
    assert!(log.contains("setup: python3 setup_step.py") && log.contains("run: python3 ai_folder/train.py"), "{log}");
    let log = w.gp_ok(&["logs", &ids[1]]);
    assert!(log.contains("and requirements.txt are unchanged since its last success"), "{log}");
}

/// `gpupool logs -f` on another host (another data directory) follows a
/// running job to its end: every line once, in order, then exit 0. SQLite
/// MySQL and Redis keep shipped logs; RabbitMQ does not yet.
fn logs_follow_from_another_host_follows_a_running_job_to_its_end(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let ids =
        w.push(&json!([{"git_ref": "master", "entrypoint": "ai_folder/train.py", "args": {"warn": true, "sleep": 3}}]));
    let mut worker = w.worker(&["--heartbeat", "1s", "--lease", "10s"]);
    let other_host = w.dir.join("other-host");
    let follow = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["--queue", &w.url, "--data-dir", other_host.to_str().unwrap(), "logs", "-f", &ids[0]])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(follow, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let header = text.find(&format!("== gpupool: job {} attempt 1 on", ids[0])).expect(&text);
    let run = text.find("== gpupool: run: python3 ai_folder/train.py").expect(&text);
    let line = text.find("epoch 1 loss 0.5").expect(&text);
    assert!(header < run && run < line, "in order: {text}");
    assert_eq!(text.matches("epoch 1 loss 0.5").count(), 1, "once: {text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("succeeded"));
    // Plain `logs` on the other host reads the shipped log too.
    let shipped = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["--queue", &w.url, "--data-dir", other_host.to_str().unwrap(), "logs", &ids[0]])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&shipped.stdout).contains("epoch 1 loss 0.5"));
    // A job that fails: exit 1, with its traceback shipped.
    let failing = w.push(&json!([{"git_ref": "master", "entrypoint": "ai_folder/train.py",
                                  "args": {"exit": 3}, "max_attempts": 1}]));
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["--queue", &w.url, "--data-dir", other_host.to_str().unwrap(), "logs", "--follow", &failing[0]])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ValueError: boom at epoch 1"));
    signal(&worker, nix::sys::signal::Signal::SIGTERM);
    worker.wait().unwrap();
}

/// `gpupool sweep`: a 2 × 3 grid runs every point exactly once and is
/// ranked by its metric; pushing it again adds nothing; a random sweep
/// with `run_cap: 5` draws 5 points within their bounds; `gpupool sweeps`
/// shows the progress and the best run; a bad file is refused naming the
/// field, and pushes nothing.
fn a_sweep_runs_every_point_once_ranked_by_its_metric(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let grid = "method: grid\nprogram: ai_folder/train.py\ngit_ref: master\nname: lr-bs\n\
                metric: {name: score, goal: maximize}\n\
                parameters:\n  lr: {values: [0.1, 0.01]}\n  bs: {values: [16, 32, 64]}\n";
    std::fs::write(w.dir.join("grid.yaml"), grid).unwrap();
    let pushed = w.json(&["sweep", "grid.yaml"]);
    let sweep = pushed["sweep"].as_str().unwrap().to_owned();
    let jobs = strings(&pushed["jobs"]);
    assert_eq!(jobs.len(), 6);
    assert_eq!(w.json(&["sweep", "grid.yaml"]), pushed, "pushing it again adds nothing");
    w.burst(&[]);
    let opt = |argv: &Value, name: &str| {
        let argv = strings(argv);
        argv[argv.iter().position(|a| a == name).unwrap() + 1].clone()
    };
    let mut points: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            let argv = &w.run_record(j, 1)["argv"];
            (opt(argv, "--lr"), opt(argv, "--bs"))
        })
        .collect();
    points.sort();
    let want: Vec<(String, String)> = ["0.01", "0.1"]
        .iter()
        .flat_map(|lr| ["16", "32", "64"].iter().map(move |bs| ((*lr).to_owned(), (*bs).to_owned())))
        .collect();
    assert_eq!(points, want, "every point once");
    let runs = std::fs::read_dir(&w.out).unwrap().filter(|e| {
        let name = e.as_ref().unwrap().file_name().into_string().unwrap();
        name.starts_with("run-") && name.ends_with(".json")
    });
    assert_eq!(runs.count(), 6, "no point ran twice");
    let ranked = w.json(&["jobs", "--sweep", &sweep]);
    let scores: Vec<f64> = ranked.as_array().unwrap().iter().map(|j| j["result"]["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|p| p[0] >= p[1]), "best first: {scores:?}");
    assert!((scores[0] - 6.4).abs() < 1e-9, "{scores:?}");
    let table = w.gp_ok(&["jobs", "--sweep", &sweep]);
    assert!(table.contains("lr=0.1 bs=64") && table.contains("ranked by score (highest first)"), "{table}");
    let sweeps = w.json(&["sweeps"]);
    let listed = sweeps.as_array().unwrap().iter().find(|s| s["sweep"] == sweep.as_str()).unwrap();
    assert_eq!((listed["runs"].as_u64(), listed["succeeded"].as_u64()), (Some(6), Some(6)), "{listed}");
    assert_eq!(listed["best"]["job"], ranked[0]["id"], "{listed}");
    assert!(w.gp_ok(&["sweeps"]).contains("score=6.4"));

    let random = json!({"method": "random", "program": "ai_folder/train.py", "git_ref": "master", "run_cap": 5,
        "parameters": {"lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
                       "bs": {"distribution": "int_uniform", "min": 8, "max": 12}}});
    std::fs::write(w.dir.join("random.json"), random.to_string()).unwrap();
    let dry = w.json(&["sweep", "random.json", "--dry-run"]);
    assert_eq!(dry["jobs"].as_array().unwrap().len(), 5);
    let ids = strings(&w.json(&["sweep", "random.json"])["jobs"]);
    assert_eq!(ids.len(), 5);
    w.burst(&[]);
    for id in &ids {
        let argv = &w.run_record(id, 1)["argv"];
        let lr: f64 = opt(argv, "--lr").parse().unwrap();
        let bs: i64 = opt(argv, "--bs").parse().unwrap();
        assert!((0.001..=0.1).contains(&lr) && (8..=12).contains(&bs), "{argv}");
    }

    std::fs::write(w.dir.join("bad.yaml"), grid.replace("values: [0.1, 0.01]", "distribution: normal")).unwrap();
    let bad = w.gp(&["sweep", "bad.yaml"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("parameters.lr.distribution"), "{stderr}");
    assert_eq!(w.json(&["jobs"]).as_array().unwrap().len(), 11, "nothing more was pushed");
}

/// A job's `retry` policy: a run that ran out of GPU memory is run again,
/// while one with a Python error is not.
fn an_oom_run_is_retried_and_a_python_error_is_not(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let policy = json!({"on": ["oom"], "max": 1});
    let ids = w.push(&json!([
        {"git_ref": "master", "entrypoint": "ai_folder/train.py", "args": {"oom-first": true}, "retry": policy},
        {"git_ref": "master", "entrypoint": "ai_folder/train.py", "args": {"exit": 3}, "retry": policy}
    ]));
    w.burst(&[]);
    let oom = w.job(&ids[0]);
    assert_eq!((oom["state"].as_str(), oom["attempt"].as_u64()), (Some("succeeded"), Some(2)), "{oom}");
    let errors = w.errors(&ids[0]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["kind"], "oom", "{errors:?}");
    let python = w.job(&ids[1]);
    assert_eq!((python["state"].as_str(), python["attempt"].as_u64()), (Some("failed"), Some(1)), "{python}");
    assert_eq!(w.errors(&ids[1])[0]["kind"], "exit");
    assert!(!w.out.join(format!("run-{}-2.json", ids[1])).exists(), "not run again");
}

/// `after` and `not_before` through the CLI with a real worker. A job
/// after another waits while it runs, without holding one of the worker's
/// two slots (a third job runs meanwhile), and runs once it succeeded; a
/// job after a failing one is cancelled and its log says why; with
/// `after_any` it runs anyway; a job pushed for later starts no earlier.
/// `after` naming a job that does not exist, or a `not_before` that is not
/// a time, is refused at push, naming the field.
fn a_dependent_job_waits_for_its_parent_and_is_cancelled_when_it_fails(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let refused = |job: Value, words: &[&str]| {
        let file = w.dir.join("refused.json");
        std::fs::write(&file, job.to_string()).unwrap();
        let out = w.gp(&["push", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && words.iter().all(|word| stderr.contains(word)), "{stderr}");
    };
    let train = |extra: Value| {
        let mut job = json!({"git_ref": "master", "entrypoint": "ai_folder/train.py"});
        job.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        job
    };
    refused(train(json!({"after": ["999999"]})), &["after", "999999", "does not exist"]);
    refused(train(json!({"not_before": "tomorrow"})), &["not_before", "tomorrow"]);
    assert_eq!(w.json(&["jobs"]), json!([]), "nothing was pushed");

    let parent = w.push(&json!([train(json!({"args": {"sleep": 4}}))]))[0].clone();
    let child = w.push(&json!([train(json!({"after": [parent]}))]))[0].clone();
    let failing = w.push(&json!([train(json!({"args": {"exit": 3}}))]))[0].clone();
    let start = gpupool_core::Timestamp::now().plus(Duration::from_secs(6));
    let ids = w.push(&json!([
        train(json!({"after": [failing]})),
        train(json!({"after": [parent, failing], "after_any": true})),
        train(json!({"not_before": start.to_rfc3339()})),
    ]));
    let (orphan, lenient, later) = (&ids[0], &ids[1], &ids[2]);
    let queued = w.gp_ok(&["jobs"]);
    assert!(queued.contains(&format!("queued after {parent}")) && queued.contains("queued until"), "{queued}");
    let mut worker = w.worker(&["--slots", "2"]);
    let all = [&parent, &child, &failing, orphan, lenient, later];
    wait_until(Duration::from_secs(60), || {
        all.iter().all(|id| matches!(w.job(id)["state"].as_str(), Some("succeeded" | "failed" | "cancelled")))
    });
    let _ = worker.kill();
    let _ = worker.wait();
    let state = |id: &str| w.job(id)["state"].as_str().unwrap().to_owned();
    assert_eq!(
        [&parent, &child, &failing, orphan, lenient, later].map(|id| state(id)),
        ["succeeded", "succeeded", "failed", "cancelled", "succeeded", "succeeded"]
    );
    let ended = |id: &str| -> f64 {
        let end: Value =
            serde_json::from_str(&std::fs::read_to_string(w.out.join(format!("run-{id}-1.json.end"))).unwrap())
                .unwrap();
        end["end"].as_f64().unwrap()
    };
    let began = |id: &str| w.run_record(id, 1)["start"].as_f64().unwrap();
    assert!(began(&child) >= ended(&parent), "the child ran after its parent ended");
    assert!(began(lenient) >= ended(&parent), "after_any waits for every job to end");
    assert!(began(&failing) < ended(&parent), "the waiting child held no slot: the next job ran meanwhile");
    assert!(began(later) * 1000.0 >= start.0 as f64, "not before its start");
    assert_eq!(w.job(&child)["attempt"], 1, "waiting charged no attempt");
    assert!(!w.out.join(format!("run-{orphan}-1.json")).exists(), "the orphan never ran");
    let why = w.gp_ok(&["logs", orphan]);
    assert!(why.contains(&format!("job {failing}")) && why.contains("ended failed"), "{why}");
}

/// `push --snapshot` in a clone of the worker's repository runs the code
/// as it is in that working tree: an unpushed commit, a staged and an
/// unstaged change, a new untracked module and a binary file, a deleted
/// file, and not an ignored one. The job records its base commit and the
/// snapshot's hash; the working tree is left as it was. Outside a git
/// tree, `--snapshot` is refused.
fn a_snapshot_runs_the_edited_code(backend: Backend) {
    let Some(w) = World::new(backend) else { return };
    let outside = w.command(&["push", "--snapshot"]).current_dir(w.out.as_path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&outside.stderr);
    assert!(!outside.status.success() && stderr.contains("snapshot outside a git tree"), "{stderr}");

    let work = w.dir.join("work");
    let clone = git2::Repository::clone(w.repo.to_str().unwrap(), &work).unwrap();
    let head = clone.head().unwrap().peel_to_commit().unwrap();
    commit_files(&clone, &[("ai_folder/lib_a.py", "A = 'committed, not pushed'\n".to_owned())], "master", Some(&head));
    let write = |path: &str, bytes: &[u8]| std::fs::write(work.join(path), bytes).unwrap();
    write("requirements.txt", b"torch\n");
    let mut index = clone.index().unwrap();
    index.add_path(Path::new("requirements.txt")).unwrap();
    index.write().unwrap();
    let train = std::fs::read_to_string(work.join("ai_folder/train.py")).unwrap();
    write("ai_folder/train.py", train.replace("VERSION = 1\n", "VERSION = 99\n").as_bytes());
    write("ai_folder/lib_b.py", b"B = 'untracked'\n");
    write("ai_folder/blob.bin", &[0, 1, 2, 255, 0, 10]);
    write(".gitignore", b"*.log\n");
    write("secret.log", b"not for the queue");
    std::fs::remove_file(work.join("setup_step.py")).unwrap();
    write(
        "ai_folder/snap.py",
        br#"import json, os
from lib_a import A
from lib_b import B
rec = {"A": A, "B": B, "req": open("requirements.txt").read(), "blob": open("ai_folder/blob.bin", "rb").read().hex(),
       "setup_step": os.path.exists("setup_step.py"), "log": os.path.exists("secret.log")}
with open(os.path.join(os.environ["E2E_OUT"], "snap-%s.json" % os.environ["GPUPOOL_JOB_ID"]), "w") as f:
    json.dump(rec, f)
"#,
    );
    let status = |repo: &git2::Repository| {
        let mut opts = git2::StatusOptions::new();
        opts.include_untracked(true);
        let statuses = repo.statuses(Some(&mut opts)).unwrap();
        statuses.iter().map(|e| (e.path().unwrap().to_owned(), e.status().bits())).collect::<Vec<_>>()
    };
    let jobs = json!([
        {"git_ref": "master", "entrypoint": "ai_folder/snap.py"},
        {"git_ref": "master", "entrypoint": "ai_folder/train.py"}
    ]);
    std::fs::write(work.join("jobs.json"), jobs.to_string()).unwrap();
    let before = (status(&clone), clone.head().unwrap().target());
    let big =
        w.command(&["push", "--snapshot", "--snapshot-limit", "0", "jobs.json"]).current_dir(&work).output().unwrap();
    let stderr = String::from_utf8_lossy(&big.stderr);
    assert!(!big.status.success() && stderr.contains("over the 0.0 MiB limit"), "{stderr}");
    assert!(stderr.contains("the biggest files: ai_folder/train.py"), "{stderr}");
    let pushed = w.command(&["push", "--snapshot", "--json", "jobs.json"]).current_dir(&work).output().unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(String::from_utf8_lossy(&pushed.stderr).contains("merge-base of HEAD and origin/master"));
    let ids: Vec<String> = serde_json::from_slice::<Vec<String>>(&pushed.stdout).unwrap();
    w.burst(&[]);
    let job = w.job(&ids[0]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!((job["git_ref"].as_str(), job["commit"].as_str()), (Some(w.first.as_str()), Some(w.first.as_str())));
    assert_eq!(job["snapshot"]["base"], w.first.as_str(), "the record shows the base commit");
    assert_eq!(job["snapshot"]["hash"].as_str().map(str::len), Some(40), "and the snapshot's hash");
    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(w.out.join(format!("snap-{}.json", ids[0]))).unwrap()).unwrap();
    assert_eq!(
        rec,
        json!({"A": "committed, not pushed", "B": "untracked", "req": "torch\n", "blob": "000102ff000a",
               "setup_step": false, "log": false})
    );
    assert_eq!(w.run_record(&ids[1], 1)["version"], 99, "the unstaged edit ran");
    let kept = job["artifacts"]["files"].as_array().cloned().unwrap_or_default();
    assert!(kept.is_empty(), "the snapshot's files are code, not what the run made: {kept:?}");
    assert_eq!((status(&clone), clone.head().unwrap().target()), before, "the working tree is as it was");
    assert!(work.join("secret.log").exists() && !work.join("setup_step.py").exists());
}

/// An S3-compatible test server: `GPUPOOL_TEST_S3_ENDPOINT`, else moto
/// (`pip install 'moto[server]'`) started on a free port; `None` after
/// `skipped: …` (a failure under `GPUPOOL_REQUIRE_BACKENDS=1`).
struct S3Server {
    endpoint: String,
    child: Option<Child>,
}

impl S3Server {
    fn start() -> Option<S3Server> {
        if let Some(endpoint) = std::env::var("GPUPOOL_TEST_S3_ENDPOINT").ok().filter(|e| !e.is_empty()) {
            return Some(S3Server { endpoint, child: None });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let started = child.ok().and_then(|mut child| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(child);
                }
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return None; // moto is not installed
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            None
        });
        match started {
            Some(child) => Some(S3Server { endpoint: format!("http://127.0.0.1:{port}"), child: Some(child) }),
            None => {
                gpupool_core::conformance::service_url(
                    "GPUPOOL_TEST_S3_ENDPOINT",
                    "S3 artifact store test (moto)",
                    || None,
                )?;
                None
            }
        }
    }

    /// Makes `bucket` (an unsigned request, which the test server takes).
    fn make_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let hostport = self.endpoint.trim_start_matches("http://");
        let mut conn = std::net::TcpStream::connect(hostport).unwrap();
        write!(conn, "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "cannot make the bucket: {answer}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `--artifacts s3://…` against a real S3-compatible server: uploaded,
/// recorded without the URL's keys, pulled on another host; an unreachable
/// endpoint retried, then recorded as failed with the files kept.
#[test]
fn artifacts_in_an_s3_store() {
    let Some(s3) = S3Server::start() else { return };
    let Some(w) = World::new(Backend::Sqlite) else { return };
    let bucket = format!("gpupool-{}", gpupool_core::conformance::unique_suffix().to_lowercase());
    s3.make_bucket(&bucket);
    let keys = "access_key_id=test&secret_access_key=hush&region=us-east-1&allow_http=true";
    let store = format!("s3://{bucket}/team/runs?endpoint={}&{keys}", s3.endpoint);
    artifacts_go_to_the_store_and_pull_fetches_them(&w, &store, Some(&store));
    let unreachable = format!("s3://{bucket}/runs?endpoint=http://127.0.0.1:1&{keys}&retry_timeout=1s&max_retries=1");
    a_store_that_fails_loses_nothing(&w, &unreachable);
}

/// A tmpfs mounted for one test (root only), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` on `dir`, or says why not (a
    /// `skipped:` line) and returns `None`.
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "skipped: a tmpfs store ({options}): mount failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: a tmpfs store ({options}): cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A store on a read-only filesystem and one on a full disk: the upload
/// fails with the system's reason, the job's result stands, the files stay.
#[test]
fn a_read_only_or_full_store_loses_nothing() {
    let Some(w) = World::new(Backend::Sqlite) else { return };
    if let Some(ro) = Tmpfs::mount(&w.dir.join("ro-store"), "ro,size=1m") {
        a_store_that_fails_loses_nothing(&w, &format!("file://{}", ro.0.display()));
        let error = w.json(&["jobs"])[0]["artifacts"]["error"].as_str().unwrap().to_owned();
        assert!(error.contains("Read-only file system"), "{error}");
    }
    if let Some(full) = Tmpfs::mount(&w.dir.join("full-store"), "size=4k") {
        a_store_that_fails_loses_nothing(&w, &format!("file://{}", full.0.display()));
        let error = w.json(&["jobs"])[0]["artifacts"]["error"].as_str().unwrap().to_owned();
        assert!(error.contains("No space left on device"), "{error}");
    }
}

/// Every backend keeps shipped logs.
mod shipped_logs {
    #[test]
    fn sqlite() {
        super::logs_follow_from_another_host_follows_a_running_job_to_its_end(super::Backend::Sqlite);
    }
    #[test]
    fn mysql() {
        super::logs_follow_from_another_host_follows_a_running_job_to_its_end(super::Backend::Mysql);
    }
    #[test]
    fn redis() {
        super::logs_follow_from_another_host_follows_a_running_job_to_its_end(super::Backend::Redis);
    }
    #[test]
    fn amqp() {
        super::logs_follow_from_another_host_follows_a_running_job_to_its_end(super::Backend::Amqp);
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// Every scenario on the embedded SQLite queue.
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Backend::Sqlite) } )*
        }
        /// Every scenario on MySQL/MariaDB (`GPUPOOL_TEST_MYSQL_URL`).
        mod mysql {
            $( #[test] fn $name() { super::$name(super::Backend::Mysql) } )*
        }
        /// Every scenario on Redis (`GPUPOOL_TEST_REDIS_URL`).
        mod redis {
            $( #[test] fn $name() { super::$name(super::Backend::Redis) } )*
        }
        /// Every scenario on RabbitMQ (`GPUPOOL_TEST_AMQP_URL`).
        mod amqp {
            $( #[test] fn $name() { super::$name(super::Backend::Amqp) } )*
        }
    };
}

scenarios!(
    seed_message_json_runs_at_the_branch_tip,
    a_run_keeps_its_model_and_reports_results,
    artifacts_in_a_folder_store,
    a_pinned_commit_runs_at_that_commit,
    exit_status_decides_failure_not_stderr,
    a_killed_worker_takes_its_job_along_and_the_job_runs_again,
    cancel_kills_the_process_tree,
    a_second_signal_stops_a_draining_worker_at_once,
    gpu_slots_give_each_gpu_to_one_job,
    bad_input_fails_clearly_and_the_worker_keeps_going,
    bad_jobs_are_refused_at_push_and_nothing_is_pushed,
    the_setup_step_runs_when_its_inputs_change_and_its_failure_fails_the_job,
    a_sweep_runs_every_point_once_ranked_by_its_metric,
    an_oom_run_is_retried_and_a_python_error_is_not,
    a_dependent_job_waits_for_its_parent_and_is_cancelled_when_it_fails,
    a_snapshot_runs_the_edited_code,
);
