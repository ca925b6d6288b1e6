-- ARGV: prefix, id. Returns 'missing', 'cancelled', 'requested' or 'ended:STATE'.
local id = ARGV[2]
local h = jkey(id)
local v = redis.call('HMGET', h, 'state', 'entry', 'queue')
local state = v[1]
if not state then return 'missing' end
-- A queued job whose entry is pending was leased by a bare read (`adopt`):
-- it runs, and its holder learns of the cancel at its next call.
if state == 'queued' and v[2] and v[2] ~= '' and pending(skey(v[3]), v[2]) then
  state = 'running'
end
if state == 'queued' then
  drop_entry(id)
  redis.call('ZREM', P .. 'parked:' .. v[3], id)
  redis.call('ZREM', P .. 'delayed', id)
  set_state(id, 'cancelled')
  redis.call('HSET', h, 'finished', now_ms())
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', h, 'cancel', 1)
  return 'requested'
end
return 'ended:' .. state
