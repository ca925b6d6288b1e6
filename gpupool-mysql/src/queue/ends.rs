//! Ends that finish together share one transaction: a `complete` that
//! carries a run's last output waits here, and one task writes what has
//! gathered while the previous transaction was being written, as
//! `reserve_many` leases a batch in one. One end alone is written as before
//! (the fenced append and the end, four statements); `k` together take six
//! (`BEGIN`, the holders locked, their logs' ends, one insert of every
//! piece, one update of every end, `COMMIT`): a worker whose slots finish
//! together costs the server fewer statements and one redo-log flush.

use std::collections::HashMap;
use std::sync::Arc;

use gpupool_core::{Completion, Error, Lease, Result};
use sqlx::Row;
use sqlx::mysql::MySqlPool;
use tokio::sync::{mpsc, oneshot};

use super::{LOCK_RETRIES, MAX_BATCH, Sql, append_log, q, trim_query};
use crate::error::{is_lock_conflict, map};

/// A `complete` waiting for its transaction.
pub(super) struct End {
    pub(super) lease: Lease,
    pub(super) done: Completion,
    pub(super) reply: oneshot::Sender<Result<()>>,
}

/// At most this much output goes in one batch (a batch holds at least
/// one end): well under MariaDB's default 16 MiB `max_allowed_packet`.
const BATCH_BYTES: usize = 4 << 20;

/// Starts the task that writes ends; it stops when the last sender goes.
pub(super) fn start(pool: MySqlPool, sql: Arc<Sql>) -> mpsc::UnboundedSender<End> {
    let (tx, mut rx) = mpsc::unbounded_channel::<End>();
    tokio::spawn(async move {
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(end) => end,
                None => match rx.recv().await {
                    Some(end) => end,
                    None => break,
                },
            };
            let mut bytes = first.done.log.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(end) if bytes + end.done.log.len() > BATCH_BYTES => {
                        next = Some(end);
                        break;
                    }
                    Ok(end) => {
                        bytes += end.done.log.len();
                        batch.push(end);
                    }
                    Err(_) => break,
                }
            }
            let each = write(&pool, &sql, &batch).await;
            for (end, outcome) in batch.into_iter().zip(each) {
                let _ = end.reply.send(outcome);
            }
        }
    });
    tx
}

/// Writes a batch of ends in one transaction (again on a lock conflict):
/// each end's outcome, `LeaseLost` for a lease that no longer holds. A
/// batch that fails otherwise is written one end at a time, so each end
/// gets its own outcome.
async fn write(pool: &MySqlPool, sql: &Sql, batch: &[End]) -> Vec<Result<()>> {
    if batch.len() > 1 {
        match retried(|| write_many(pool, sql, batch)).await {
            Ok(each) => return each,
            Err(e) => tracing::debug!("writing {} ends together failed ({e}); writing them one by one", batch.len()),
        }
    }
    let mut each = Vec::with_capacity(batch.len());
    for end in batch {
        let outcome = match retried(|| write_one(pool, sql, end)).await {
            Ok(mut one) => one.pop().unwrap_or(Ok(())),
            Err(e) => Err(e),
        };
        each.push(outcome);
    }
    each
}

/// `f`, again on a lock conflict (a few times).
async fn retried<F, Fut>(f: F) -> Result<Vec<Result<()>>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Vec<Result<()>>, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if is_lock_conflict(&e) && tries < LOCK_RETRIES => tries += 1,
            Err(e) => return Err(map(e)),
            Ok(each) => return Ok(each),
        }
    }
}

/// What the completion carries for the record: its result, commit and GPUs.
pub(super) fn facts(done: &Completion) -> (Option<String>, Option<String>, Option<String>) {
    let result = done.result.as_ref().map(ToString::to_string);
    let commit = done.run.as_ref().and_then(|r| r.commit.clone());
    let gpus = done.run.as_ref().map(|r| serde_json::to_string(&r.gpu_ids).unwrap_or_default());
    (result, commit, gpus)
}

