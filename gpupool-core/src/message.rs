//! Reading jobs from JSON: the original tool's flat `message.json` (the
//! *seed form*) and the structured form, plus the checks every job passes at
//! push ([`JobSpec::validate`]).
//!
//! A file holds one job object or an array of them. A job with `train_path`
//! or `branch` is in the seed form; one with `entrypoint` is structured; one
//! with both is refused. No shell is involved anywhere: the seed's string
//! values are split with POSIX shell-words rules (quotes respected, nothing
//! expanded), so `"resize": "128 96"` becomes the two argv items `128` `96`.

use std::path::{Component, Path};

use serde_json::{Map, Value};

use crate::job::{Args, JobSpec};
use crate::{Error, Result};

/// Largest encoded job accepted at push.
pub const MAX_JOB_BYTES: usize = 64 * 1024;

/// Environment variables a job may not set, besides the families in
/// [`REFUSED_ENV_PREFIXES`]: each is read at startup by the dynamic loader,
/// a shell, Python, pip, git, a compiler, TLS or a proxy, and so chooses
/// what code runs (or where it comes from) on the worker; only the worker
/// chooses that. `CUDA_*` device choices are the worker's too.
const REFUSED_ENV: [&str; 33] = [
    "PATH",
    "HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "BASH_ENV",
    "ENV",
    "IFS",
    "SHELLOPTS",
    "PS4",
    "CC",
    "CXX",
    "CPP",
    "LD",
    "AR",
    "AS",
    "NVCC",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "LDSHARED",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
    "PKG_CONFIG_PATH",
    "CMAKE_ARGS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "OPENSSL_CONF",
    "GLIBC_TUNABLES",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "TMPDIR",
];

/// Families of environment variables a job may not set: the dynamic
/// loader (`LD_`, `DYLD_`), Python and its installers (`PYTHON`, `PIP_`,
/// `UV_`, `CONDA_`), git (`GIT_`), other interpreters (`NODE_`, `PERL`,
/// `RUBY`), allocator hooks (`MALLOC_`), TLS (`SSL_`) and gpupool's own.
const REFUSED_ENV_PREFIXES: [&str; 14] = [
    "LD_",
    "DYLD_",
    "GPUPOOL_",
    "PYTHON",
    "PIP_",
    "UV_",
    "CONDA_",
    "GIT_",
    "NODE_",
    "PERL",
    "RUBY",
    "MALLOC_",
    "SSL_",
    "BASH_FUNC_",
];

/// Proxy settings, refused in any letter case (`https_proxy` is read as
/// well as `HTTPS_PROXY`): they decide where pip and git download from.
const REFUSED_ENV_ANY_CASE: [&str; 5] = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY"];

/// Parses a file's text into jobs, checking each one.
///
/// If any job is invalid, nothing is returned: the error names the job (its
/// position, and its name where it has one) and the problem. Malformed JSON
/// gives the line and column.
pub fn parse_jobs(text: &str) -> Result<Vec<JobSpec>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Error::InvalidJob(format!(
            "malformed JSON at line {}, column {}: {}",
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        ))
    })?;
    let items = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        other => {
            return Err(Error::InvalidJob(format!(
                "expected a job object or an array of them, found {}",
                kind_of(&other)
            )));
        }
    };
    if items.is_empty() {
        return Err(Error::InvalidJob("the file holds an empty array: no job to push".into()));
    }
    let total = items.len();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let label = job_label(i, total, &item);
            parse_job(item).map_err(|e| match e {
                Error::InvalidJob(m) => Error::InvalidJob(format!("{label}: {m}")),
                other => other,
            })
        })
        .collect()
}

