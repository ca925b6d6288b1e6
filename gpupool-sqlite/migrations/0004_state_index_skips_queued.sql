-- jobs_state (state, id) no longer holds queued jobs, so a push writes one
-- index fewer and a reserve moves no entry out of it (about 6-10 us of
-- SQLite's ~60 us per push; BENCHMARKS.md). Queued jobs are found through
-- jobs_reserve (queue, state, ...), or by reading ids down. A query can use
-- this index only if it says `state <> 'queued'` itself.
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX jobs_state ON jobs (state, id) WHERE state <> 'queued';
