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

-- Moves a job between the state indexes (its hash's `state` is set by the caller).
local function move_state(id, old, new)
  if old == new then return end
  if old then redis.call('ZREM', P .. 'state:' .. old, id) end
  redis.call('ZADD', P .. 'state:' .. new, id, id)
end

local function set_state(id, new)
  local h = jkey(id)
  move_state(id, redis.call('HGET', h, 'state'), new)
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

-- What a lease needs of a job, read in one HMGET: `local r = job_fields(id)`.
local LEASE_FIELDS = {'state', 'entry', 'attempt', 'spec', 'created', 'cancel', 'commit', 'output_tail', 'result',
                      'expires', 'consumer', 'attempt_limit', 'worker'}
local function job_fields(id)
  local v = redis.call('HMGET', jkey(id), unpack(LEASE_FIELDS))
  local r = {}
  for i, f in ipairs(LEASE_FIELDS) do r[f] = v[i] end
  return r
end

-- Start a lease on job `id` (`r` from `job_fields`, state `r.state`):
-- attempt + 1, a token, an expiry, who holds it. Returns what the client
-- builds the lease from: {id, spec, created, cancel, commit, output_tail,
-- result, attempt, started, expires, errors}; only a later attempt can have
-- errors or old outcome fields, so a first attempt skips those.
local function start_lease(id, r, consumer, worker, token, lease_ms, now)
  local h = jkey(id)
  local expires = now + tonumber(lease_ms)
  local attempt = tonumber(r.attempt) + 1
  move_state(id, r.state, 'running')
  redis.call('HSET', h, 'state', 'running', 'attempt', attempt, 'token', token, 'expires', expires,
             'consumer', consumer, 'worker', worker, 'started', now)
  local errors = {}
  if attempt > 1 then
    redis.call('HDEL', h, 'finished', 'exit_code', 'signal', 'gpu_ids')
    errors = redis.call('LRANGE', P .. 'errors:' .. id, 0, -1)
  end
  return {tostring(id), r.spec, r.created, r.cancel, r.commit, r.output_tail, r.result, attempt, now, expires, errors}
end

-- Leases the job of a freshly delivered stream entry. A stale entry (its job
-- was cancelled, or the entry was replaced by a newer one) is acknowledged,
-- deleted if replaced, and false is returned.
local function claim_entry(queue, entry, id, consumer, worker, token, lease_ms)
  local r = {}
  if id then r = job_fields(id) end
  if r.state == 'queued' and r.entry == entry then
    return start_lease(id, r, consumer, worker, token, lease_ms, now_ms())
  end
  local s = skey(queue)
  redis.call('XACK', s, GROUP, entry)
  if r.entry ~= entry then redis.call('XDEL', s, entry) end
  return false
end