/// Parses one job object in either form and checks it.
pub fn parse_job(value: Value) -> Result<JobSpec> {
    let Value::Object(obj) = value else {
        return Err(Error::InvalidJob(format!("expected a job object, found {}", kind_of(&value))));
    };
    let seed = obj.contains_key("train_path") || obj.contains_key("branch");
    let structured = obj.contains_key("entrypoint") || obj.contains_key("git_ref");
    let spec = match (seed, structured) {
        (true, true) => {
            return Err(Error::InvalidJob(
                "mixes the seed form (`branch`/`train_path`) with the structured form \
                 (`git_ref`/`entrypoint`); use one"
                    .into(),
            ));
        }
        (true, false) => parse_seed(obj)?,
        (false, _) => serde_path_to_error::deserialize::<_, JobSpec>(Value::Object(obj)).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                Error::InvalidJob(e.into_inner().to_string())
            } else {
                Error::InvalidJob(format!("`{path}`: {}", e.into_inner()))
            }
        })?,
    };
    let mut spec = spec;
    if spec.name.is_none()
        && let Some(serde_json::Value::String(name)) = spec.args.get("name")
    {
        spec.name = Some(name.clone());
    }
    spec.validate()?;
    Ok(spec)
}

/// The seed form: `branch`, `train_path`, and every other key an arg, but
/// `gpupool`, an object of job options (`{"gpus": 2, "queue": "high"}`),
/// which sets what the structured form's keys set.
fn parse_seed(obj: Map<String, Value>) -> Result<JobSpec> {
    let mut git_ref = None;
    let mut entrypoint = None;
    let mut args = Args::new();
    let mut name = None;
    let mut options = None;
    for (key, value) in obj {
        match key.as_str() {
            SEED_OPTIONS => match value {
                Value::Object(o) => options = Some(o),
                other => {
                    return Err(Error::InvalidJob(format!(
                        "`{SEED_OPTIONS}` holds the job's options as an object, such as \
                         {{\"gpus\": 2, \"queue\": \"high\"}}; found {}",
                        kind_of(&other)
                    )));
                }
            },
            "branch" => git_ref = Some(scalar_text("branch", &value)?),
            "train_path" => {
                let path = scalar_text("train_path", &value)?;
                entrypoint = Some(path.strip_prefix("./").map(str::to_owned).unwrap_or(path));
            }
            "id" | "pushed" => {}
            _ => {
                if let ("name", Value::String(s)) = (key.as_str(), &value) {
                    name = Some(s.clone());
                }
                let converted = seed_value(&key, value)?;
                args.insert(key, converted);
            }
        }
    }
    let git_ref = git_ref.ok_or_else(|| Error::InvalidJob("`branch` is missing; name a branch or commit".into()))?;
    let entrypoint = entrypoint.ok_or_else(|| {
        Error::InvalidJob("`train_path` is missing; name the script to run, such as `./train.py`".into())
    })?;
    let Some(options) = options else {
        let mut spec = JobSpec::new(git_ref, entrypoint);
        spec.args = args;
        spec.name = name;
        return Ok(spec);
    };
    if let Some(key) = ["git_ref", "entrypoint", "args"].into_iter().find(|k| options.contains_key(*k)) {
        return Err(Error::InvalidJob(format!(
            "`{SEED_OPTIONS}.{key}`: in this form `branch`, `train_path` and the other keys set it; remove it here"
        )));
    }
    let mut full = options;
    full.insert("git_ref".into(), Value::String(git_ref));
    full.insert("entrypoint".into(), Value::String(entrypoint));
    full.insert("args".into(), Value::Object(args));
    let mut spec = serde_path_to_error::deserialize::<_, JobSpec>(Value::Object(full)).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { SEED_OPTIONS.to_owned() } else { format!("{SEED_OPTIONS}.{path}") };
        Error::InvalidJob(format!("`{at}`: {}", e.into_inner()))
    })?;
    if spec.name.is_none() {
        spec.name = name;
    }
    Ok(spec)
}

/// The key of the seed form that holds job options instead of an arg.
pub const SEED_OPTIONS: &str = "gpupool";

