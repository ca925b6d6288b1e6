-- Helpers for the scripts that record a lease in the job's hash (claim,
-- reclaim).

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
-- errors or old outcome fields, so a first attempt skips those and its
-- reply ends before `errors`.
local function start_lease(id, r, consumer, worker, token, lease_ms, now)
  local h = jkey(id)
  local expires = string.format('%d', tonumber(now) + tonumber(lease_ms))
  local attempt = r[3] == '0' and '1' or string.format('%d', tonumber(r[3]) + 1)
  redis.call('HSET', h, 'state', 'running', 'attempt', attempt, 'token', token, 'expires', expires,
             'consumer', consumer, 'worker', worker, 'started', now)
  local lease = {id, r[4], r[5], r[6], r[7], r[8], r[9], attempt, now, expires}
  -- A first attempt sends no empty errors table: each table in a reply
  -- costs the server ~3k instructions to turn into RESP (callgrind), a
  -- tenth of a lease's reply.
  if attempt ~= '1' then
    redis.call('HDEL', h, 'finished', 'exit_code', 'signal', 'gpu_ids')
    lease[11] = redis.call('LRANGE', P .. 'errors:' .. id, 0, -1)
  end
  return lease
end

-- Leases job `id` of a freshly delivered stream entry `entry`. A stale
-- entry (its job was cancelled, or the entry was replaced by a newer one;
-- an older gpupool left such entries) is acknowledged, deleted if
-- replaced, and false is returned.
local function claim_entry(queue, entry, id, consumer, worker, token, lease_ms)
  local r = claim_fields(id)
  if r[1] == 'queued' and r[2] == entry then
    return start_lease(id, r, consumer, worker, token, lease_ms, now_ms())
  end
  local s = skey(queue)
  redis.call('XACK', s, GROUP, entry)
  if r[2] ~= entry then redis.call('XDEL', s, entry) end
  return false
end
