//! The artifact store: where a worker uploads what its runs produced, and
//! where `gpupool pull` fetches it from on any host.
//!
//! A store is a URL (`gpupool worker --artifacts URL`, env
//! `GPUPOOL_ARTIFACTS`, `artifacts =` in `gpupool.toml`):
//!
//! - `file:///shared/dir`: a folder, usually a shared mount;
//! - `s3://bucket/prefix`: Amazon S3 or an S3-compatible server, set up by
//!   the usual `AWS_*` variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
//!   `AWS_ACCESS_KEY_ID`, …) or by options in the URL's query
//!   (`s3://runs/team?endpoint=http://minio:9000&allow_http=true&region=us-east-1`);
//! - `gs://bucket/prefix` (`GOOGLE_*` variables) and
//!   `az://container/prefix` (`AZURE_*` variables).
//!
//! Two query options are gpupool's own: `retry_timeout` (how long one
//! request is retried, default `3m`) and `max_retries` (default 10).
//!
//! The query may hold a secret, so it is never shown, stored or put in a
//! location: a run's files are recorded as `s3://bucket/prefix/FOLDER/`,
//! and `gpupool pull` applies the query of its own `--artifacts` URL when
//! that names the same bucket.
//!
//! Files stream from disk in parts (a multipart upload past
//! [`SMALL_FILE`]), so a checkpoint of many GB is never read whole into
//! memory, and each one is checked against its size once stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpupool_core::artifacts::ArtifactFile;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Files up to this size are stored with one request; bigger ones in parts.
pub const SMALL_FILE: u64 = 8 << 20;

/// The smallest part of a multipart upload (S3 refuses parts under 5 MiB
/// and allows 10,000 of them, so a bigger file gets bigger parts).
const PART: u64 = 16 << 20;

/// Parts of one file in flight at once: with [`PART`], at most about 64 MiB
/// of a file is in memory.
const PARTS_IN_FLIGHT: usize = 4;

/// Tries of a whole file before its upload counts as failed (each request
/// inside is also retried by the store client, up to `retry_timeout`).
const FILE_TRIES: u32 = 3;

/// An artifact store, opened from its URL.
#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// `scheme://bucket/prefix`, without the query: what locations start with.
    base: String,
    /// The prefix inside the bucket (or the folder's path for `file://`).
    prefix: StorePath,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore").field("base", &self.base).finish_non_exhaustive()
    }
}

/// A store URL taken apart.
struct Parsed {
    scheme: String,
    /// The bucket or container (empty for `file://`).
    bucket: String,
    /// The path after the bucket, without slashes at either end.
    path: String,
    /// `key=value` options from the query.
    options: Vec<(String, String)>,
}

fn parse(url: &str) -> Result<Parsed, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("artifact store `{}` is not a URL; write file:///dir, s3://bucket/prefix, gs://… or az://…", shown(url))
    })?;
    let scheme = scheme.to_ascii_lowercase();
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut options = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        options.push((k.to_ascii_lowercase(), percent_decode(v)));
    }
    let (bucket, path) = match scheme.as_str() {
        "file" => {
            if !rest.starts_with('/') {
                return Err(format!(
                    "artifact store `{}`: a file URL needs an absolute path (file:///dir)",
                    shown(url)
                ));
            }
            (String::new(), rest.trim_matches('/').to_owned())
        }
        "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "adl" | "azure" => {
            let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("artifact store `{}` names no bucket", shown(url)));
            }
            if bucket.contains('@') {
                return Err(format!(
                    "artifact store `{}`: put no credentials in the URL's bucket; use the AWS_*, GOOGLE_* or \
                     AZURE_* variables, or the query (never recorded)",
                    shown(url)
                ));
            }
            (bucket.to_owned(), path.trim_matches('/').to_owned())
        }
        other => {
            return Err(format!(
                "artifact store `{}`: unknown scheme `{other}`; use file://, s3://, gs:// or az://",
                shown(url)
            ));
        }
    };
    if path.split('/').any(|part| part == "..") {
        return Err(format!("artifact store `{}`: `..` is not allowed in its path", shown(url)));
    }
    Ok(Parsed { scheme, bucket, path, options })
}

