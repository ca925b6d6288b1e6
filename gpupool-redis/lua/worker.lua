-- ARGV: prefix, name, info JSON ('' = remove). Stamps Redis's clock.
local name, info = ARGV[2], ARGV[3]
if info == '' then
  redis.call('HDEL', P .. 'workers', name)
  redis.call('ZREM', P .. 'workers:seen', name)
  return 1
end
redis.call('HSET', P .. 'workers', name, info)
redis.call('ZADD', P .. 'workers:seen', now_ms(), name)
return 1
