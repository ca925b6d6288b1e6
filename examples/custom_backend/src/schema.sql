-- The whole schema, run by `gpupool init`. Every statement is idempotent, so
-- running it again (from any host) changes nothing. `{p}` becomes the table
-- prefix. Invariant: `lease_token` is set exactly while `state = 'running'`,
-- so `WHERE id = $1 AND lease_token = $2` alone fences a lease holder.

CREATE TABLE IF NOT EXISTS {p}jobs (
    id               BIGSERIAL   PRIMARY KEY,
    queue            TEXT        NOT NULL,
    state            TEXT        NOT NULL,            -- queued | running | succeeded | failed | cancelled
    priority         INTEGER     NOT NULL,
    gpus             INTEGER,                         -- NULL: one GPU on a GPU host, else the CPU
    spec             TEXT        NOT NULL,            -- the pushed JobSpec as JSON text (JSONB would reorder args)
    idempotency_key  TEXT        UNIQUE,
    attempt          INTEGER     NOT NULL DEFAULT 0,  -- runs started
    max_attempts     INTEGER     NOT NULL,
    attempt_limit    INTEGER     NOT NULL,            -- max_attempts, raised by each retry
    lease_token      TEXT,
    lease_expires_at TIMESTAMPTZ,
    cancel_requested BOOLEAN     NOT NULL DEFAULT FALSE,
    worker           TEXT,
    commit_sha       TEXT,
    gpu_ids          INTEGER[],
    exit_code        INTEGER,
    term_signal      INTEGER,
    output_tail      TEXT,
    result           TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);

-- The reserve query: one queue's queued jobs, best first. Partial, so it
-- holds only what is waiting.
CREATE INDEX IF NOT EXISTS {p}jobs_reserve ON {p}jobs (queue, priority DESC, id) WHERE state = 'queued';

-- Finding expired leases.
CREATE INDEX IF NOT EXISTS {p}jobs_lease ON {p}jobs (lease_expires_at) WHERE state = 'running';

-- `gpupool jobs --state S`.
CREATE INDEX IF NOT EXISTS {p}jobs_state ON {p}jobs (state, id);

CREATE TABLE IF NOT EXISTS {p}job_errors (
    id          BIGSERIAL   PRIMARY KEY,
    job_id      BIGINT      NOT NULL REFERENCES {p}jobs (id) ON DELETE CASCADE,
    attempt     INTEGER     NOT NULL,
    kind        TEXT        NOT NULL,                 -- exit | signal | timeout | setup | ref | repo | lease_lost | oom
    exit_code   INTEGER,
    term_signal INTEGER,
    message     TEXT        NOT NULL,
    output_tail TEXT        NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Where the last run left its files (gpupool_core::Artifacts as JSON), added
-- after the first release: tables made before it get the column here.
ALTER TABLE {p}jobs ADD COLUMN IF NOT EXISTS artifacts TEXT;

CREATE INDEX IF NOT EXISTS {p}job_errors_job ON {p}job_errors (job_id, id);

CREATE TABLE IF NOT EXISTS {p}workers (
    name    TEXT        PRIMARY KEY,
    info    TEXT        NOT NULL,                     -- the WorkerInfo as JSON
    seen_at TIMESTAMPTZ NOT NULL
);
