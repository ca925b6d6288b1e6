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
  local last = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    local name, delivered
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
    if name == GROUP then last = delivered end
  end
  if not last then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  if not ms then return 0 end
  minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
return redis.call('XTRIM', s, 'MINID', minid)
