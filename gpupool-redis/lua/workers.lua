-- ARGV: prefix. Returns {now, {name, info, seen}...}
local out = {now_ms()}
local seen = redis.call('ZRANGE', P .. 'workers:seen', 0, -1, 'WITHSCORES')
for i = 1, #seen, 2 do
  local info = redis.call('HGET', P .. 'workers', seen[i])
  if info then out[#out + 1] = {seen[i], info, seen[i + 1]} end
end
return out
