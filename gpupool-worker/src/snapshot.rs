//! Snapshots of uncommitted code (`gpupool push --snapshot`): what differs
//! in a git working tree from the newest commit its remote has, taken on
//! the pushing host ([`take`]), stored in the queue by hash, and applied
//! over that commit in the job's checkout ([`apply`]).
//!
//! A snapshot is the files themselves, not a patch: each changed, added or
//! untracked (not ignored) file whole, with its mode, and each deleted
//! path. Applying one cannot fail to match (a patch can), carries binary
//! files as they are, and gives exactly the tree that was pushed from.
//! The bytes ([`Bundle::encode`]):
//!
//! ```text
//! "GPUPOOL-SNAPSHOT 1\n", then per entry:
//!   kind (1 byte: F file, X executable file, L symlink, D deleted)
//!   path length (u32, big-endian), path (UTF-8, '/'-separated, relative)
//!   for F, X, L: data length (u64, big-endian), data (a link's target)
//! ```
//!
//! Its id is git's blob hash of those bytes.

use std::path::{Component, Path};

use git2::{Delta, DiffOptions, Oid, Repository};

const MAGIC: &[u8] = b"GPUPOOL-SNAPSHOT 1\n";

/// The default size limit of `gpupool push --snapshot`.
pub const DEFAULT_LIMIT_BYTES: u64 = 16 << 20;

/// What one path holds in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A file with these bytes; `executable` for mode 755.
    File {
        /// Where, relative to the repository root.
        path: String,
        /// Its bytes.
        data: Vec<u8>,
        /// Mode 755 rather than 644.
        executable: bool,
    },
    /// A symbolic link to `target`.
    Link {
        /// Where.
        path: String,
        /// What it points to.
        target: Vec<u8>,
    },
    /// The path was deleted.
    Deleted {
        /// Where.
        path: String,
    },
}

impl Entry {
    /// The path, relative to the repository root.
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Link { path, .. } | Entry::Deleted { path } => path,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Entry::File { data, .. } => data.len() as u64,
            Entry::Link { target, .. } => target.len() as u64,
            Entry::Deleted { .. } => 0,
        }
    }
}

/// A snapshot: its base commit and its entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    /// The entries, in path order.
    pub entries: Vec<Entry>,
}

impl Bundle {
    /// The bytes stored in the queue.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for e in &self.entries {
            let (kind, data): (u8, Option<&[u8]>) = match e {
                Entry::File { data, executable: false, .. } => (b'F', Some(data)),
                Entry::File { data, executable: true, .. } => (b'X', Some(data)),
                Entry::Link { target, .. } => (b'L', Some(target)),
                Entry::Deleted { .. } => (b'D', None),
            };
            out.push(kind);
            out.extend_from_slice(&u32::try_from(e.path().len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(e.path().as_bytes());
            if let Some(data) = data {
                out.extend_from_slice(&(data.len() as u64).to_be_bytes());
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// Reads what [`Bundle::encode`] wrote, checking every path stays
    /// inside the checkout and out of `.git`.
    pub fn decode(bytes: &[u8]) -> Result<Bundle, String> {
        let mut rest = bytes.strip_prefix(MAGIC).ok_or("it does not start as a gpupool snapshot")?;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if rest.len() < n {
                return Err("it ends in the middle of an entry".to_owned());
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let mut entries = Vec::new();
        while let Ok(kind) = take(1) {
            let kind = kind[0];
            let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| "bad length")?) as usize;
            let path = String::from_utf8(take(len)?.to_vec()).map_err(|_| "a path is not UTF-8".to_owned())?;
            check_path(&path)?;
            let mut data = || -> Result<Vec<u8>, String> {
                let n = u64::from_be_bytes(take(8)?.try_into().map_err(|_| "bad length")?);
                Ok(take(usize::try_from(n).map_err(|_| "too long")?)?.to_vec())
            };
            entries.push(match kind {
                b'F' => Entry::File { path, data: data()?, executable: false },
                b'X' => Entry::File { path, data: data()?, executable: true },
                b'L' => Entry::Link { path, target: data()? },
                b'D' => Entry::Deleted { path },
                other => return Err(format!("unknown entry kind {other}")),
            });
        }
        Ok(Bundle { entries })
    }
}

/// A path a snapshot may name: relative, normal components only, not in
/// `.git`.
fn check_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    let plain = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || p.components().next().is_some_and(|c| c.as_os_str() == ".git") {
        return Err(format!("path `{path}` leaves the checkout or names .git"));
    }
    Ok(())
}

/// The id a snapshot's bytes are stored under: git's blob hash of them.
pub fn hash(bytes: &[u8]) -> String {
    Oid::hash_object(git2::ObjectType::Blob, bytes).map_or_else(|_| String::new(), |o| o.to_string())
}

/// A snapshot taken of a working tree.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The commit it applies to: the newest commit the remote has.
    pub base: String,
    /// How the base was found, for the user (`merge-base of HEAD and
    /// origin/main`).
    pub base_from: String,
    /// The snapshot.
    pub bundle: Bundle,
}

