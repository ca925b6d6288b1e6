-- A delivered entry that a reserve does not lease by itself (queue.rs): one
-- that `enqueue` wrote (a later attempt, or a job given back), or one an
-- older gpupool wrote. ARGV: prefix, queue, entry id, job id, consumer,
-- worker, token, lease_ms
local queue, entry, id, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
return claim_entry(queue, entry, id, consumer, worker, token, lease_ms)
