-- ARGV: prefix, id, token, lease_ms. Returns -1 (lost), 0 or 1 (cancel requested).
local id, token, lease_ms = ARGV[2], ARGV[3], ARGV[4]
adopt(id, token)
if not held(id, token) then return -1 end
local h = jkey(id)
local v = redis.call('HMGET', h, 'queue', 'entry', 'consumer', 'cancel')
-- Reset the entry's idle time so the reclaim pass leaves it alone.
redis.call('XCLAIM', skey(v[1]), GROUP, v[3], 0, v[2], 'JUSTID')
redis.call('HSET', h, 'expires', string.format('%d', tonumber(now_ms()) + tonumber(lease_ms)))
return tonumber(v[4])