/// Takes a snapshot of the git working tree that holds `dir`: every file
/// that differs from the base commit (committed but not pushed, staged,
/// unstaged, or untracked and not ignored), each whole. The base is the
/// merge-base of HEAD and its upstream branch, or else of HEAD and the
/// remote's default branch (`origin/HEAD`, `origin/main`, `origin/master`).
/// Reads the tree; changes nothing in it.
pub fn take(dir: &Path) -> Result<Taken, String> {
    let repo = Repository::discover(dir).map_err(|_| {
        format!(
            "snapshot outside a git tree: {} is not in a git working tree; run push --snapshot inside one",
            dir.display()
        )
    })?;
    let root = repo.workdir().ok_or("snapshot outside a git tree: the repository is bare")?.to_owned();
    let head = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .ok_or("snapshot: HEAD names no commit yet; commit once and push it")?;
    let (upstream, name) = remote_tip(&repo).ok_or(
        "snapshot: no remote branch to take it against (HEAD has no upstream, and the remote has no \
         origin/HEAD, origin/main or origin/master); push a branch first",
    )?;
    let base = repo
        .merge_base(head.id(), upstream)
        .map_err(|_| format!("snapshot: HEAD and {name} have no commit in common"))?;
    let base_tree = repo.find_commit(base).and_then(|c| c.tree()).map_err(|e| e.message().to_owned())?;
    let mut opts = DiffOptions::new();
    opts.include_untracked(true).recurse_untracked_dirs(true).include_typechange(true);
    let diff = repo
        .diff_tree_to_workdir_with_index(Some(&base_tree), Some(&mut opts))
        .map_err(|e| format!("snapshot: cannot compare the working tree: {}", e.message()))?;
    let mut entries = Vec::new();
    for delta in diff.deltas() {
        let file = if delta.status() == Delta::Deleted { delta.old_file() } else { delta.new_file() };
        let Some(rel) = file.path() else { continue };
        let path = rel.to_str().ok_or_else(|| format!("snapshot: path {} is not UTF-8", rel.display()))?.to_owned();
        if delta.status() == Delta::Deleted {
            entries.push(Entry::Deleted { path });
            continue;
        }
        let full = root.join(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(|e| format!("snapshot: {path}: {e}"))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| format!("snapshot: {path}: {e}"))?;
            let target = target.to_str().ok_or_else(|| format!("snapshot: link {path} is not UTF-8"))?;
            entries.push(Entry::Link { path, target: target.as_bytes().to_vec() });
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let data = std::fs::read(&full).map_err(|e| format!("snapshot: {path}: {e}"))?;
            entries.push(Entry::File { path, data, executable: meta.permissions().mode() & 0o111 != 0 });
        }
        // Anything else (a submodule, a socket) is not carried.
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(Taken {
        base: base.to_string(),
        base_from: format!("merge-base of HEAD and {name}"),
        bundle: Bundle { entries },
    })
}

