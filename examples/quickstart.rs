//! The whole loop on the embedded SQLite queue, with nothing to install:
//! a demo repository, a handful of training runs, a worker that runs them,
//! and the job table at the end.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gpupool_core::{JobSpec, ListFilter, Queue};
use gpupool_sqlite::SqliteQueue;
use gpupool_worker::{Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A stdlib-only "training" script: a few epochs of a falling loss.
const TRAIN_PY: &str = r#"import argparse, math, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=0.01)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--width", type=int, default=__WIDTH__)
p.add_argument("--name", default="run")
a = p.parse_args()
if a.lr <= 0:
    raise ValueError(f"learning rate must be positive, got {a.lr}")
print(f"[{a.name}] commit {os.environ.get('GPUPOOL_COMMIT', '?')[:8]} width={a.width} "
      f"gpus={os.environ.get('CUDA_VISIBLE_DEVICES') or 'cpu'}")
loss = 2.0
for epoch in range(1, a.epochs + 1):
    loss *= math.exp(-a.lr * a.width / 16)
    print(f"[{a.name}] epoch {epoch} loss {loss:.4f}")
    time.sleep(0.05)
"#;

fn commit_file(
    repo: &git2::Repository,
    width: u32,
    branch: &str,
    parent: Option<git2::Oid>,
) -> Result<git2::Oid, git2::Error> {
    let workdir = repo.workdir().ok_or_else(|| git2::Error::from_str("bare repository"))?;
    std::fs::write(workdir.join("train.py"), TRAIN_PY.replace("__WIDTH__", &width.to_string()))
        .map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let mut index = repo.index()?;
    index.add_path(Path::new("train.py"))?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    let sig = git2::Signature::now("quickstart", "quickstart@example.com")?;
    let parent = parent.map(|p| repo.find_commit(p)).transpose()?;
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let oid = repo.commit(None, &sig, &sig, &format!("width {width}"), &tree, &parents)?;
    repo.reference(&format!("refs/heads/{branch}"), oid, true, "quickstart")?;
    Ok(oid)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    let root = std::env::temp_dir().join(format!("gpupool-quickstart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;

    // 1. A demo repository: two commits on main, and a branch.
    let repo_dir = root.join("demo-repo");
    let repo = git2::Repository::init(&repo_dir)?;
    let first = commit_file(&repo, 16, "main", None)?;
    let second = commit_file(&repo, 32, "main", Some(first))?;
    commit_file(&repo, 64, "wide-model", Some(second))?;
    repo.set_head("refs/heads/main")?;
    println!(
        "demo repository: {} (main at {}, first commit {})",
        repo_dir.display(),
        &second.to_string()[..8],
        &first.to_string()[..8]
    );

    // 2. The embedded queue: one file, made on first use.
    let queue = Arc::new(SqliteQueue::connect(&format!("sqlite://{}/queue.db", root.display())).await?);

    // 3. A handful of runs: a learning-rate sweep, the branch, an old commit, and one that fails.
    let run = |git_ref: &str, args: serde_json::Value| -> Result<JobSpec, Box<dyn Error>> {
        Ok(gpupool_core::message::parse_job(json!({"git_ref": git_ref, "entrypoint": "train.py", "args": args}))?)
    };
    let mut jobs = Vec::new();
    for lr in [0.1, 0.03, 0.01] {
        jobs.push(run("main", json!({"name": format!("lr-{lr}"), "lr": lr}))?);
    }
    jobs.push(run("wide-model", json!({"name": "wide", "lr": 0.03}))?);
    jobs.push(run(&first.to_string()[..8], json!({"name": "first-commit", "lr": 0.03}))?);
    let mut broken = run("main", json!({"name": "broken", "lr": -1}))?;
    broken.max_attempts = Some(1);
    jobs.push(broken);
    for job in jobs {
        queue.push(job).await?;
    }

    // 4. A worker on this machine (CPU-only here: two runs at a time) until the queue is empty.
    let mut cfg = WorkerConfig::new(root.join("data"));
    cfg.repo = Some(repo_dir.to_string_lossy().into_owned());
    cfg.slots = 2;
    cfg.burst = true;
    Worker::new(queue.clone(), cfg).run(CancellationToken::new()).await?;

    // 5. What happened.
    let all = queue.list(&ListFilter::default()).await?;
    println!("\n{}", gpupool_cli::jobs_table(&all));
    let failed = queue.errors(None, 10).await?;
    println!("{}", gpupool_cli::errors_table(&failed, true));
    println!("done in {:.1} s; the queue and logs are under {}", started.elapsed().as_secs_f64(), root.display());
    Ok(())
}
