-- ARGV: prefix, id. Returns 'missing', 'cancelled', 'requested' or 'ended:STATE'.
local id = ARGV[2]
local h = jkey(id)
local state = redis.call('HGET', h, 'state')
if not state then return 'missing' end
if state == 'queued' then
  drop_entry(id)
  redis.call('ZREM', P .. 'parked:' .. redis.call('HGET', h, 'queue'), id)
  set_state(id, 'cancelled')
  redis.call('HSET', h, 'finished', now_ms())
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', h, 'cancel', 1)
  return 'requested'
end
return 'ended:' .. state
