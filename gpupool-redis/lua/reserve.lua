-- Reads the next new entry of a queue's stream and leases its job, in one
-- round trip; stale entries (cancelled jobs, replaced entries) are
-- acknowledged and skipped, a bounded number. Returns the lease as
-- `start_lease` does, or nil when the stream has nothing new.
-- ARGV: prefix, queue, consumer, worker, token, lease_ms
local queue, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local s = skey(queue)
for _ = 1, 100 do
  local got = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', s, '>')
  if not got then return false end
  -- {{stream, {{entry, fields}}}}
  local e = got[1][2][1]
  local lease = claim_entry(queue, e[1], e[2], consumer, worker, token, lease_ms)
  if lease then return lease end
end
return false
