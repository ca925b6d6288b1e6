//! The result journal: a run's end is written down, fsync'd, in the
//! worker's data directory before it is reported, and removed once the
//! queue has it (or has refused it for good). A worker killed between the
//! two, or restarted while the backend was down, does not lose a run that
//! finished: the next worker on the data directory delivers what the
//! journal holds, and the lease rules decide (accepted while no other
//! worker has taken the job over; dropped, with a log line, once one has).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use gpupool_core::{Completion, Failure, FailureKind};
use serde::{Deserialize, Serialize};

/// One run's end, waiting to be reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The queue it belongs to ([`crate::WorkerConfig::queue_id`]): a
    /// worker delivers only its own queue's entries.
    pub queue: String,
    /// The job.
    pub job: String,
    /// The attempt that ended.
    pub attempt: u32,
    /// The lease's token, which fences the report.
    pub token: String,
    /// When the lease ended unless heartbeated, in milliseconds.
    pub expires_at: i64,
    /// What to report.
    pub report: Stored,
}

/// A report as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stored {
    Complete {
        output_tail: String,
        result: Option<serde_json::Value>,
        /// Output the completion carries, not shipped yet.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        log: String,
        /// The run's commit and GPUs, not recorded yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<(Option<String>, Vec<u32>)>,
    },
    Fail {
        kind: FailureKind,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: String,
        output_tail: String,
    },
    Cancelled {
        output_tail: String,
    },
}

impl Stored {
    pub(crate) fn complete(c: &Completion) -> Self {
        Stored::Complete {
            output_tail: c.output_tail.clone(),
            result: c.result.clone(),
            log: c.log.clone(),
            run: c.run.as_ref().map(|r| (r.commit.clone(), r.gpu_ids.clone())),
        }
    }

    pub(crate) fn fail(f: &Failure) -> Self {
        Stored::Fail {
            kind: f.kind,
            exit_code: f.exit_code,
            signal: f.signal,
            message: f.message.clone(),
            output_tail: f.output_tail.clone(),
        }
    }
}

/// Writes `entry` into `dir` for good (the file and the folder fsync'd)
/// and returns its path. Blocking.
pub(crate) fn write(dir: &Path, entry: &Entry) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!("job-{}-{}-{}", entry.job, entry.attempt, &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (tmp, path) = (dir.join(format!("{name}.tmp")), dir.join(format!("{name}.json")));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(entry).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// Every entry in `dir`, with its path; files that do not read are
/// reported once by `bad` and left where they are. Blocking.
pub(crate) fn read_all(dir: &Path, mut bad: impl FnMut(&Path, String)) -> Vec<(PathBuf, Entry)> {
    let Ok(files) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut entries = Vec::new();
    for path in files.flatten().map(|f| f.path()) {
        if path.extension().is_none_or(|e| e != "json") {
            // A write cut short before its rename: never reported.
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Entry>(&b).map_err(|e| e.to_string()))
        {
            Ok(entry) => entries.push((path, entry)),
            Err(e) => bad(&path, e),
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_written_for_good_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry {
            queue: "sqlite://q.db".into(),
            job: "7".into(),
            attempt: 2,
            token: "t".into(),
            expires_at: 5,
            report: Stored::fail(&Failure { exit_code: Some(3), ..Failure::new(FailureKind::Exit, "exit 3") }),
        };
        let path = write(dir.path(), &entry).unwrap();
        std::fs::write(dir.path().join("job-1-1-x.tmp"), "{").unwrap();
        std::fs::write(dir.path().join("job-1-1-y.json"), "{").unwrap();
        let mut bad = Vec::new();
        let read = read_all(dir.path(), |p, _| bad.push(p.to_owned()));
        assert_eq!(read, vec![(path, entry)]);
        assert_eq!(bad, vec![dir.path().join("job-1-1-y.json")]);
        assert!(!dir.path().join("job-1-1-x.tmp").exists(), "a cut-short write is removed");
    }
}
