-- ARGV: prefix, spec, queue, priority, gpus ('' = null), max_attempts, idempotency key ('' = none)
local spec, queue, priority, gpus, max_attempts, idem = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if idem ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. idem)
  if existing then return existing end
end
local id = redis.call('INCR', P .. 'seq')
local now = now_ms()
redis.call('HSET', jkey(id), 'id', id, 'spec', spec, 'queue', queue, 'priority', priority, 'gpus', gpus,
           'attempt', 0, 'max_attempts', max_attempts, 'attempt_limit', max_attempts, 'token', '',
           'cancel', 0, 'created', now, 'entry', '')
redis.call('ZADD', P .. 'all', id, id)
redis.call('ZADD', P .. 'queue:' .. queue, id, id)
set_state(id, 'queued')
if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, id) end
enqueue(id)
return tostring(id)
