-- complete / cancelled. ARGV: prefix, id, token, state, output_tail, result, exit_code
local id, token, state = ARGV[2], ARGV[3], ARGV[4]
local h = jkey(id)
local v = redis.call('HMGET', h, 'state', 'token', 'entry', 'queue')
if v[1] ~= 'running' or v[2] ~= token or token == '' then return -1 end
-- Acknowledged only: `trim.lua` deletes done entries in bulk, which costs
-- the server less than an XDEL per job.
if v[3] and v[3] ~= '' then redis.call('XACK', skey(v[4]), GROUP, v[3]) end
move_state(id, 'running', state)
redis.call('HSET', h, 'state', state, 'entry', '', 'token', '', 'output_tail', ARGV[5], 'result', ARGV[6],
           'finished', now_ms(), 'exit_code', ARGV[7])
return 1