/// A store URL as it may be shown: without its query (which may hold a
/// secret) or a password.
pub fn shown(url: &str) -> String {
    gpupool_core::redact::redact_url(url.split_once('?').map_or(url, |(u, _)| u))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ArtifactStore {
    /// Opens the store `url` names. Nothing is contacted yet: a store that
    /// cannot be reached fails at the first upload, with its reason.
    ///
    /// # Errors
    ///
    /// A URL that is not a store URL, an unknown option, or settings the
    /// store's client refuses (an error that never shows the query).
    pub fn open(url: &str) -> Result<Self, String> {
        let p = parse(url)?;
        let mut retry = RetryConfig::default();
        let mut settings = Vec::new();
        for (k, v) in &p.options {
            match k.as_str() {
                "retry_timeout" => {
                    retry.retry_timeout = humantime::parse_duration(v)
                        .map_err(|e| format!("artifact store option retry_timeout `{v}` is not a duration ({e})"))?;
                }
                "max_retries" => {
                    retry.max_retries =
                        v.parse().map_err(|_| format!("artifact store option max_retries `{v}` is not a number"))?;
                }
                _ => settings.push((k.clone(), v.clone())),
            }
        }
        let bucket_url = format!("{}://{}", p.scheme, p.bucket);
        let unknown = |k: &str| format!("artifact store `{}`: unknown option `{k}`", shown(url));
        let refused = |e: object_store::Error| format!("artifact store `{}`: {}", shown(url), first_line(&e));
        let store: Arc<dyn ObjectStore> = match p.scheme.as_str() {
            "file" => {
                if let Some((k, _)) = settings.first() {
                    return Err(unknown(k));
                }
                Arc::new(object_store::local::LocalFileSystem::new())
            }
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(&bucket_url).with_retry(retry);
                for (k, v) in settings {
                    b = b.with_config(k.parse().map_err(|_| unknown(&k))?, v);
                }
                Arc::new(b.build().map_err(refused)?)
            }
            "gs" => {
                let mut b =
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(&bucket_url).with_retry(retry);
                for (k, v) in settings {
                    b = b.with_config(k.parse().map_err(|_| unknown(&k))?, v);
                }
                Arc::new(b.build().map_err(refused)?)
            }
            _ => {
                let mut b =
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(&bucket_url).with_retry(retry);
                for (k, v) in settings {
                    b = b.with_config(k.parse().map_err(|_| unknown(&k))?, v);
                }
                Arc::new(b.build().map_err(refused)?)
            }
        };
        let base = if p.scheme == "file" {
            format!("file:///{}", p.path)
        } else if p.path.is_empty() {
            bucket_url
        } else {
            format!("{bucket_url}/{}", p.path)
        };
        let prefix = StorePath::parse(&p.path)
            .map_err(|e| format!("artifact store `{}`: its path cannot be a key prefix ({e})", shown(url)))?;
        Ok(ArtifactStore { store, base: base.trim_end_matches('/').to_owned(), prefix })
    }

    /// Opens the store folder `location` (as recorded:
    /// `s3://bucket/prefix/FOLDER/`) with the options of `configured`, the
    /// user's own store URL, when it names the same bucket. Returns the
    /// store rooted at that folder.
    ///
    /// # Errors
    ///
    /// As [`open`](ArtifactStore::open).
    pub fn at_location(location: &str, configured: Option<&str>) -> Result<Self, String> {
        let target = parse(location)?;
        let query = configured
            .and_then(|c| parse(c).ok().map(|p| (p, c)))
            .filter(|(p, _)| p.scheme == target.scheme && p.bucket == target.bucket)
            .and_then(|(_, c)| c.split_once('?').map(|(_, q)| q.to_owned()));
        let bare = location.split_once('?').map_or(location, |(u, _)| u);
        match query {
            Some(q) => Self::open(&format!("{bare}?{q}")),
            None => Self::open(bare),
        }
    }

    /// `scheme://bucket/prefix`: what every location of this store starts
    /// with (no query, so no secret).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The recorded location of `folder` (`q-…/job-7/attempt-1`).
    pub fn location(&self, folder: &str) -> String {
        format!("{}/{folder}/", self.base)
    }

    /// The key of `file` in `folder`, its names kept as they are (a
    /// non-ASCII name is stored as written, not percent-encoded).
    fn key(&self, folder: &str, file: &str) -> Result<StorePath, String> {
        let parts: Vec<&str> = std::iter::once(self.prefix.as_ref())
            .chain(folder.split('/'))
            .chain(file.split('/'))
            .filter(|p| !p.is_empty())
            .collect();
        StorePath::parse(parts.join("/")).map_err(|e| format!("{file} cannot be a key in the store ({e})"))
    }

    /// Uploads `files` (paths relative to `local`) to `folder`, each
    /// checked against its size once stored. A file that fails is tried
    /// three times in all; then the upload stops with the reason.
    ///
    /// # Errors
    ///
    /// The first file that could not be stored, and why.
    pub async fn upload(&self, local: &Path, folder: &str, files: &[ArtifactFile]) -> Result<(), String> {
        for file in files {
            let key = self.key(folder, &file.path)?;
            let source = local.join(&file.path);
            // A file that cannot be opened (gone, unreadable) will not be
            // better in a second: said at once.
            if let Err(e) = std::fs::File::open(&source) {
                return Err(format!("{} could not be stored: cannot read {} ({e})", file.path, source.display()));
            }
            let mut pause = Duration::from_secs(1);
            for tries in 1..=FILE_TRIES {
                match self.put_file(&source, &key).await {
                    Ok(()) => break,
                    Err(e) if tries == FILE_TRIES => {
                        return Err(format!("{} could not be stored ({tries} tries): {e}", file.path));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "storing {} failed ({e}); trying again in {}",
                            file.path,
                            humantime::format_duration(pause)
                        );
                        tokio::time::sleep(pause).await;
                        pause *= 4;
                    }
                }
            }
        }
        Ok(())
    }

    /// Streams one file to `key`, then checks the stored size.
    async fn put_file(&self, source: &Path, key: &StorePath) -> Result<(), String> {
        let mut file =
            tokio::fs::File::open(source).await.map_err(|e| format!("cannot read {} ({e})", source.display()))?;
        let size = file.metadata().await.map_err(|e| format!("cannot read {} ({e})", source.display()))?.len();
        if size <= SMALL_FILE {
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut bytes).await.map_err(|e| format!("cannot read {} ({e})", source.display()))?;
            self.store.put(key, bytes.into()).await.map_err(|e| first_line(&e))?;
        } else {
            let part = PART.max(size.div_ceil(9_000));
            let upload = self.store.put_multipart(key).await.map_err(|e| first_line(&e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, usize::try_from(part).unwrap_or(usize::MAX));
            let mut buf = vec![0u8; 4 << 20];
            let streamed: Result<(), String> = async {
                loop {
                    let n = file.read(&mut buf).await.map_err(|e| format!("cannot read {} ({e})", source.display()))?;
                    if n == 0 {
                        return Ok(());
                    }
                    writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| first_line(&e))?;
                    writer.write(&buf[..n]);
                }
            }
            .await;
            // A failed upload is aborted, so the store keeps no half of it
            // (finish aborts itself when completing fails).
            match streamed {
                Ok(()) => {
                    writer.finish().await.map_err(|e| first_line(&e))?;
                }
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            }
        }
        let stored =
            self.store.head(key).await.map_err(|e| format!("cannot check the stored file ({})", first_line(&e)))?;
        if stored.size != size {
            return Err(format!("the stored file has {} bytes, the local one {size}", stored.size));
        }
        Ok(())
    }

    /// Downloads `files` of the store's own folder (one opened with
    /// [`at_location`](ArtifactStore::at_location)) into `dest`, each
    /// written beside its final name and renamed once whole and of the
    /// recorded size. Returns the bytes written.
    ///
    /// # Errors
    ///
    /// A file path that would leave `dest`, a file missing from the store,
    /// or a local write that failed.
    pub async fn download(&self, files: &[ArtifactFile], dest: &Path) -> Result<u64, String> {
        use futures_util::StreamExt;
        let mut total = 0;
        for file in files {
            let target = safe_join(dest, &file.path)?;
            if let Some(dir) = target.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(|e| format!("cannot make {} ({e})", dir.display()))?;
            }
            let key = self.key("", &file.path)?;
            let got = self.store.get(&key).await.map_err(|e| format!("{}: {}", file.path, first_line(&e)))?;
            let partial = target.with_file_name(format!(
                ".{}.part",
                target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            let mut out = tokio::fs::File::create(&partial)
                .await
                .map_err(|e| format!("cannot write {} ({e})", partial.display()))?;
            let mut stream = got.into_stream();
            let mut written = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| format!("{}: {}", file.path, first_line(&e)))?;
                out.write_all(&chunk).await.map_err(|e| format!("cannot write {} ({e})", partial.display()))?;
                written += chunk.len() as u64;
            }
            out.flush().await.map_err(|e| format!("cannot write {} ({e})", partial.display()))?;
            drop(out);
            if written != file.size {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(format!("{}: got {written} bytes, {} were recorded", file.path, file.size));
            }
            tokio::fs::rename(&partial, &target)
                .await
                .map_err(|e| format!("cannot write {} ({e})", target.display()))?;
            total += written;
        }
        Ok(total)
    }
}

