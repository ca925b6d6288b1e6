-- ARGV: prefix, queue, max GPUs. Moves the oldest parked job that fits back
-- into its stream. Returns 1 if one moved.
local queue, max = ARGV[2], ARGV[3]
local key = P .. 'parked:' .. queue
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', max, 'LIMIT', 0, 1)
if #ids == 0 then return 0 end
redis.call('ZREM', key, ids[1])
if redis.call('HGET', jkey(ids[1]), 'state') == 'queued' then enqueue(ids[1]) end
return 1