/// A seed value: strings are split with shell-words rules.
fn seed_value(key: &str, value: Value) -> Result<Value> {
    match value {
        Value::String(s) => {
            let mut words = shell_words::split(&s)
                .map_err(|e| Error::InvalidJob(format!("arg `{key}` value `{s}` cannot be split into words: {e}")))?;
            Ok(if words.len() == 1 {
                Value::String(words.remove(0))
            } else {
                words.into_iter().map(Value::String).collect()
            })
        }
        other => Ok(other),
    }
}

fn scalar_text(key: &str, value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(Error::InvalidJob(format!("`{key}` must be a string, found {}", kind_of(other)))),
    }
}

fn job_label(index: usize, total: usize, item: &Value) -> String {
    let name = item.get("name").and_then(Value::as_str).map(|n| format!(" (name `{n}`)")).unwrap_or_default();
    if total == 1 { format!("job{name}") } else { format!("job {} of {total}{name}", index + 1) }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json appends " at line L column C"; we put the position first.
fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

fn valid_queue_name(q: &str) -> bool {
    (1..=64).contains(&q.len()) && q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Checks the name of a queue: `[A-Za-z0-9._-]{1,64}`.
pub fn validate_queue_name(q: &str) -> Result<()> {
    if valid_queue_name(q) {
        Ok(())
    } else {
        Err(Error::InvalidJob(format!("queue `{q}` is not a valid name; use 1 to 64 of A-Z a-z 0-9 . _ -")))
    }
}

/// Whether a job may set this environment variable: an ordinary variable
/// (`WANDB_MODE`, `OMP_NUM_THREADS`, `NCCL_DEBUG`, `HF_HOME`, your own)
/// is allowed; one read at startup by the dynamic loader, a shell, Python,
/// pip, git, a compiler, TLS or a proxy is not (see the lists above, and
/// docs/job-format.md). Checked at push and again before a run.
pub fn env_var_allowed(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    !REFUSED_ENV.contains(&key)
        && !REFUSED_ENV_PREFIXES.iter().any(|p| key.starts_with(p))
        && !REFUSED_ENV_ANY_CASE.contains(&upper.as_str())
}

impl JobSpec {
    /// [`JobSpec::validate`], returning the JSON text a backend stores (so a
    /// push encodes the job once).
    pub fn validated_json(&self) -> Result<String> {
        self.check_fields()?;
        let text = self.to_json()?;
        if text.len() > MAX_JOB_BYTES {
            return Err(Error::InvalidJob(format!(
                "the job is {} bytes encoded; the limit is {MAX_JOB_BYTES}",
                text.len()
            )));
        }
        Ok(text)
    }

    /// The checks every backend runs at push. The error names the field,
    /// the value and what to do.
    pub fn validate(&self) -> Result<()> {
        self.validated_json().map(|_| ())
    }

    fn check_fields(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidJob(m));
        validate_queue_name(&self.queue)?;
        let r = &self.git_ref;
        if r.is_empty() || r.len() > 255 || r.starts_with('-') || r.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return bad(format!("git_ref `{r}` is not a branch, tag or commit name"));
        }
        validate_entrypoint(&self.entrypoint)?;
        if let Some(repo) = &self.repo
            && (repo.is_empty() || repo.starts_with('-') || repo.chars().any(char::is_control))
        {
            return bad(format!("repo `{repo}` is not a repository URL or path"));
        }
        if let Some(repo) = &self.repo
            && crate::redact::url_has_password(repo)
        {
            return bad(format!(
                "repo `{}` carries a password, which would be stored in the queue; give the URL without it \
                 and let the worker's credentials (GPUPOOL_GIT_TOKEN, a git credential helper) do the rest",
                crate::redact::redact_url(repo)
            ));
        }
        for (key, value) in &self.args {
            validate_arg(key, value)?;
        }
        for (key, value) in &self.env {
            let well_formed = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !well_formed {
                return bad(format!("env name `{key}` is not a variable name; use letters, digits and _"));
            }
            if !env_var_allowed(key) {
                return bad(format!(
                    "env `{key}` is refused: it is read at startup by the loader, a shell, Python, pip, git, \
                     a compiler or a proxy, or chooses GPUs, and only the worker chooses that; ordinary \
                     variables (WANDB_MODE, OMP_NUM_THREADS, your own) are fine"
                ));
            }
            if value.contains('\0') {
                return bad(format!("env `{key}` holds a NUL byte"));
            }
        }
        if let Some(n) = self.max_attempts.filter(|n| *n == 0 || *n > 1000) {
            return bad(format!("max_attempts {n} is out of range; use 1 to 1000"));
        }
        if let Some(policy) = &self.retry {
            if self.max_attempts.is_some() {
                return bad("give max_attempts or retry, not both (retry.max counts the retries)".into());
            }
            if policy.max > 999 {
                return bad(format!("retry.max {} is out of range; use 0 to 999", policy.max));
            }
            if let Some(kind) = policy.on.iter().find(|k| !k.is_retryable() || **k == crate::FailureKind::Worker) {
                return bad(format!(
                    "retry.on: `{kind}` cannot be retried (it fails the same way every time, or is never the job's \
                     fault); use exit, oom, signal, timeout, lease_lost"
                ));
            }
            if policy.backoff.is_some_and(|b| b.is_zero() || b > crate::job::MAX_BACKOFF) {
                return bad("retry.backoff must be more than 0 and at most 24h".into());
            }
            if let Some(f) = policy.factor {
                if policy.backoff.is_none() {
                    return bad("retry.factor needs retry.backoff (the first wait it multiplies)".into());
                }
                if !(1.0..=10.0).contains(&f) {
                    return bad(format!("retry.factor {f} is out of range; use 1 to 10"));
                }
            }
        }
        self.check_after()?;
        if let Some(sweep) = self.sweep.as_ref().filter(|s| !plain_token(&s.id)) {
            return bad(format!("sweep.id `{}` is not a sweep id", sweep.id));
        }
        if let Some(snap) = &self.snapshot {
            let sha = |v: &str| v.len() == 40 && v.bytes().all(|b| b.is_ascii_hexdigit());
            if !sha(&snap.base) || !sha(&snap.hash) {
                return bad("snapshot.base and snapshot.hash must be full 40-hex ids".into());
            }
            if snap.base != self.git_ref {
                return bad(format!("snapshot.base {} is not the job's git_ref {}", snap.base, self.git_ref));
            }
            if snap.bytes > crate::job::MAX_SNAPSHOT_BYTES {
                return bad(format!(
                    "snapshot is {} bytes; the limit is {}",
                    snap.bytes,
                    crate::job::MAX_SNAPSHOT_BYTES
                ));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout 0 would stop every run at once; leave it out for no timeout".into());
        }
        if self.name.as_ref().is_some_and(|n| n.len() > 200 || n.chars().any(char::is_control)) {
            return bad("name must be at most 200 printable characters".into());
        }
        if self.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 200) {
            return bad("idempotency_key must be 1 to 200 bytes".into());
        }
        Ok(())
    }

    /// `after` names 1 to [`MAX_AFTER`] well-formed ids or a sweep;
    /// `after_any` needs it. (That the ids exist is checked by `gpupool
    /// push`, which holds the queue; the wait reads them again.)
    fn check_after(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidJob(m));
        match &self.after {
            None if self.after_any => bad("after_any needs after (the jobs to wait for)".into()),
            None => Ok(()),
            Some(crate::After::Jobs(ids)) if ids.is_empty() => {
                bad("after is empty; name the jobs to wait for, or leave it out".into())
            }
            Some(crate::After::Jobs(ids)) if ids.len() > MAX_AFTER => {
                bad(format!("after names {} jobs; the limit is {MAX_AFTER}", ids.len()))
            }
            Some(crate::After::Jobs(ids)) => match ids.iter().find(|id| !plain_token(id.as_str())) {
                Some(id) => bad(format!("after: `{id}` is not a job id")),
                None => Ok(()),
            },
            Some(crate::After::Sweep { sweep }) if !plain_token(sweep) => {
                bad(format!("after: sweep `{sweep}` is not a sweep id"))
            }
            Some(crate::After::Sweep { .. }) => Ok(()),
        }
    }
}