/// `dest/path` for a recorded file path, refusing one that would leave
/// `dest` (a record is written by whoever can write to the backend).
pub fn safe_join(dest: &Path, path: &str) -> Result<PathBuf, String> {
    let parts: Vec<&str> = path.split('/').collect();
    if path.is_empty() || path.starts_with('/') || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err(format!("recorded file path `{path}` is not a plain relative path; refusing it"));
    }
    Ok(parts.iter().fold(dest.to_path_buf(), |acc, p| acc.join(p)))
}

/// An object store error's first line (they carry their source's text,
/// never the query of the store URL).
fn first_line(e: &object_store::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn store_urls_are_taken_apart_and_bad_ones_named() {
        let s = ArtifactStore::open(
            "s3://runs/team/a?endpoint=http://127.0.0.1:9&access_key_id=k&secret_access_key=hush&region=x",
        )
        .unwrap();
        assert_eq!(s.base(), "s3://runs/team/a");
        assert_eq!(s.location("q-1/job-7/attempt-1"), "s3://runs/team/a/q-1/job-7/attempt-1/");
        assert_eq!(
            s.key("q-1/job-7/attempt-1", "model/best.pth").unwrap().as_ref(),
            "team/a/q-1/job-7/attempt-1/model/best.pth"
        );
        let f = ArtifactStore::open("file:///srv/runs/").unwrap();
        assert_eq!(f.location("x"), "file:///srv/runs/x/");
        for (bad, says) in [
            ("/srv/runs", "is not a URL"),
            ("file://srv", "absolute path"),
            ("ftp://h/x", "unknown scheme `ftp`"),
            ("s3:///x", "names no bucket"),
            ("s3://b/x?colour=red&secret_access_key=hush", "unknown option `colour`"),
            ("s3://b/../x", "`..`"),
            ("s3://KEY:hush@b/x", "no credentials in the URL"),
            ("s3://b?retry_timeout=soon", "not a duration"),
        ] {
            let e = ArtifactStore::open(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("hush"), "a secret is never shown: {e}");
        }
    }

    #[test]
    fn a_location_reopens_with_the_configured_stores_options() {
        let s = ArtifactStore::at_location("s3://runs/team/q-1/job-7/attempt-1/", Some("s3://runs/team?region=eu-1"))
            .unwrap();
        assert_eq!(s.base(), "s3://runs/team/q-1/job-7/attempt-1");
        assert_eq!(s.key("", "métriques.csv").unwrap().as_ref(), "team/q-1/job-7/attempt-1/métriques.csv");
    }

    #[test]
    fn recorded_paths_never_leave_the_destination() {
        let dest = Path::new("/tmp/d");
        assert_eq!(safe_join(dest, "a/b.pth").unwrap(), Path::new("/tmp/d/a/b.pth"));
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(safe_join(dest, bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_folder_store_takes_files_and_refuses_what_cannot_be_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, dest) = (tmp.path().join("out"), tmp.path().join("dest"));
        std::fs::create_dir_all(out.join("model")).unwrap();
        std::fs::write(out.join("model/best.pth"), vec![7u8; (SMALL_FILE + 3) as usize]).unwrap();
        std::fs::write(out.join("a b é.txt"), "hi").unwrap();
        let files = vec![
            ArtifactFile { path: "a b é.txt".into(), size: 2 },
            ArtifactFile { path: "model/best.pth".into(), size: SMALL_FILE + 3 },
        ];
        let store = ArtifactStore::open(&format!("file://{}/store", tmp.path().display())).unwrap();
        store.upload(&out, "q-1/job-1/attempt-1", &files).await.unwrap();
        let stored = tmp.path().join("store/q-1/job-1/attempt-1");
        assert_eq!(std::fs::read(stored.join("model/best.pth")).unwrap().len() as u64, SMALL_FILE + 3, "in parts");
        assert_eq!(std::fs::read_to_string(stored.join("a b é.txt")).unwrap(), "hi", "names as written");
        let back = ArtifactStore::at_location(&store.location("q-1/job-1/attempt-1"), None).unwrap();
        assert_eq!(back.download(&files, &dest).await.unwrap(), SMALL_FILE + 5);
        assert_eq!(std::fs::read(dest.join("model/best.pth")).unwrap(), vec![7u8; (SMALL_FILE + 3) as usize]);

        // A file the run removed (or made unreadable) after it was listed.
        let gone = vec![ArtifactFile { path: "gone.pth".into(), size: 1 }];
        let e = store.upload(&out, "q-1/job-1/attempt-2", &gone).await.unwrap_err();
        assert!(e.starts_with("gone.pth could not be stored: cannot read"), "{e}");
        // A recorded size that does not match what the store has.
        let wrong = vec![ArtifactFile { path: "a b é.txt".into(), size: 5 }];
        let e = back.download(&wrong, &tmp.path().join("d2")).await.unwrap_err();
        assert!(e.contains("got 2 bytes, 5 were recorded"), "{e}");
        assert!(!tmp.path().join("d2/a b é.txt").exists(), "a short file is not left as if whole");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("http%3A%2F%2Fh%3A9"), "http://h:9");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
