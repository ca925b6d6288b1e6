-- A running job's output and live results (gpupool_core::RunLogs::ship):
-- the text goes to the job's log (`append_log`, logappend.lua).
-- ARGV: prefix, id, token, result ('' keeps it), text ('' adds none), cap.
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
if ARGV[4] ~= '' then redis.call('HSET', jkey(id), 'result', ARGV[4]) end
if ARGV[5] ~= '' then append_log(id, ARGV[5], tonumber(ARGV[6])) end
return 1
