-- Shared by every gpupool script. ARGV[1] is the key prefix. Keys are built
-- here from the prefix, so gpupool needs a standalone Redis (not Cluster).
local P = ARGV[1]
local GROUP = 'gpupool'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function jkey(id) return P .. 'job:' .. id end
local function skey(queue) return P .. 'stream:' .. queue end

local function set_state(id, new)
  local h = jkey(id)
  local old = redis.call('HGET', h, 'state')
  if old then redis.call('ZREM', P .. 'state:' .. old, id) end
  redis.call('ZADD', P .. 'state:' .. new, id, id)
  redis.call('HSET', h, 'state', new)
end

-- A new stream entry for the job, at the back of its queue.
local function enqueue(id)
  local h = jkey(id)
  local e = redis.call('XADD', skey(redis.call('HGET', h, 'queue')), '*', 'job', id)
  redis.call('HSET', h, 'entry', e)
end

-- Acknowledge and delete the job's current stream entry.
local function drop_entry(id)
  local h = jkey(id)
  local e = redis.call('HGET', h, 'entry')
  if e and e ~= '' then
    local s = skey(redis.call('HGET', h, 'queue'))
    redis.call('XACK', s, GROUP, e)
    redis.call('XDEL', s, e)
  end
  redis.call('HSET', h, 'entry', '')
end

local function held(id, token)
  local v = redis.call('HMGET', jkey(id), 'state', 'token')
  return v[1] == 'running' and v[2] == token and token ~= ''
end

local function add_error(id, attempt, kind, exit_code, signal, message, tail, at)
  local rec = {job_id = tostring(id), attempt = tonumber(attempt), kind = kind, message = message,
               output_tail = tail, at = at}
  if exit_code ~= '' then rec.exit_code = tonumber(exit_code) end
  if signal ~= '' then rec.signal = tonumber(signal) end
  local json = cjson.encode(rec)
  redis.call('RPUSH', P .. 'errors:' .. id, json)
  redis.call('LPUSH', P .. 'errors', json)
  redis.call('LTRIM', P .. 'errors', 0, 9999)
end

-- Start a lease: attempt + 1, a token, an expiry, who holds it.
local function start_lease(id, consumer, worker, token, lease_ms, now)
  local h = jkey(id)
  set_state(id, 'running')
  redis.call('HINCRBY', h, 'attempt', 1)
  redis.call('HSET', h, 'token', token, 'expires', now + tonumber(lease_ms), 'consumer', consumer,
             'worker', worker, 'started', now, 'finished', '', 'exit_code', '', 'signal', '', 'gpu_ids', '')
  return {redis.call('HGETALL', h), redis.call('LRANGE', P .. 'errors:' .. id, 0, -1), now + tonumber(lease_ms)}
end
