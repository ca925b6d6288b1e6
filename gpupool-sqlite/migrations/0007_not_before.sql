-- A queued job's earliest start (milliseconds since the epoch): its
-- `not_before`, a retry's backoff, or the next look at the jobs it runs
-- `after`. NULL for a job that may start at once, so the reserve's test
-- `not_before IS NULL OR not_before <= now` costs the usual job nothing.
ALTER TABLE jobs ADD COLUMN not_before INTEGER;
