-- complete with what the completion carries (Queue::completes_with_run):
-- the run's facts, when `started` did not record them, and its last output,
-- in the same step as the end.
-- ARGV: prefix, id, token, output_tail, result, commit, gpu_ids ('' when
-- the completion carries no facts), text ('' adds none), cap.
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
local h = jkey(id)
if ARGV[7] ~= '' then redis.call('HSET', h, 'commit', ARGV[6], 'gpu_ids', ARGV[7]) end
if ARGV[8] ~= '' then append_log(id, ARGV[8], tonumber(ARGV[9])) end
local v = redis.call('HMGET', h, 'entry', 'queue')
-- Acknowledged only, as finish.lua does.
if v[1] and v[1] ~= '' then redis.call('XACK', skey(v[2]), GROUP, v[1]) end
move_state(id, 'running', 'succeeded')
redis.call('HSET', h, 'state', 'succeeded', 'entry', '', 'token', '', 'output_tail', ARGV[4], 'result', ARGV[5],
           'finished', now_ms(), 'exit_code', '0')
return 1
