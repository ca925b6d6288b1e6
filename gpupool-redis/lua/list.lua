-- ARGV: prefix, index ('all', 'state:S' or 'queue:Q'), filter field ('' = none), filter value, offset, limit
local index, field, value, offset, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local out, skipped, start = {}, 0, 0
while #out < limit do
  local ids = redis.call('ZREVRANGE', P .. index, start, start + 199)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if field == '' or redis.call('HGET', jkey(id), field) == value then
      if skipped < offset then skipped = skipped + 1
      elseif #out < limit then out[#out + 1] = id end
    end
  end
  start = start + 200
end
return out
