-- gpupool SQLite schema, version 1. Times are Unix milliseconds (UTC).
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    gpus             INTEGER,                -- NULL: one GPU where the worker has any, else the CPU
    spec             TEXT    NOT NULL,       -- the pushed JobSpec as JSON text (args keep their order)
    idempotency_key  TEXT    UNIQUE,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    attempt_limit    INTEGER NOT NULL,       -- max_attempts, raised by each retry
    lease_token      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    commit_sha       TEXT,
    gpu_ids          TEXT,                   -- JSON array of GPU indices
    exit_code        INTEGER,
    signal           INTEGER,
    output_tail      TEXT,
    result           TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);

-- The reserve query: one queue, queued, highest priority, then oldest.
CREATE INDEX jobs_reserve ON jobs (queue, state, priority DESC, id);
-- The expiry sweep: running jobs whose lease ended.
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);
-- `gpupool jobs --state S`, newest first.
CREATE INDEX jobs_state ON jobs (state, id);

CREATE TABLE job_errors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    exit_code   INTEGER,
    signal      INTEGER,
    message     TEXT    NOT NULL,
    output_tail TEXT    NOT NULL,
    at          INTEGER NOT NULL
);
CREATE INDEX job_errors_job ON job_errors (job_id, id);
