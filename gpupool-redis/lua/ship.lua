-- A running job's output and live results (gpupool_core::RunLogs::ship).
-- The log is a stream per job, `log:ID`, one entry per piece, whose id is
-- `START-1` with START the piece's byte offset in the log, so a reader finds
-- an offset with one range read. `logkept:ID` counts the bytes kept; past
-- the cap, the oldest pieces go (never the one just added).
-- ARGV: prefix, id, token, result ('' keeps it), text ('' adds none), cap.
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
if ARGV[4] ~= '' then redis.call('HSET', jkey(id), 'result', ARGV[4]) end
local text = ARGV[5]
if text == '' then return 1 end
local log, kept = P .. 'log:' .. id, P .. 'logkept:' .. id
local start = 0
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
if last then
  start = tonumber(string.match(last[1], '^(%d+)-')) + tonumber(last[2][2])
end
redis.call('XADD', log, string.format('%d-1', start), 'len', string.format('%d', #text), 'text', text)
local total = redis.call('INCRBY', kept, #text)
local cap = tonumber(ARGV[6])
while total > cap do
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  if not first or tonumber(string.match(first[1], '^(%d+)-')) >= start then break end
  redis.call('XDEL', log, first[1])
  total = redis.call('DECRBY', kept, tonumber(first[2][2]))
end
return 1
