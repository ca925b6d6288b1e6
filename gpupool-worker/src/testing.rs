//! Helpers for tests that run a real worker (feature `testing`). Not
//! semver-stable: functions may change in any release.

// Test code: a panic is how a helper fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// A git repository at `dir/repo` whose branch `main` holds one commit
/// with `job.py` = `script`, for tests that run a real worker. Returns the
/// repository's path.
pub fn job_repo(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    let repo_dir = dir.join("repo");
    let repo = git2::Repository::init(&repo_dir).unwrap();
    std::fs::write(repo_dir.join("job.py"), script).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(std::path::Path::new("job.py")).unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    repo.commit(Some("refs/heads/main"), &sig, &sig, "job", &tree, &[]).unwrap();
    repo_dir
}
