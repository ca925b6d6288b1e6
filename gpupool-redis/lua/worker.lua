-- ARGV: prefix, name, info JSON ('' = remove), and for a removal, the
-- `seen` it is for ('' = any): a worker that reported since stays.
-- Stamps Redis's clock.
local name, info, only = ARGV[2], ARGV[3], ARGV[4]
if info == '' then
  if only and only ~= '' and tonumber(redis.call('ZSCORE', P .. 'workers:seen', name)) ~= tonumber(only) then
    return 0
  end
  redis.call('HDEL', P .. 'workers', name)
  redis.call('ZREM', P .. 'workers:seen', name)
  return 1
end
redis.call('HSET', P .. 'workers', name, info)
redis.call('ZADD', P .. 'workers:seen', now_ms(), name)
return 1
