-- complete / cancelled. ARGV: prefix, id, token, state, output_tail, result, exit_code
local id, token, state = ARGV[2], ARGV[3], ARGV[4]
if not held(id, token) then return -1 end
local h = jkey(id)
drop_entry(id)
set_state(id, state)
redis.call('HSET', h, 'token', '', 'output_tail', ARGV[5], 'result', ARGV[6], 'finished', now_ms())
if ARGV[7] ~= '' then redis.call('HSET', h, 'exit_code', ARGV[7]) end
return 1
