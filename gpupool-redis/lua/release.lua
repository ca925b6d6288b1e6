-- ARGV: prefix, id, token
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
drop_entry(id)
redis.call('HSET', jkey(id), 'token', '')
redis.call('HINCRBY', jkey(id), 'attempt', -1)
set_state(id, 'queued')
enqueue(id)
return 1
