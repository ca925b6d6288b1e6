-- ARGV: prefix, id, token, gpus. The job waits in PREFIXparked:QUEUE (score:
-- GPUs needed) instead of its stream, until a big enough worker reserves.
local id, token, gpus = ARGV[2], ARGV[3], ARGV[4]
adopt(id, token)
if not held(id, token) then return -1 end
local h = jkey(id)
unlease(id)
redis.call('ZADD', P .. 'parked:' .. redis.call('HGET', h, 'queue'), tonumber(gpus), id)
return 1
