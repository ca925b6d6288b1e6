-- A pending entry that has sat idle for its lease or `reclaim_idle` (queue.rs
-- pages through them with `XPENDING … IDLE`). If its lease has expired, the lost attempt is
-- recorded and the entry and its job become the caller's, or the job ends
-- `failed`/`cancelled`. Otherwise the lease stays its holder's (recorded in
-- the job's hash if it was not yet, as `adopt` does).
-- ARGV: prefix, queue, entry, consumer, worker, token, lease_ms
local queue, entry, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local s = skey(queue)
local found = redis.call('XRANGE', s, entry, entry)
local id = found[1] and job_of(found[1][2])
if not id then redis.call('XACK', s, GROUP, entry); return false end
local h = jkey(id)
-- A lease taken by a bare read and never recorded runs from the delivery,
-- for the length its consumer's name gives. Unexpired, it stays its
-- holder's and unrecorded (the holder's first call records it with its own
-- token). Expired, it is recorded now (`adopt`, with a token no holder
-- has), so that the lost attempt counts, and taken over below.
local hv = redis.call('HMGET', h, 'state', 'entry')
if hv[1] == 'queued' and hv[2] == entry then
  local p = pending(s, entry)
  if not p or p[3] < holder_lease(p[2]) then return false end
  adopt(id, '~' .. entry .. '~reclaimed')
end
local r = claim_fields(id)
if r[1] ~= 'running' or r[2] ~= entry then
  -- The entry of a job that moved on (finished since it was listed, or an
  -- older gpupool's leftovers).
  redis.call('XACK', s, GROUP, entry)
  return false
end
local held_by = redis.call('HMGET', h, 'expires', 'worker')
local now = now_ms()
-- Not expired (its holder has a longer lease, or just heartbeated).
if tonumber(held_by[1]) >= tonumber(now) then return false end
add_error(id, r[3], 'lease_lost', '', '', 'lease expired: worker ' .. (held_by[2] or 'unknown') .. ' stopped heartbeating', '', now)
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
