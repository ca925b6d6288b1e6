//! `gpupool sweep FILE`, `gpupool sweeps` and `gpupool jobs --sweep ID`.

use std::collections::BTreeMap;
use std::path::Path;

use gpupool::sweep::{Metric, Sweep, metric_value, rank};
use gpupool::{Error, JobRecord, JobSpec, JobState, Pushed, Queue, Result};
use serde_json::{Value, json};

use crate::cli::{all_jobs, out, print_json};

/// Reads and checks a sweep file and makes its jobs.
fn read(file: &Path) -> Result<(Sweep, Vec<JobSpec>)> {
    let text =
        std::fs::read_to_string(file).map_err(|e| Error::Config(format!("cannot read {}: {e}", file.display())))?;
    // JSON is YAML too.
    let config: Value = yaml_serde::from_str(&text)
        .map_err(|e| Error::InvalidJob(format!("{}: not a YAML or JSON sweep: {e}", file.display())))?;
    let named = |e: Error| match e {
        Error::InvalidJob(m) => Error::InvalidJob(format!("{}: {m}", file.display())),
        other => other,
    };
    let sweep = Sweep::from_value(&config).map_err(named)?;
    let jobs = sweep.jobs().map_err(named)?;
    Ok((sweep, jobs))
}

/// `gpupool sweep FILE --dry-run`: the jobs, pushed nowhere.
pub(crate) fn dry_run(file: &Path, json: bool) -> Result<()> {
    let (sweep, jobs) = read(file)?;
    let specs: Vec<Value> = jobs.iter().map(|j| serde_json::to_value(j).unwrap_or(Value::Null)).collect();
    if json {
        print_json(&json!({"sweep": sweep.id, "jobs": specs}));
    } else {
        out(&format!("sweep {}: {} run(s); a dry run, nothing pushed\n", sweep.id, jobs.len()));
        for spec in specs {
            out(&format!("{spec}\n"));
        }
    }
    Ok(())
}

/// `gpupool sweep FILE`: pushes every run (each once: a run already
/// pushed is not pushed again).
pub(crate) async fn push(queue: &dyn Queue, file: &Path, json: bool) -> Result<()> {
    let (sweep, jobs) = read(file)?;
    if !queue.capabilities().priority && jobs.iter().any(|j| j.priority != 0) {
        crate::cli::say("warning: this backend runs jobs first in, first out and ignores `priority`");
    }
    let (mut ids, mut new) = (Vec::new(), 0usize);
    for job in jobs {
        match queue.add(job).await {
            Ok(Pushed::Existing(id)) => ids.push(id),
            Ok(pushed) => {
                new += 1;
                ids.push(pushed.into_id());
            }
            // What was pushed before the refusal stays, and is said.
            Err(e) => {
                crate::cli::say(&format!(
                    "sweep {}: {new} run(s) pushed, {} already there, before this error",
                    sweep.id,
                    ids.len() - new
                ));
                return Err(e);
            }
        }
    }
    if json {
        print_json(&json!({"sweep": sweep.id, "jobs": ids.iter().map(|i| i.as_str()).collect::<Vec<_>>()}));
    } else {
        let before = ids.len() - new;
        let already = if before > 0 { format!(", {before} already there") } else { String::new() };
        out(&format!("sweep {}: pushed {new} run(s){already}; see gpupool jobs --sweep {}\n", sweep.id, sweep.id));
    }
    Ok(())
}

/// The sweep's metric, as its runs carry it.
fn metric_of(runs: &[JobRecord]) -> Option<Metric> {
    runs.iter().find_map(|r| r.spec.sweep.as_ref()?.metric.clone())
}

