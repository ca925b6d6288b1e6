-- A pending entry that has sat idle for `reclaim_idle` (queue.rs lists them
-- with `XPENDING … IDLE`). If its lease has expired, the lost attempt is
-- recorded and the entry and its job become the caller's, or the job ends
-- `failed`/`cancelled`. Otherwise nothing changes.
-- ARGV: prefix, queue, entry, consumer, worker, token, lease_ms
local queue, entry, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local s = skey(queue)
local row = pending(s, entry)
if not row then return false end
local found = redis.call('XRANGE', s, entry, entry)
local id = found[1] and job_of(found[1][2])
if not id then redis.call('XACK', s, GROUP, entry); return false end
local h = jkey(id)
local r = claim_fields(id)
local now = now_ms()
local lost_by
if r[1] == 'queued' and r[2] == entry then
  -- Leased by a bare read and never recorded (`adopt`): its lease is the
  -- one its consumer's name gives, counted from the delivery.
  if row[3] < holder_lease(row[2]) then return false end
  r[3] = string.format('%d', tonumber(r[3]) + 1)
  redis.call('HSET', h, 'state', 'running', 'attempt', r[3], 'started', string.format('%d', tonumber(now) - row[3]))
  lost_by = holder_worker(row[2])
elseif r[1] == 'running' and r[2] == entry then
  local held_by = redis.call('HMGET', h, 'expires', 'worker')
  -- Not expired (its holder has a longer lease, or just heartbeated).
  if tonumber(held_by[1]) >= tonumber(now) then return false end
  lost_by = held_by[2]
else
  -- The entry of a job that moved on (an older gpupool's leftovers).
  redis.call('XACK', s, GROUP, entry)
  return false
end
add_error(id, r[3], 'lease_lost', '', '', 'lease expired: worker ' .. (lost_by or 'unknown') .. ' stopped heartbeating', '', now)
redis.call('HSET', h, 'token', '')
-- The entry is the caller's now, whatever becomes of the job.
redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')
if r[6] == '1' then
  set_state(id, 'cancelled'); redis.call('HSET', h, 'finished', now); drop_entry(id)
  return false
end
if tonumber(r[3]) >= tonumber(redis.call('HGET', h, 'attempt_limit')) then
  set_state(id, 'failed'); redis.call('HSET', h, 'finished', now); drop_entry(id)
  return false
end
return start_lease(id, r, consumer, worker, token, lease_ms, now)
