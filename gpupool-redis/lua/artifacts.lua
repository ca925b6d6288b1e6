-- Where a job's run left its files (gpupool_core::Queue::record_artifacts):
-- kept unless the job holds a later attempt's (Artifacts::replaces).
-- ARGV: prefix, id, attempt, artifacts (JSON). Returns -1 for an unknown
-- job, 0 when a later attempt's are kept, 1 when set.
local h = jkey(ARGV[2])
if redis.call('EXISTS', h) == 0 then return -1 end
local attempt = tonumber(ARGV[3])
local kept = tonumber(redis.call('HGET', h, 'artifacts_attempt'))
if kept and kept > attempt then return 0 end
redis.call('HSET', h, 'artifacts', ARGV[4], 'artifacts_attempt', ARGV[3])
return 1
