-- Running jobs' shipped output (gpupool_core::RunLogs): one row per piece a
-- worker shipped, addressed by its byte offset in the job's log. The oldest
-- pieces go once a job keeps more than 16 MiB.
CREATE TABLE IF NOT EXISTS job_logs (
    job_id INTEGER NOT NULL,
    start  INTEGER NOT NULL,
    len    INTEGER NOT NULL,
    text   TEXT NOT NULL,
    PRIMARY KEY (job_id, start)
) WITHOUT ROWID;
