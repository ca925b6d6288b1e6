//! Waiting for other jobs (`after` in the job JSON): [`gate`] decides, when
//! a worker has leased a job, whether it runs now, waits, or ends
//! `cancelled` because a job it waits for failed.
//!
//! A waiting job holds no worker and no GPU: the worker that leased it
//! gives it back with [`Queue::defer`], to be looked
//! at again after a pause that grows with the wait ([`recheck`]: 2 s at
//! first, then a quarter of the time waited, at most 30 s). So the wait
//! costs the pool one reserve per waiting job per pause, works on every
//! backend that can delay a job, and a job starts at most 30 s after the
//! last job it waits for succeeded.
//!
//! Why here and not in each backend's reserve: the rule (every job
//! succeeded; one failed or cancelled cancels, unless `after_any`) is one
//! rule for every backend, the backends need only a delayed start (which
//! `not_before` and retry backoff need anyway), and a custom backend gets
//! dependencies by implementing `defer`.

use std::time::Duration;

use crate::job::{After, JobId, JobRecord, JobState, Timestamp};
use crate::queue::{ListFilter, Queue};
use crate::{Error, Result};

/// The shortest pause before a waiting job is looked at again.
pub const RECHECK_MIN: Duration = Duration::from_secs(2);
/// The longest.
pub const RECHECK_MAX: Duration = Duration::from_secs(30);

/// What to do with a leased job that names `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Every job it waits for has succeeded (or ended, with `after_any`),
    /// or it waits for none: run it.
    Run,
    /// Some are still queued or running: give it back for this long.
    Wait(Duration),
    /// One failed or was cancelled (or no longer exists): it ends
    /// `cancelled`, and this says why.
    Cancel(String),
}

/// How long a job that has waited `waited` so far waits before it is looked
/// at again: a quarter of that, between [`RECHECK_MIN`] and [`RECHECK_MAX`].
pub fn recheck(waited: Duration) -> Duration {
    (waited / 4).clamp(RECHECK_MIN, RECHECK_MAX)
}

/// Decides whether `job` may run now, reading the jobs it waits for from
/// `queue`. `now` is the caller's clock.
pub async fn gate(queue: &dyn Queue, job: &JobRecord, now: Timestamp) -> Result<Gate> {
    let Some(after) = &job.spec.after else { return Ok(Gate::Run) };
    let parents = parents(queue, after).await?;
    let mut pending = false;
    for (id, state) in &parents {
        match state {
            Some(JobState::Succeeded) => {}
            Some(JobState::Queued | JobState::Running) => pending = true,
            Some(_) | None if job.spec.after_any => {}
            Some(ended) => {
                return Ok(Gate::Cancel(format!("job {id}, which this job runs after, ended {ended}")));
            }
            None => {
                return Ok(Gate::Cancel(format!("job {id}, which this job runs after, is not in the queue")));
            }
        }
    }
    if parents.is_empty() {
        return Ok(Gate::Cancel("the sweep this job runs after has no runs".to_owned()));
    }
    if !pending {
        return Ok(Gate::Run);
    }
    let waited = Duration::from_millis(u64::try_from(now.0.saturating_sub(job.created_at.0)).unwrap_or(0));
    Ok(Gate::Wait(recheck(waited)))
}

/// The jobs `after` names, each with its state (`None`: no such job).
async fn parents(queue: &dyn Queue, after: &After) -> Result<Vec<(JobId, Option<JobState>)>> {
    match after {
        After::Jobs(ids) => {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let state = match queue.get(id).await {
                    Ok(job) => Some(job.state),
                    Err(Error::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                };
                out.push((id.clone(), state));
            }
            Ok(out)
        }
        After::Sweep { sweep } => {
            Ok(sweep_runs(queue, sweep).await?.into_iter().map(|j| (j.id, Some(j.state))).collect())
        }
    }
}

/// The runs of a sweep, oldest first.
pub async fn sweep_runs(queue: &dyn Queue, sweep: &str) -> Result<Vec<JobRecord>> {
    let mut runs: Vec<JobRecord> = crate::queue::all_jobs(queue, &ListFilter::default())
        .await?
        .into_iter()
        .filter(|j| j.spec.sweep.as_ref().is_some_and(|s| s.id == sweep))
        .collect();
    runs.reverse();
    Ok(runs)
}

/// `after: {"sweep": ID}` made into the list of the sweep's runs, and every
/// id checked to exist, as `gpupool push` does before it pushes: the jobs a
/// job waits for must exist when it is pushed, so no wait can be a cycle.
pub async fn resolve(queue: &dyn Queue, after: &After) -> Result<After> {
    match after {
        After::Jobs(ids) => {
            for id in ids {
                match queue.get(id).await {
                    Ok(_) => {}
                    Err(Error::NotFound { .. }) => {
                        return Err(Error::InvalidJob(format!("after: job {id} does not exist")));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(after.clone())
        }
        After::Sweep { sweep } => {
            let runs = sweep_runs(queue, sweep).await?;
            if runs.is_empty() {
                return Err(Error::InvalidJob(format!("after: sweep {sweep} has no runs in this queue")));
            }
            Ok(After::Jobs(runs.into_iter().map(|j| j.id).collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_grows_with_the_wait_within_its_bounds() {
        assert_eq!(recheck(Duration::ZERO), RECHECK_MIN);
        assert_eq!(recheck(Duration::from_secs(40)), Duration::from_secs(10));
        assert_eq!(recheck(Duration::from_secs(3600)), RECHECK_MAX);
    }
}
