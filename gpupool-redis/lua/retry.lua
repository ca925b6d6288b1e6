-- ARGV: prefix, id. Returns 'missing', 'ok' or the state that cannot be retried.
local id = ARGV[2]
local h = jkey(id)
local state = redis.call('HGET', h, 'state')
if not state then return 'missing' end
if state ~= 'failed' and state ~= 'cancelled' then return state end
local v = redis.call('HMGET', h, 'attempt', 'max_attempts')
redis.call('HSET', h, 'cancel', 0, 'finished', '', 'not_before', '', 'attempt_limit', tonumber(v[1]) + tonumber(v[2]))
set_state(id, 'queued')
enqueue(id)
return 'ok'
