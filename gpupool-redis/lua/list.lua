-- ARGV: prefix, index ('all', 'state:S' or 'queue:Q'), filter field ('' = none), filter value, offset, limit
local index, field, value, offset, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
if index == 'all' then
  -- Every id from `seq` down: ids are dense and jobs are never deleted.
  local id = (tonumber(redis.call('GET', P .. 'seq')) or 0) - offset
  while #out < limit and id >= 1 do
    out[#out + 1] = tostring(id)
    id = id - 1
  end
  return out
end
local skipped, start = 0, 0
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
