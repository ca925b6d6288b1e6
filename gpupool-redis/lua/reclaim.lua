-- An entry XAUTOCLAIM moved to us. ARGV: prefix, queue, entry, consumer, worker, token, lease_ms
local queue, entry, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local s = skey(queue)
local found = redis.call('XRANGE', s, entry, entry)
if #found == 0 then redis.call('XACK', s, GROUP, entry); return false end
local id = job_of(found[1][2])
if not id then redis.call('XACK', s, GROUP, entry); return false end
local h = jkey(id)
local r = claim_fields(id)
if r[1] ~= 'running' or r[2] ~= entry then
  redis.call('XACK', s, GROUP, entry)
  return false
end
local held_by = redis.call('HMGET', h, 'expires', 'consumer', 'attempt_limit', 'worker')
local now = now_ms()
if tonumber(held_by[1]) >= tonumber(now) then
  -- Not expired (its holder has a longer lease): give the entry back.
  redis.call('XCLAIM', s, GROUP, held_by[2], 0, entry, 'JUSTID')
  return false
end
add_error(id, r[3], 'lease_lost', '', '', 'lease expired: worker ' .. (held_by[4] or 'unknown') .. ' stopped heartbeating', '', now)
redis.call('HSET', h, 'token', '')
if r[6] == '1' then
  set_state(id, 'cancelled'); redis.call('HSET', h, 'finished', now); drop_entry(id)
  return false
end
if tonumber(r[3]) >= tonumber(held_by[3]) then
  set_state(id, 'failed'); redis.call('HSET', h, 'finished', now); drop_entry(id)
  return false
end
-- Attempts left: the entry is ours now, so is the job.
return start_lease(id, r, consumer, worker, token, lease_ms, now)
