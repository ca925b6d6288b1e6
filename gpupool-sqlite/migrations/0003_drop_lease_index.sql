-- The expiry sweep finds running jobs through jobs_state (state, id): they
-- are few (one per busy slot), so a second index on (state,
-- lease_expires_at) bought nothing and cost every push, reserve and
-- heartbeat a B-tree write.
DROP INDEX IF EXISTS jobs_lease;