/// A run's swept args, `k=v` apart.
fn args_cell(job: &JobRecord) -> String {
    job.spec
        .args
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `gpupool jobs --sweep ID`: its runs, best first by its metric.
pub(crate) async fn runs(queue: &dyn Queue, id: &str, json: bool) -> Result<()> {
    let mut runs = gpupool::after::sweep_runs(queue, id).await?;
    if runs.is_empty() {
        return Err(Error::NotFound { id: format!("sweep {id}") });
    }
    runs.sort_by_key(|r| r.spec.sweep.as_ref().map_or(0, |s| s.index));
    let metric = metric_of(&runs);
    if let Some(m) = &metric {
        rank(&mut runs, m);
    }
    if json {
        print_json(&Value::Array(runs.iter().map(JobRecord::to_json).collect()));
        return Ok(());
    }
    let keys = crate::result_keys(&runs);
    let mut header = vec!["ID", "STATE", "RUN", "ARGS"];
    header.extend(keys.iter().map(String::as_str));
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let mut row = vec![
                r.id.to_string(),
                r.state.as_str().to_owned(),
                r.spec.sweep.as_ref().map_or_else(String::new, |s| format!("#{}", s.index)),
                args_cell(r),
            ];
            let result = r.result.as_ref();
            row.extend(keys.iter().map(|k| crate::result_cell(result.and_then(|v| v.get(k)))));
            row
        })
        .collect();
    out(&crate::table(&header, &rows));
    if let Some(m) = &metric {
        let goal = if m.goal == gpupool::sweep::Goal::Minimize { "lowest" } else { "highest" };
        out(&format!("\nranked by {} ({goal} first)\n", m.name));
    }
    Ok(())
}

/// One sweep's progress.
#[derive(Default)]
struct Progress {
    name: Option<String>,
    metric: Option<Metric>,
    counts: BTreeMap<&'static str, usize>,
    total: usize,
    best: Option<(String, f64)>,
}

/// `gpupool sweeps`: each sweep's progress and its best run so far.
pub(crate) async fn list(queue: &dyn Queue, json: bool) -> Result<()> {
    let mut sweeps: BTreeMap<String, Progress> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for job in all_jobs(queue, None, None).await? {
        let Some(s) = &job.spec.sweep else { continue };
        if !sweeps.contains_key(&s.id) {
            order.push(s.id.clone());
        }
        let p = sweeps.entry(s.id.clone()).or_default();
        p.name.clone_from(&s.name);
        if p.metric.is_none() {
            p.metric.clone_from(&s.metric);
        }
        p.total += 1;
        let state = match job.state {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Cancelled => "cancelled",
            _ => "failed",
        };
        *p.counts.entry(state).or_default() += 1;
        if let (Some(m), JobState::Succeeded) = (&p.metric, job.state)
            && let Some(v) = metric_value(&job, &m.name)
        {
            let better = p.best.as_ref().is_none_or(|(_, b)| match m.goal {
                gpupool::sweep::Goal::Minimize => v < *b,
                gpupool::sweep::Goal::Maximize => v > *b,
            });
            if better {
                p.best = Some((job.id.to_string(), v));
            }
        }
    }
    let count = |p: &Progress, k: &str| p.counts.get(k).copied().unwrap_or(0);
    if json {
        let items: Vec<Value> = order
            .iter()
            .map(|id| {
                let p = &sweeps[id];
                json!({
                    "sweep": id, "name": p.name, "runs": p.total,
                    "queued": count(p, "queued"), "running": count(p, "running"),
                    "succeeded": count(p, "succeeded"), "failed": count(p, "failed"),
                    "cancelled": count(p, "cancelled"),
                    "metric": p.metric,
                    "best": p.best.as_ref().map(|(job, v)| json!({"job": job, "value": v})),
                })
            })
            .collect();
        print_json(&Value::Array(items));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = order
        .iter()
        .map(|id| {
            let p = &sweeps[id];
            let best = match (&p.metric, &p.best) {
                (Some(m), Some((job, v))) => format!("{}={} (job {job})", m.name, crate::result_cell(Some(&json!(v)))),
                (Some(m), None) => format!("{}: none yet", m.name),
                (None, _) => "-".to_owned(),
            };
            vec![
                id.clone(),
                p.name.clone().unwrap_or_else(|| "-".into()),
                p.total.to_string(),
                count(p, "queued").to_string(),
                count(p, "running").to_string(),
                count(p, "succeeded").to_string(),
                count(p, "failed").to_string(),
                count(p, "cancelled").to_string(),
                best,
            ]
        })
        .collect();
    let header = ["SWEEP", "NAME", "RUNS", "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "BEST"];
    out(&crate::table(&header, &rows));
    Ok(())
}
