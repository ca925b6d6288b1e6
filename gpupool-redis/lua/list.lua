-- ARGV: prefix, state ('' = any), queue ('' = any), offset, limit.
-- Returns job ids, newest first:
-- - any state: ids counted down from `seq` (ids are dense and jobs are never
--   deleted), or the queue's index `PREFIXqueue:Q`;
-- - failed, cancelled: their index `PREFIXstate:S`;
-- - running: the entries pending in the streams' group, by id (a job
--   leased by a bare read and not yet recorded among them);
-- - queued: the streams' unread entries, last in line first (for a job
--   never sent back, that is newest first), then parked jobs by id;
-- - succeeded: ids counted down as for any state, keeping the succeeded.
local state, queue, offset, limit = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local out, skipped = {}, 0

-- Offers ids in order; true once the page is full.
local function take(id)
  if skipped < offset then skipped = skipped + 1 elseif #out < limit then out[#out + 1] = id end
  return #out >= limit
end

local function state_is(id, want, entry)
  local v = redis.call('HMGET', jkey(id), 'state', 'entry')
  return v[1] == want and (entry == nil or v[2] == entry)
end

-- Ids newest first, from `seq` down or from a sorted-set index, with a filter.
local function walk(index, keep)
  if index == nil then
    -- Ids skipped already (`skipped`) need not be looked at.
    local id = (tonumber(redis.call('GET', P .. 'seq')) or 0) - skipped
    while id >= 1 do
      local s = string.format('%d', id)
      if keep(s) and take(s) then return end
      id = id - 1
    end
    return
  end
  local start = 0
  while true do
    local ids = redis.call('ZREVRANGE', index, start, start + 199)
    if #ids == 0 then return end
    for _, id in ipairs(ids) do
      if keep(id) and take(id) then return end
    end
    start = start + 200
  end
end

local queues = {queue}
if queue == '' then queues = redis.call('SMEMBERS', P .. 'queues') end
local all = function(_) return true end

if state == '' and queue == '' then
  -- Every id is kept, so the first `offset` are skipped at once.
  skipped = offset
  walk(nil, all)
elseif state == '' then
  walk(P .. 'queue:' .. queue, all)
elseif indexed(state) then
  walk(P .. 'state:' .. state, function(id)
    return queue == '' or redis.call('HGET', jkey(id), 'queue') == queue
  end)
elseif state == 'running' then
  local ids = {}
  for _, q in ipairs(queues) do
    local s = skey(q)
    local rows = redis.pcall('XPENDING', s, GROUP, '-', '+', 1000000)
    if type(rows) == 'table' and not rows.err then
      for _, p in ipairs(rows) do
        local found = redis.call('XRANGE', s, p[1], p[1])
        local id = found[1] and job_of(found[1][2])
        local v = id and redis.call('HMGET', jkey(id), 'state', 'entry')
        -- A job leased by a bare read still says `queued` (`adopt`).
        if v and v[2] == p[1] and (v[1] == 'running' or v[1] == 'queued') then ids[#ids + 1] = tonumber(id) end
      end
    end
  end
  table.sort(ids, function(a, b) return a > b end)
  for _, id in ipairs(ids) do
    if take(string.format('%d', id)) then break end
  end
elseif state == 'queued' then
  -- Each queue's unread entries from the back, merged by entry id (the
  -- time each went into line); no queue can hold more of the page than
  -- offset + limit.
  local want = offset + limit
  local lines = {}
  for _, q in ipairs(queues) do
    local s = skey(q)
    -- No group yet (no worker has read the queue): every entry is unread.
    local last = last_delivered(s) or '0-0'
    local line = {}
    local high = '+'
    while #line < want do
      local got = redis.call('XREVRANGE', s, high, '(' .. last, 'COUNT', want)
      if #got == 0 then break end
      for _, e in ipairs(got) do
        local id = job_of(e[2])
        if id and state_is(id, 'queued', e[1]) then line[#line + 1] = {e[1], id} end
      end
      high = '(' .. got[#got][1]
    end
    lines[#lines + 1] = line
  end
  -- Which of two heads of line went into line last: by the time in their
  -- entry ids (each stream numbers its own entries within a millisecond),
  -- then by job id.
  local function newer(a, b)
    local am, bm = string.match(a[1], '^(%d+)-'), string.match(b[1], '^(%d+)-')
    if am ~= bm then
      if #am ~= #bm then return #am > #bm end
      return am > bm
    end
    return tonumber(a[2]) > tonumber(b[2])
  end
  local heads = {}
  for i = 1, #lines do heads[i] = 1 end
  local full = false
  while not full do
    local best = nil
    for i, line in ipairs(lines) do
      local e = line[heads[i]]
      if e and (best == nil or newer(e, lines[best][heads[best]])) then best = i end
    end
    if best == nil then break end
    full = take(lines[best][heads[best]][2])
    heads[best] = heads[best] + 1
  end
  if not full then
    local parked = {}
    for _, q in ipairs(queues) do
      for _, id in ipairs(redis.call('ZRANGE', P .. 'parked:' .. q, 0, -1)) do
        if state_is(id, 'queued') then parked[#parked + 1] = tonumber(id) end
      end
    end
    -- Jobs held back until a time are listed with the parked ones.
    for _, id in ipairs(redis.call('ZRANGE', P .. 'delayed', 0, -1)) do
      local v = redis.call('HMGET', jkey(id), 'state', 'queue')
      if v[1] == 'queued' and (queue == '' or v[2] == queue) then parked[#parked + 1] = tonumber(id) end
    end
    table.sort(parked, function(a, b) return a > b end)
    for _, id in ipairs(parked) do
      if take(string.format('%d', id)) then break end
    end
  end
else
  walk(queue ~= '' and (P .. 'queue:' .. queue) or nil, function(id)
    return redis.call('HGET', jkey(id), 'state') == state
  end)
end
return out
