-- Deletes the stream entries the group is done with: every entry older than
-- the oldest pending one or, with nothing pending, every delivered one. A
-- completed job's entry is only acknowledged (`finish.lua`); this pass, run
-- with the once-a-second sweep, deletes it. ARGV: prefix, queue. Returns the
-- number of entries deleted.
local s = skey(ARGV[2])
if redis.call('EXISTS', s) == 0 then return 0 end
local p = redis.pcall('XPENDING', s, GROUP)
if type(p) == 'table' and p.err then return 0 end
local minid
if tonumber(p[1]) > 0 then
  minid = p[2]
else
  local last = last_delivered(s)
  if not last then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  if not ms then return 0 end
  minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
return redis.call('XTRIM', s, 'MINID', minid)
