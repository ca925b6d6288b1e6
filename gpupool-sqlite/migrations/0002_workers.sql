-- Workers register and heartbeat here (`gpupool status`).
CREATE TABLE workers (
    name    TEXT    PRIMARY KEY,
    info    TEXT    NOT NULL,   -- WorkerInfo as JSON
    seen_at INTEGER NOT NULL    -- Unix ms, this host's clock
);