/// The commit the remote has that HEAD is compared with, and its name: the
/// upstream of HEAD's branch, else the remote's default branch.
fn remote_tip(repo: &Repository) -> Option<(Oid, String)> {
    let upstream = repo.head().ok().filter(git2::Reference::is_branch).and_then(|h| {
        let branch = git2::Branch::wrap(h);
        let up = branch.upstream().ok()?;
        let name = up.name().ok().flatten()?.to_owned();
        Some((up.get().target()?, name))
    });
    upstream.or_else(|| {
        ["refs/remotes/origin/HEAD", "refs/remotes/origin/main", "refs/remotes/origin/master"].iter().find_map(|r| {
            let reference = repo.find_reference(r).ok()?.resolve().ok()?;
            let name = reference.shorthand().unwrap_or(r).to_owned();
            Some((reference.target()?, name))
        })
    })
}

/// Checks a snapshot against a size limit: over it, the error names the
/// size and the biggest files.
pub fn check_size(bundle: &Bundle, encoded: usize, limit: u64) -> Result<(), String> {
    if encoded as u64 <= limit {
        return Ok(());
    }
    let mut big: Vec<&Entry> = bundle.entries.iter().collect();
    big.sort_by_key(|e| std::cmp::Reverse(e.size()));
    let names: Vec<String> = big.iter().take(5).map(|e| format!("{} ({})", e.path(), mib(e.size()))).collect();
    Err(format!(
        "snapshot is {}, over the {} limit; the biggest files: {}. Ignore them (.gitignore) or commit and push them, \
         or raise --snapshot-limit",
        mib(encoded as u64),
        mib(limit),
        names.join(", ")
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Writes a snapshot over the checkout `dir` (at its base commit): each
/// file whole with its mode, each link, each deletion.
pub fn apply(bundle: &Bundle, dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for e in &bundle.entries {
        let path = dir.join(e.path());
        let io = |what: &str, err: std::io::Error| format!("cannot {what} {}: {err}", e.path());
        // Nothing is written or deleted through a link: every folder on the
        // way is made a real one (a deletion under a link or a file has
        // nothing to delete in the checkout).
        let clear = match e {
            Entry::Deleted { .. } => way_is_real(dir, Path::new(e.path())),
            _ => make_way(dir, Path::new(e.path())).map(|()| true).map_err(|err| io("make the folders of", err))?,
        };
        if !clear {
            continue;
        }
        // Whatever is there goes first (a file may replace a folder, a
        // link a file).
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).map_err(|err| io("replace", err))?,
            Ok(_) => std::fs::remove_file(&path).map_err(|err| io("replace", err))?,
            Err(_) => {}
        }
        match e {
            Entry::File { data, executable, .. } => {
                std::fs::write(&path, data).map_err(|err| io("write", err))?;
                let mode = if *executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|err| io("chmod", err))?;
            }
            Entry::Link { target, .. } => {
                let target = std::str::from_utf8(target).map_err(|_| format!("link {} is not UTF-8", e.path()))?;
                std::os::unix::fs::symlink(target, &path).map_err(|err| io("link", err))?;
            }
            Entry::Deleted { .. } => {}
        }
    }
    Ok(())
}

/// The folders on the way to `rel` under `dir`, each a real folder: a
/// link or a file in the way is removed, a missing folder made.
fn make_way(dir: &Path, rel: &Path) -> std::io::Result<()> {
    let mut at = dir.to_path_buf();
    let parts: Vec<Component<'_>> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                std::fs::remove_file(&at)?;
                std::fs::create_dir(&at)?;
            }
            Err(_) => std::fs::create_dir(&at)?,
        }
    }
    Ok(())
}

