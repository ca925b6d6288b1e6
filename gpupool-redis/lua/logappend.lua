-- Appends `text` to job `id`'s shipped log: a stream per job, `log:ID`, one
-- entry per piece, whose id is `START-1` with START the piece's byte offset
-- in the log, so a reader finds an offset with one range read.
-- `logkept:ID` counts the bytes kept; past `cap`, the oldest pieces go
-- (never the one just added).
local function append_log(id, text, cap)
  local log, kept = P .. 'log:' .. id, P .. 'logkept:' .. id
  local start = 0
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  if last then
    start = tonumber(string.match(last[1], '^(%d+)-')) + tonumber(last[2][2])
  end
  redis.call('XADD', log, string.format('%d-1', start), 'len', string.format('%d', #text), 'text', text)
  local total = redis.call('INCRBY', kept, #text)
  while total > cap do
    local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
    if not first or tonumber(string.match(first[1], '^(%d+)-')) >= start then break end
    redis.call('XDEL', log, first[1])
    total = redis.call('DECRBY', kept, tonumber(first[2][2]))
  end
end
