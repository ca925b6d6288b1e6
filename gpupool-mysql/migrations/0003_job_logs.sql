CREATE TABLE IF NOT EXISTS {prefix}job_logs (
    job_id BIGINT   NOT NULL,
    start  BIGINT   NOT NULL,
    len    BIGINT   NOT NULL,
    text   LONGTEXT NOT NULL,
    PRIMARY KEY (job_id, start)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
