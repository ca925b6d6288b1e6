-- Shared by every gpupool script. ARGV[1] is the key prefix. Keys are built
-- here from the prefix, so gpupool needs a standalone Redis (not Cluster).
--
-- Hot paths (push, reserve, finish) avoid Lua numbers where they can: a
-- number handed to `redis.call` is formatted with `%.14g`, which costs the
-- server more than the command it goes to (measured with callgrind; see
-- BENCHMARKS.md). Times and counters travel as decimal strings.
local P = ARGV[1]
local GROUP = 'gpupool'

-- Milliseconds since the epoch, by the server's clock, as a decimal string.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.sub(string.format('%06d', t[2]), 1, 3)
end

local function jkey(id) return P .. 'job:' .. id end
local function skey(queue) return P .. 'stream:' .. queue end

-- Only the states that end a job badly have an index (`PREFIXstate:S`, a
-- sorted set by id): they are few, and `jobs --state failed` must not scan.
-- Queued and running jobs are read from the streams and their pending
-- lists, succeeded ones by counting down the ids (`list.lua`), so the hot
-- paths touch no index.
local function indexed(state) return state == 'failed' or state == 'cancelled' end

-- Moves a job between the state indexes (its hash's `state` is set by the caller).
local function move_state(id, old, new)
  if old == new then return end
  if old and indexed(old) then redis.call('ZREM', P .. 'state:' .. old, id) end
  if indexed(new) then redis.call('ZADD', P .. 'state:' .. new, id, id) end
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

-- The id of the last entry the group was handed on stream `s`, or nil.
local function last_delivered(s)
  local groups = redis.pcall('XINFO', 'GROUPS', s)
  if type(groups) ~= 'table' or groups.err then return nil end
  for _, g in ipairs(groups) do
    local name, delivered
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
    if name == GROUP then return delivered end
  end
  return nil
end

local function held(id, token)
  local v = redis.call('HMGET', jkey(id), 'state', 'token')
  return v[1] == 'running' and v[2] == token and token ~= ''
end

local function add_error(id, attempt, kind, exit_code, signal, message, tail, at)
  local rec = {job_id = tostring(id), attempt = tonumber(attempt), kind = kind, message = message,
               output_tail = tail, at = tonumber(at)}
  if exit_code ~= '' then rec.exit_code = tonumber(exit_code) end
  if signal ~= '' then rec.signal = tonumber(signal) end
  local json = cjson.encode(rec)
  redis.call('RPUSH', P .. 'errors:' .. id, json)
  redis.call('LPUSH', P .. 'errors', json)
  redis.call('LTRIM', P .. 'errors', 0, 9999)
end

-- What a lease is built from, in one HMGET: {state, entry, attempt, spec,
-- created, cancel, commit, output_tail, result}. (Positions, not names: a
-- table built per call is garbage the server's Lua must collect.)
local function claim_fields(id)
  return redis.call('HMGET', jkey(id), 'state', 'entry', 'attempt', 'spec', 'created', 'cancel', 'commit',
                    'output_tail', 'result')
end

-- Start a lease on job `id` (`r` from `claim_fields`): attempt + 1, a token,
-- an expiry, who holds it. `now` is `now_ms()`. Returns what the client
-- builds the lease from: {id, spec, created, cancel, commit, output_tail,
-- result, attempt, started, expires, errors}; only a later attempt can have
-- errors or old outcome fields, so a first attempt skips those.
local function start_lease(id, r, consumer, worker, token, lease_ms, now)
  local h = jkey(id)
  local expires = string.format('%d', tonumber(now) + tonumber(lease_ms))
  local attempt = string.format('%d', tonumber(r[3]) + 1)
  redis.call('HSET', h, 'state', 'running', 'attempt', attempt, 'token', token, 'expires', expires,
             'consumer', consumer, 'worker', worker, 'started', now)
  local errors = {}
  if attempt ~= '1' then
    redis.call('HDEL', h, 'finished', 'exit_code', 'signal', 'gpu_ids')
    errors = redis.call('LRANGE', P .. 'errors:' .. id, 0, -1)
  end
  return {id, r[4], r[5], r[6], r[7], r[8], r[9], attempt, now, expires, errors}
end

-- Leases the job of a freshly delivered stream entry. A stale entry (its job
-- was cancelled, or the entry was replaced by a newer one) is acknowledged,
-- deleted if replaced, and false is returned.
local function claim_entry(queue, entry, id, consumer, worker, token, lease_ms)
  local r = {}
  if id then r = claim_fields(id) end
  if r[1] == 'queued' and r[2] == entry then
    return start_lease(id, r, consumer, worker, token, lease_ms, now_ms())
  end
  local s = skey(queue)
  redis.call('XACK', s, GROUP, entry)
  if r[2] ~= entry then redis.call('XDEL', s, entry) end
  return false
end
