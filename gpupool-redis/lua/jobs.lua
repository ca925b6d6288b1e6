-- Helpers for the scripts that move a job between lines and states.

local function set_state(id, new)
  local h = jkey(id)
  move_state(id, redis.call('HGET', h, 'state'), new)
  redis.call('HSET', h, 'state', new)
end

-- A new stream entry for the job, at the back of its queue. It carries the
-- id only: an entry with the spec (`push.lua`) is a first attempt, which a
-- reserve leases without a script (`adopt`); any other is leased by
-- `claim.lua`, which reads the job's earlier attempts.
local function enqueue(id)
  local h = jkey(id)
  local e = redis.call('XADD', skey(redis.call('HGET', h, 'queue')), '*', 'job', id)
  redis.call('HSET', h, 'entry', e)
end

-- Holds a queued job back until `at` (ms, a decimal string): no stream
-- entry until `promote.lua` finds it due in `PREFIXdelayed` (by time).
local function hold(id, at)
  redis.call('HSET', jkey(id), 'not_before', at, 'entry', '')
  redis.call('ZADD', P .. 'delayed', at, id)
end

-- The lease a consumer's name gives (`holder_worker` in states.lua).
local function holder_lease(consumer) return tonumber(string.match(consumer, '/(%d+)$') or '0') end

-- The group's pending-list row of entry `e` on stream `s`: {entry, consumer,
-- idle ms, deliveries}, or nil (not pending, or no group).
local function pending(s, e)
  local p = redis.pcall('XPENDING', s, GROUP, e, e, 1)
  if type(p) ~= 'table' or p.err then return nil end
  return p[1]
end

-- The entry and the consumer a bare read's token names
-- ('~' .. entry .. '~' .. nonce .. '~' .. consumer); nil for any other
-- token; no consumer for a token the reclaim pass made.
local function bare_entry(token)
  local e = string.match(token, '^~([^~]+)')
  return e, e and string.match(token, '^~[^~]+~[^~]+~(.+)$')
end

-- A lease taken by a bare `XREADGROUP` (a first attempt, see `take` in
-- queue.rs) is only the entry in the group's pending list: the job's hash
-- still says `queued` with that entry. The first script its holder runs
-- records it in the hash as `start_lease` would have: attempt + 1, the
-- token, the holder, the delivery time as its start and the lease counted
-- from then. When Redis handed the entry out twice (a restart that lost a
-- delivery), only a holder it is pending under records its token, the
-- first to call if it is pending under one consumer that got it twice
-- (each delivery's nonce differs); the other's calls fail `held`. Does
-- nothing for any other token or job; `held` then decides.
local function adopt(id, token)
  local e, consumer = bare_entry(token)
  if not e then return end
  local h = jkey(id)
  local v = redis.call('HMGET', h, 'state', 'entry', 'attempt', 'queue')
  if v[1] ~= 'queued' or v[2] ~= e then return end
  local p = pending(skey(v[4]), v[2])
  if not p or (consumer and p[2] ~= consumer) then return end
  local started = tonumber(now_ms()) - p[3]
  redis.call('HSET', h, 'state', 'running', 'attempt', string.format('%d', tonumber(v[3]) + 1), 'token', token,
             'expires', string.format('%d', started + holder_lease(p[2])), 'consumer', p[2],
             'worker', holder_worker(p[2]) or '', 'started', string.format('%d', started))
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

-- Gives a held job back uncharged: its entry goes, its attempt is as
-- before the lease, it is `queued` (the caller puts it in line or holds it
-- back).
local function unlease(id)
  drop_entry(id)
  redis.call('HSET', jkey(id), 'token', '')
  redis.call('HINCRBY', jkey(id), 'attempt', -1)
  set_state(id, 'queued')
end

-- The job id in a stream entry's fields ({'job', id, ...}), or nil.
local function job_of(fields)
  for i = 1, #fields, 2 do if fields[i] == 'job' then return fields[i + 1] end end
  return nil
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

