//! Waking a waiting `reserve` when a job becomes queued, with PostgreSQL's
//! `LISTEN`/`NOTIFY`.
//!
//! Whoever makes a job `queued` (push, release, retry, a requeued failure)
//! sends `NOTIFY {prefix}queued`. One task per [`PgQueue`](crate::PgQueue),
//! started by the first `reserve` that waits, holds one connection that
//! `LISTEN`s and wakes every waiting `reserve` in this process. A
//! notification can be missed (the listener reconnecting), and an expired
//! lease sends none, so waiters also look again after a bounded pause.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::task::JoinHandle;

/// How long the listener waits before connecting again after a failure.
const RECONNECT: Duration = Duration::from_secs(1);

/// The listening task and the waiters it wakes.
#[derive(Debug)]
pub(crate) struct Wakeup {
    pool: PgPool,
    channel: String,
    notify: Arc<Notify>,
    task: OnceLock<AbortOnDrop>,
}

/// Stops the listening task when the last clone of the queue is dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Wakeup {
    /// Listens on `channel` through `pool` once the first waiter asks.
    pub(crate) fn new(pool: PgPool, channel: String) -> Self {
        Wakeup { pool, channel, notify: Arc::new(Notify::new()), task: OnceLock::new() }
    }

    /// The channel to `NOTIFY`.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// A future that completes at the next notification. Create it *before*
    /// looking for work, so a push between the look and the wait is not
    /// missed. Must be called inside a tokio runtime (it may start the task).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.task.get_or_init(|| {
            let (pool, channel, notify) = (self.pool.clone(), self.channel.clone(), Arc::clone(&self.notify));
            AbortOnDrop(tokio::spawn(listen(pool, channel, notify)))
        });
        self.notify.notified()
    }
}

/// Forwards every notification on `channel` to `notify`, connecting again
/// after a failure, until aborted.
async fn listen(pool: PgPool, channel: String, notify: Arc<Notify>) {
    loop {
        let Err(e) = forward(&pool, &channel, &notify).await;
        tracing::warn!(%channel, "LISTEN failed ({}); waiting reserves poll until it is back", crate::error::map(e));
        tokio::time::sleep(RECONNECT).await;
    }
}

/// One listening connection: returns only when it fails.
async fn forward(pool: &PgPool, channel: &str, notify: &Notify) -> sqlx::Result<Infallible> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    loop {
        // `recv` reconnects by itself after a dropped connection.
        listener.recv().await?;
        notify.notify_waiters();
    }
}
