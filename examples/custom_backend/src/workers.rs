//! The [`WorkerRegistry`] of [`PgQueue`]: one row per worker, its
//! [`WorkerInfo`] as JSON, stamped with the database's clock, so
//! `gpupool status` can show every host and flag the silent ones.

use gpupool_core::{Error, Result, Timestamp, WorkerInfo, WorkerRegistry, async_trait};

use crate::PgQueue;
use crate::error::{BACKEND, map};
use crate::sql::{get, q};

#[async_trait]
impl WorkerRegistry for PgQueue {
    async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        let text = serde_json::to_string(info).map_err(|e| Error::backend(BACKEND, e))?;
        q(&self.sql.worker_upsert).bind(&info.name).bind(text).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    async fn unregister_worker(&self, name: &str) -> Result<()> {
        q(&self.sql.worker_delete).bind(name).execute(&self.pool).await.map_err(map)?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let rows = q(&self.sql.workers).fetch_all(&self.pool).await.map_err(map)?;
        let mut now = Timestamp::now();
        let all = rows
            .iter()
            .map(|row| {
                let seen = Timestamp(get(row, "seen_ms")?);
                now = Timestamp(get(row, "now_ms")?); // the database's clock
                gpupool_core::rows::worker_info(BACKEND, &get::<String>(row, "info")?, seen, now)
            })
            .collect::<Result<Vec<_>>>()?;
        // Silent for long: dropped (unless it reported again meanwhile).
        let (shown, gone) = gpupool_core::rows::split_gone(all, now);
        for w in gone {
            q(&self.sql.worker_gone).bind(&w.name).bind(w.seen_at.0).execute(&self.pool).await.map_err(map)?;
        }
        Ok(shown)
    }
}
