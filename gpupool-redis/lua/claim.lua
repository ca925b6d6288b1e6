-- A fresh delivery. ARGV: prefix, stream queue, entry id, job id, consumer, worker, token, lease_ms
local queue, entry, id, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local v = redis.call('HMGET', jkey(id), 'state', 'entry')
if v[1] ~= 'queued' or v[2] ~= entry then
  -- Stale: the job was cancelled, or this entry was replaced.
  redis.call('XACK', skey(queue), GROUP, entry)
  if v[2] ~= entry then redis.call('XDEL', skey(queue), entry) end
  return false
end
return start_lease(id, consumer, worker, token, lease_ms, now_ms())