/// Whether every folder on the way to `rel` under `dir` is a real folder
/// (not a link, which could lead out of the checkout).
fn way_is_real(dir: &Path, rel: &Path) -> bool {
    let mut at = dir.to_path_buf();
    let parts: Vec<Component<'_>> = rel.components().collect();
    parts[..parts.len().saturating_sub(1)].iter().all(|part| {
        at.push(part);
        std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir())
    })
}

/// The commit (written into `repo`, referenced by nothing) whose tree is
/// `base`'s with the snapshot applied: what the checkout is compared with
/// to find the files a run wrote.
pub fn commit_over(repo: &Repository, base: Oid, bundle: &Bundle) -> Result<Oid, git2::Error> {
    let base = repo.find_commit(base)?;
    let mut update = git2::build::TreeUpdateBuilder::new();
    for e in &bundle.entries {
        match e {
            Entry::File { path, data, executable } => {
                let mode = if *executable { git2::FileMode::BlobExecutable } else { git2::FileMode::Blob };
                update.upsert(path.as_str(), repo.blob(data)?, mode);
            }
            Entry::Link { path, target } => {
                update.upsert(path.as_str(), repo.blob(target)?, git2::FileMode::Link);
            }
            Entry::Deleted { path } => {
                update.remove(path.as_str());
            }
        }
    }
    let tree = repo.find_tree(update.create_updated(repo, &base.tree()?)?)?;
    let who = git2::Signature::new("gpupool", "gpupool@localhost", &git2::Time::new(0, 0))?;
    repo.commit(None, &who, &who, "gpupool snapshot", &tree, &[&base])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_reads_back_as_written_and_refuses_paths_out_of_the_checkout() {
        let bundle = Bundle {
            entries: vec![
                Entry::File { path: "a/b.bin".into(), data: vec![0, 255, 10, 0], executable: false },
                Entry::File { path: "run.sh".into(), data: b"#!/bin/sh\n".to_vec(), executable: true },
                Entry::Link { path: "latest".into(), target: b"a/b.bin".to_vec() },
                Entry::Deleted { path: "old.py".into() },
            ],
        };
        let bytes = bundle.encode();
        assert_eq!(Bundle::decode(&bytes).unwrap(), bundle);
        assert_eq!(hash(&bytes).len(), 40);
        for bad in ["../x", "/etc/passwd", ".git/config", "a/../../x", ""] {
            let b = Bundle { entries: vec![Entry::Deleted { path: bad.into() }] };
            assert!(Bundle::decode(&b.encode()).is_err(), "{bad}");
        }
        assert!(Bundle::decode(b"not a snapshot").is_err());
        assert!(Bundle::decode(&bytes[..bytes.len() - 1]).is_err(), "cut short");
    }

    /// A link the snapshot (or the base commit) puts in the checkout never
    /// leads a later entry out of it: a folder on the way is made a real
    /// one, and a deletion under a link deletes nothing.
    #[test]
    fn applying_never_writes_or_deletes_through_a_link() {
        let outside = tempfile::tempdir().unwrap();
        let checkout = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep.txt"), "mine").unwrap();
        std::os::unix::fs::symlink(outside.path(), checkout.path().join("data")).unwrap();
        let target = outside.path().to_str().unwrap().as_bytes().to_vec();
        let bundle = Bundle {
            entries: vec![
                Entry::Deleted { path: "data/keep.txt".into() },
                Entry::Link { path: "out".into(), target },
                Entry::File { path: "out/deep/x.py".into(), data: b"x".to_vec(), executable: false },
            ],
        };
        apply(&bundle, checkout.path()).unwrap();
        assert_eq!(std::fs::read_to_string(outside.path().join("keep.txt")).unwrap(), "mine", "not deleted");
        assert!(!outside.path().join("deep").exists(), "nothing written outside");
        assert!(checkout.path().join("out").symlink_metadata().unwrap().is_dir(), "a real folder now");
        assert_eq!(std::fs::read(checkout.path().join("out/deep/x.py")).unwrap(), b"x");
    }
}
