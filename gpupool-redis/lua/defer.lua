-- ARGV: prefix, id, token, pause (ms). Gives the job back uncharged, held
-- back for `pause` by the server's clock (`hold` in jobs.lua).
local id, token, pause = ARGV[2], ARGV[3], ARGV[4]
adopt(id, token)
if not held(id, token) then return -1 end
unlease(id)
hold(id, string.format('%d', tonumber(now_ms()) + tonumber(pause)))
return 1