/// One end: the piece appended by the fenced `INSERT … SELECT`, then the end.
async fn write_one(pool: &MySqlPool, sql: &Sql, end: &End) -> std::result::Result<Vec<Result<()>>, sqlx::Error> {
    let lost = || Ok(vec![Err(Error::lease_lost(end.lease.id()))]);
    let Ok(id) = end.lease.id().as_i64() else { return lost() };
    let (result, commit, gpus) = facts(&end.done);
    let mut tx = pool.begin().await?;
    let Some(trim) = append_log(sql, &mut *tx, id, &end.lease.token, &end.done.log).await? else {
        tx.rollback().await?;
        return lost();
    };
    if let Some(trim) = trim {
        trim.execute(&mut *tx).await?;
    }
    let ended = q(&sql.complete)
        .bind(end.done.output_tail.clone())
        .bind(result)
        .bind(commit)
        .bind(gpus)
        .bind(id)
        .bind(end.lease.token.clone())
        .execute(&mut *tx)
        .await?;
    if ended.rows_affected() == 0 {
        tx.rollback().await?;
        return lost();
    }
    tx.commit().await?;
    Ok(vec![Ok(())])
}

/// Several ends: the holders' rows locked (in id order), their logs' ends
/// read, every piece inserted and every end written in one statement each.
async fn write_many(pool: &MySqlPool, sql: &Sql, batch: &[End]) -> std::result::Result<Vec<Result<()>>, sqlx::Error> {
    let ids: Vec<i64> = batch.iter().map(|e| e.lease.id().as_i64().unwrap_or(-1)).collect();
    let mut tx = pool.begin().await?;
    let mut held = q(&sql.held_many[ids.len() - 1]);
    for id in &ids {
        held = held.bind(*id);
    }
    let mut holders = HashMap::new();
    for row in held.fetch_all(&mut *tx).await? {
        let (id, token): (i64, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
        holders.insert(id, token.unwrap_or_default());
    }
    // A job in the batch twice (a stale lease beside the live one, or an
    // end sent again) ends once.
    let mut live: Vec<usize> = Vec::new();
    for i in 0..batch.len() {
        let holds = holders.get(&ids[i]).is_some_and(|t| *t == batch[i].lease.token);
        if holds && !live.iter().any(|&j| ids[j] == ids[i]) {
            live.push(i);
        }
    }
    let outcome = |i: usize| if live.contains(&i) { Ok(()) } else { Err(Error::lease_lost(batch[i].lease.id())) };
    if live.is_empty() {
        tx.rollback().await?;
        return Ok((0..batch.len()).map(outcome).collect());
    }
    let logged: Vec<usize> = live.iter().copied().filter(|&i| !batch[i].done.log.is_empty()).collect();
    if !logged.is_empty() {
        let mut read = q(&sql.log_ends[logged.len() - 1]);
        for &i in &logged {
            read = read.bind(ids[i]);
        }
        let mut ends = HashMap::new();
        for row in read.fetch_all(&mut *tx).await? {
            let (id, end): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            ends.insert(id, end);
        }
        let mut insert = q(&sql.log_insert_many[logged.len() - 1]);
        let mut pieces = Vec::new();
        for &i in &logged {
            let start = ends.get(&ids[i]).copied().unwrap_or(0);
            let len = i64::try_from(batch[i].done.log.len()).unwrap_or(i64::MAX);
            insert = insert.bind(ids[i]).bind(start).bind(len).bind(batch[i].done.log.clone());
            pieces.push((ids[i], start, len));
        }
        insert.execute(&mut *tx).await?;
        for trim in pieces.into_iter().filter_map(|(id, start, len)| trim_query(sql, id, start, len)) {
            trim.execute(&mut *tx).await?;
        }
    }
    let mut update = q(&sql.complete_many[live.len() - 1]);
    let facts: Vec<_> = live.iter().map(|&i| facts(&batch[i].done)).collect();
    for &i in &live {
        update = update.bind(ids[i]).bind(batch[i].done.output_tail.clone());
    }
    for (n, &i) in live.iter().enumerate() {
        update = update.bind(ids[i]).bind(facts[n].0.clone());
    }
    for (n, &i) in live.iter().enumerate() {
        update = update.bind(ids[i]).bind(facts[n].1.clone());
    }
    for (n, &i) in live.iter().enumerate() {
        update = update.bind(ids[i]).bind(facts[n].2.clone());
    }
    for &i in &live {
        update = update.bind(ids[i]);
    }
    update.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok((0..batch.len()).map(outcome).collect())
}
