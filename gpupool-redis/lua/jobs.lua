-- Helpers for the scripts that move a job between lines and states.

local function set_state(id, new)
  local h = jkey(id)
  move_state(id, redis.call('HGET', h, 'state'), new)
  redis.call('HSET', h, 'state', new)
end

-- A new stream entry for the job, at the back of its queue.
local function enqueue(id)
  local h = jkey(id)
  local v = redis.call('HMGET', h, 'queue', 'spec')
  local e = redis.call('XADD', skey(v[1]), '*', 'job', id, 'spec', v[2])
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

