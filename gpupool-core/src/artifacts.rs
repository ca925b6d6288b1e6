//! What a run produced: the files kept from its output directory, and where
//! they are.
//!
//! Every run gets `GPUPOOL_OUTPUT_DIR`, an empty folder outside its
//! checkout. When it ends, whatever it created or changed in the checkout
//! is moved there too (see [`crate::Workspace::changed`]). [`Artifacts`]
//! says where those files ended up: in the artifact store the worker
//! uploads to, or on the disk of the worker that ran the job.

use serde::{Deserialize, Serialize};

/// One file a run produced, by its path inside the output directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// The path relative to the output directory, with `/` between parts
    /// (`test_model_dir/best.pth`).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Where a run's files are and what they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    /// The attempt that produced them.
    pub attempt: u32,
    /// Where they are: the store URL of their folder
    /// (`s3://bucket/prefix/q-…/job-7/attempt-1/`) once uploaded, else
    /// `HOST:PATH`, the folder on the worker's host.
    pub location: String,
    /// Whether `location` is in the artifact store (`gpupool pull` fetches
    /// it from any host) rather than on one worker's disk.
    pub stored: bool,
    /// The files, by path.
    pub files: Vec<ArtifactFile>,
    /// What went wrong keeping or uploading them (the files stay at
    /// `location`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Artifacts {
    /// The files' total size in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Whether these replace `kept`, what a record holds now: the rule of
    /// [`crate::Queue::record_artifacts`] for every backend. A later
    /// attempt's files, or the same attempt's with news (uploaded, or
    /// failed to upload), replace what is there; an earlier attempt's,
    /// reported late, never do.
    pub fn replaces(&self, kept: Option<&Artifacts>) -> bool {
        kept.is_none_or(|k| self.attempt >= k.attempt)
    }
}

/// `bytes` as people read sizes: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut size = bytes as f64 / 1024.0;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(2 << 30), "2.0 GiB");
    }
}
