-- ARGV: prefix. Puts the jobs held back whose time has come (by the
-- server's clock) in line, up to 100 a call; a job that left `queued`
-- meanwhile (cancelled) is only dropped from the set. Returns how many
-- went in line.
local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now_ms(), 'LIMIT', 0, 100)
local n = 0
for _, id in ipairs(due) do
  redis.call('ZREM', P .. 'delayed', id)
  local v = redis.call('HMGET', jkey(id), 'state', 'entry')
  if v[1] == 'queued' and (v[2] == nil or v[2] == '') then
    enqueue(id)
    n = n + 1
  end
end
return n