/// The most jobs one job may wait for (`after`).
pub const MAX_AFTER: usize = 1000;

/// An id as typed: 1 to 100 letters, digits, `-`, `_`, `.` or `:`.
fn plain_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// An entrypoint must be a relative path that stays inside the repository.
/// (Symlinks are checked by the workspace, against the real checkout.)
pub fn validate_entrypoint(entrypoint: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::InvalidJob(format!(
            "entrypoint `{entrypoint}` {why}; give a path inside the repository, such as `train.py`"
        )))
    };
    if entrypoint.is_empty() {
        return bad("is empty");
    }
    if entrypoint.contains('\0') {
        return bad("holds a NUL byte");
    }
    let path = Path::new(entrypoint);
    if path.is_absolute() || entrypoint.starts_with('/') || entrypoint.starts_with('\\') {
        return bad("is absolute");
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return bad("leaves the repository (`..`)");
    }
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return bad("names no file");
    }
    Ok(())
}

fn validate_arg(key: &str, value: &Value) -> Result<()> {
    if key.is_empty() || key.starts_with('-') || key.chars().any(|c| c.is_whitespace() || c.is_control() || c == '=') {
        return Err(Error::InvalidJob(format!(
            "arg name `{key}` cannot become `--{key}`; use a name without spaces, `=` or a leading `-`"
        )));
    }
    let nul = |s: &str| {
        if s.contains('\0') {
            Err(Error::InvalidJob(format!("arg `{key}` holds a NUL byte, which no argv item can carry")))
        } else {
            Ok(())
        }
    };
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        Value::String(s) => nul(s),
        Value::Array(items) => items.iter().try_for_each(|item| match item {
            Value::String(s) => nul(s),
            Value::Number(_) => Ok(()),
            other => Err(Error::InvalidJob(format!(
                "arg `{key}` holds {} inside an array; arrays may hold strings and numbers",
                kind_of(other)
            ))),
        }),
        Value::Object(_) => Err(Error::InvalidJob(format!(
            "arg `{key}` is an object; an arg is a string, number, boolean, null or array"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::argv::build_argv;

    /// The seed README's `message.json`, as the plain JSON file it really is.
    const SEED: &str = r#"{
  "branch": "develop",
  "train_path": "./ai_folder/train.py",
  "name": "test_name",
  "seed": "42",
  "epoch": "1",
  "dataset": "MaskBaseDataset",
  "augmentation": "BaseAugmentation",
  "resize": "128 96",
  "batch_size": "64",
  "valid_batch_size": "1000",
  "model": "BaseModel",
  "optimizer": "SGD",
  "lr": "1e-3",
  "val_ratio": "0.2",
  "criterion": "cross_entropy",
  "lr_decay_step": "20",
  "log_interval": "20",
  "patience": "5",
  "data_dir": "test_data_dir",
  "model_dir": "test_model_dir"
}"#;

    fn one(text: &str) -> JobSpec {
        let mut jobs = parse_jobs(text).unwrap();
        assert_eq!(jobs.len(), 1);
        jobs.remove(0)
    }

    fn err(text: &str) -> String {
        match parse_jobs(text) {
            Err(Error::InvalidJob(m)) => m,
            other => panic!("expected InvalidJob, got {other:?}"),
        }
    }

    #[test]
    fn seed_message_json() {
        let spec = one(SEED);
        assert_eq!(spec.git_ref, "develop");
        assert_eq!(spec.entrypoint, "ai_folder/train.py", "the leading ./ is stripped");
        assert_eq!(spec.name.as_deref(), Some("test_name"));
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.gpus, None);
        let argv = build_argv(&["python3".to_owned()], &spec.entrypoint, &spec.args, 1);
        let expected = "python3 ai_folder/train.py --name test_name --seed 42 --epoch 1 --dataset MaskBaseDataset \
             --augmentation BaseAugmentation --resize 128 96 --batch_size 64 --valid_batch_size 1000 \
             --model BaseModel --optimizer SGD --lr 1e-3 --val_ratio 0.2 --criterion cross_entropy \
             --lr_decay_step 20 --log_interval 20 --patience 5 --data_dir test_data_dir --model_dir test_model_dir";
        assert_eq!(argv, expected.split(' ').collect::<Vec<_>>());
        assert_eq!(spec.args["resize"], serde_json::json!(["128", "96"]));
    }

    #[test]
    fn seed_ignores_id_and_pushed_and_keeps_types() {
        let spec = one(r#"{"id": 7, "branch": "e6084c6b", "pushed": 1, "train_path": "train.py",
                          "seed": 42, "amp": true, "debug": false, "ckpt": null, "words": "'a b' c"}"#);
        assert_eq!(spec.git_ref, "e6084c6b");
        let argv = build_argv(&[], &spec.entrypoint, &spec.args, 0);
        assert_eq!(argv, ["train.py", "--seed", "42", "--amp", "--words", "a b", "c"]);
    }

    #[test]
    fn seed_form_takes_job_options_under_gpupool() {
        let spec = one(r#"{"branch": "main", "train_path": "./t.py", "lr": "0.1",
                           "gpupool": {"gpus": 2, "queue": "high", "timeout": "2h", "name": "run-a"}}"#);
        assert_eq!((spec.gpus, spec.queue.as_str(), spec.name.as_deref()), (Some(2), "high", Some("run-a")));
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(7200)));
        assert_eq!(serde_json::Value::Object(spec.args), serde_json::json!({"lr": "0.1"}), "options are no args");
        let unknown = err(r#"{"branch": "m", "train_path": "t.py", "gpupool": {"gpu": 2}}"#);
        assert!(unknown.contains("`gpupool.gpu`: unknown field"), "{unknown}");
        assert!(err(r#"{"branch": "m", "train_path": "t.py", "gpupool": 2}"#).contains("as an object"));
        assert!(
            err(r#"{"branch": "m", "train_path": "t.py", "gpupool": {"entrypoint": "x.py"}}"#)
                .contains("`gpupool.entrypoint`")
        );
        assert!(
            err(r#"{"branch": "m", "train_path": "t.py", "gpupool": {"env": {"LD_PRELOAD": "x"}}}"#)
                .contains("LD_PRELOAD")
        );
    }

    #[test]
    fn seed_strings_are_words_not_shell() {
        let spec = one(r#"{"branch": "main", "train_path": "t.py", "x": "; rm -rf ~", "y": "$(whoami) `id`"}"#);
        let argv = build_argv(&[], &spec.entrypoint, &spec.args, 0);
        assert_eq!(argv, ["t.py", "--x", ";", "rm", "-rf", "~", "--y", "$(whoami)", "`id`"]);
        assert!(err(r#"{"branch": "main", "train_path": "t.py", "x": "it's"}"#).contains("`x`"));
    }

    #[test]
    fn structured_form_arrays_booleans_null() {
        let spec = one(r#"{"git_ref": "main", "entrypoint": "src/train.py", "gpus": 2, "queue": "high",
            "priority": 5, "max_attempts": 1, "timeout": "2h", "env": {"WANDB_MODE": "offline"},
            "args": {"layers": [64, "128"], "amp": true, "resume": false, "ckpt": null, "lr": 0.001,
                     "note": "; rm -rf ~ $(x) \"q\""}}"#);
        assert_eq!(spec.gpus, Some(2));
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(7200)));
        let argv = build_argv(&["torchrun".into(), "--nproc_per_node={gpus}".into()], &spec.entrypoint, &spec.args, 2);
        assert_eq!(
            argv,
            [
                "torchrun",
                "--nproc_per_node=2",
                "src/train.py",
                "--layers",
                "64",
                "128",
                "--amp",
                "--lr",
                "0.001",
                "--note",
                "; rm -rf ~ $(x) \"q\""
            ]
        );
        let null_gpus = one(r#"{"git_ref": "main", "entrypoint": "t.py", "gpus": null}"#);
        assert_eq!(null_gpus.gpus, None);
    }

    #[test]
    fn arrays_of_jobs() {
        let jobs =
            parse_jobs(r#"[{"branch": "main", "train_path": "a.py"}, {"git_ref": "dev", "entrypoint": "b.py"}]"#)
                .unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].git_ref, "dev");
        let m = err(
            r#"[{"branch": "main", "train_path": "a.py"}, {"branch": "x", "train_path": "../b.py", "name": "bad"}]"#,
        );
        assert!(m.contains("job 2 of 2") && m.contains("bad") && m.contains("../b.py"), "{m}");
        assert!(err("[]").contains("empty"));
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let m = err("{\n  \"branch\": \"develop\"\n  \"train_path\": \"x.py\"\n}");
        assert!(m.contains("line 3, column 3"), "{m}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let m = err(r#"{"git_ref": "main", "entrypoint": "t.py", "colour": 1}"#);
        assert!(m.contains("colour"), "{m}");
        assert!(err(r#"{"branch": "main", "entrypoint": "t.py"}"#).contains("use one"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "/etc/passwd"}"#).contains("absolute"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "a/../../x.py"}"#).contains("leaves the repository"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "env": {"LD_PRELOAD": "x"}}"#).contains("LD_PRELOAD"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "env": {"PYTHONPATH": "x"}}"#).contains("PYTHONPATH"));
        for key in
            ["PIP_INDEX_URL", "https_proxy", "HTTPS_PROXY", "GIT_CONFIG_COUNT", "CC", "LDSHARED", "PYTHONSAFEPATH"]
        {
            let text = format!(r#"{{"git_ref": "main", "entrypoint": "t.py", "env": {{"{key}": "x"}}}}"#);
            assert!(err(&text).contains(key), "{key} is refused");
        }
        for key in ["WANDB_MODE", "OMP_NUM_THREADS", "NCCL_DEBUG", "HF_HOME", "MY_FLAG", "CUDA_LAUNCH_BLOCKING"] {
            assert!(env_var_allowed(key), "{key} is an ordinary variable");
        }
        assert!(
            err(r#"{"git_ref": "main", "entrypoint": "t.py", "env": {"GPUPOOL_JOB_ID": "1"}}"#)
                .contains("GPUPOOL_JOB_ID")
        );
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "args": {"o": {"a": 1}}}"#).contains("object"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "queue": "a b"}"#).contains("queue"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "gpus": -1}"#).contains("`gpus`"));
        assert!(err(r#"{"git_ref": "main", "entrypoint": "t.py", "timeout": "soon"}"#).contains("soon"));
        assert!(err(r#"{"git_ref": "-x", "entrypoint": "t.py"}"#).contains("git_ref"));
        assert!(err(r#"{"train_path": "t.py"}"#).contains("branch"));
        assert!(err(r#""just a string""#).contains("a string"));
        let big = format!(r#"{{"git_ref": "main", "entrypoint": "t.py", "args": {{"x": "{}"}}}}"#, "a".repeat(70_000));
        assert!(err(&big).contains("limit"));
    }

    #[test]
    fn stored_json_round_trips() {
        let spec = one(SEED);
        let text = spec.to_json().unwrap();
        assert_eq!(JobSpec::from_stored_json(&text).unwrap(), spec);
    }
}
