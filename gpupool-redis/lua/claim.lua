-- A fresh delivery. ARGV: prefix, stream queue, entry id, job id, consumer, worker, token, lease_ms
local queue, entry, id, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local r = job_fields(id)
if r.state ~= 'queued' or r.entry ~= entry then
  -- Stale: the job was cancelled, or this entry was replaced.
  redis.call('XACK', skey(queue), GROUP, entry)
  if r.entry ~= entry then redis.call('XDEL', skey(queue), entry) end
  return false
end
return start_lease(id, r, consumer, worker, token, lease_ms, now_ms())
